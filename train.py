"""Train SAEs on recorded activations: `python train.py data.shard_root=... data.layer=...`.

Settings: `python train.py --help`. The last line printed is the run directory.
`python train.py -m ...` sweeps (docs/sweeps.md): one job per group of SAEs that can share the
data stream; the last line printed is the sweep directory.
"""

import pathlib
import sys

import hydra

from saev import cli
from saev.train import config as train_config

train_config.register()


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(cfg) -> None:
    from saev.train import job, sweep_job

    if sweep_job.is_job():
        sweep_job.run_job(cfg)
    else:
        job.main(cfg)


if __name__ == "__main__":
    conf_dir = pathlib.Path(__file__).parent / "conf"
    if {"--help", "-h"} & set(sys.argv[1:]):
        train_config.print_help(conf_dir)
    cli.check_sae_choices(sys.argv[1:], conf_dir)
    from saev.train import sweep

    cli.check_command_line(sys.argv[1:], conf_dir, "train", axes=sweep.axes)
    main()
