"""Record a ViT's residual stream over an image dataset to shards (`python record.py --help`).

    python record.py model=siglip data=inat21 data.root=/data/inat21/train_mini layers=[13,23]

The last line printed to stdout is the shard directory.
"""

import os
import pathlib
import sys

import hydra
from omegaconf import DictConfig

from saev import cli
from saev.record import config as record_config  # registers the schemas


@hydra.main(version_base="1.3", config_path="conf", config_name="record")
def main(cfg: DictConfig) -> None:
    from saev.record import job

    try:
        shard_dir = job.main(cfg)
    except job.USER_ERRORS as err:
        if cfg.get("debug") or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        cli.fail(str(err))
    print(shard_dir)


if __name__ == "__main__":
    conf_dir = pathlib.Path(__file__).parent / "conf"
    if {"--help", "-h"} & set(sys.argv[1:]):
        record_config.print_help(conf_dir)
    cli.check_command_line(sys.argv[1:], conf_dir, "record")
    main()
