"""Stage 3, `visualize.py`: evaluate a checkpoint and show what its latents respond to, or compare
a sweep.

`config` (the schema, no torch), `statistics` (the one cached pass over the shards), `render`
(images and heatmaps), `browser` (the static HTML), `pareto` (a sweep's L0 against normalized
MSE), `job` (the entry point).
"""
