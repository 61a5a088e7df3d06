"""saev: sparse autoencoders on vision-transformer activations.

Stages, each behind an entry point: `saev.record` (record.py), `saev.train` (train.py),
`saev.visualize` (visualize.py); what they share: `saev.shards` (the on-disk format), `saev.data`
(loading shards for training), `saev.nn` (the SAE itself), `saev.cli`. docs/architecture.md
describes the layout and the flow.
"""
