"""Stage 1, `record.py`: run a ViT over an image dataset and write its activations as shards.

`config` (the schemas, no torch), `images` (the datasets), `vit` (model wrappers and hooks),
`crops` (each image as the model saw it, recorded and redone), `job` (the recording job).
"""
