"""Inspect a trained SAE, or compare a sweep of them (see conf/visualize.yaml).

    python visualize.py ckpt=runs/<id>/<sae> [data.shard_root=... data.layer=23] [dump_to=<dir>]
    python visualize.py sweep=runs/multirun/<date>      # L0 vs normalized MSE of every SAE

The last line printed is the output directory (`index.html`, `metrics.json`; or `pareto.png`).
"""

import pathlib
import sys

import hydra
from omegaconf import OmegaConf

from saev import cli, training, visuals
from saev.visualize_config import VisualizeConfig, register

register()


@hydra.main(version_base=None, config_path="conf", config_name="visualize")
def main(cfg) -> None:
    training.run_or_exit(lambda: visuals.main(OmegaConf.to_object(cfg)))


if __name__ == "__main__":
    conf_dir = pathlib.Path(__file__).parent / "conf"
    if {"--help", "-h"} & set(sys.argv[1:]):
        cli.print_help(
            """
usage: python visualize.py ckpt=<sae dir> [data.shard_root=... data.layer=...] [key=value ...]
       python visualize.py sweep=<sweep or runs dir>     L0 vs normalized MSE of every SAE
       the last line printed is the output directory (index.html, metrics.json; pareto.png)""",
            {},
            [("Options", cli.options(VisualizeConfig))],
        )
    cli.check_command_line(sys.argv[1:], conf_dir, "visualize")
    main()
