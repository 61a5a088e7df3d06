"""Training data: batches of activations streamed from a shard directory.

`config` (`DataConfig`, no torch), `loaders` (`ShuffledLoader`, `OrderedLoader`), `pipeline`
(the reader threads behind them), `normalization` (statistics estimated once, cached),
`datamodule` (`ShardDataModule` and the wrappers Lightning is handed).
"""
