"""Train SAEs on recorded activations: `python train.py data.shard_root=... data.layer=...`.

Settings: conf/train.yaml. The last line printed is the run directory. `python train.py -m ...`
sweeps (docs/sweeps.md): one job per group of SAEs that can share the data stream; the last line
printed is the sweep directory.
"""

import pathlib
import sys

import hydra

from saev import cli, sweep_job, train_config, training

train_config.register()


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(cfg) -> None:
    if sweep_job.is_job():
        sweep_job.run_job(cfg)
    else:
        training.main(cfg)


if __name__ == "__main__":
    conf_dir = pathlib.Path(__file__).parent / "conf"
    if {"--help", "-h"} & set(sys.argv[1:]):
        training.print_help(conf_dir)
    training.check_sae_choices(sys.argv[1:], conf_dir)
    cli.check_command_line(sys.argv[1:], conf_dir, "train")
    main()
