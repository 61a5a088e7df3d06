"""Inspect a trained SAE, or compare a sweep of them (`python visualize.py --help`).

    python visualize.py ckpt=runs/<id>/<sae> [data.shard_root=... data.layer=23] [out=<dir>]
    python visualize.py sweep=runs/multirun/<date>      # L0 vs normalized MSE of every SAE

The last line printed is the output directory (`index.html`, `metrics.json`; or `pareto.png`).
"""

import pathlib
import sys

import hydra

from saev import cli
from saev.visualize import config as visualize_config

visualize_config.register()


@hydra.main(version_base=None, config_path="conf", config_name="visualize")
def main(cfg) -> None:
    from omegaconf import OmegaConf

    from saev import shards
    from saev.visualize import job

    cli.run_or_exit(lambda: job.main(OmegaConf.to_object(cfg)), (shards.ShardError,))


if __name__ == "__main__":
    conf_dir = pathlib.Path(__file__).parent / "conf"
    if {"--help", "-h"} & set(sys.argv[1:]):
        visualize_config.print_help()
    sys.argv[1:] = cli.expand_switches(sys.argv[1:], "visualize")
    cli.check_command_line(sys.argv[1:], conf_dir, "visualize", check=visualize_config.check_paths)
    main()
