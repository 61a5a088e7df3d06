"""Stage 2, `train.py`: many SAEs side by side on one data stream, and sweeps of them.

`config` (the schemas, no torch), `module` (the LightningModule), `metrics` (torchmetrics, also
used by visualize), `logs` (CSV, W&B, progress), `job` (one training job), `sweep`, `sweep_job`
and `summary` (`python train.py -m`).
"""
