"""Train SAEs on recorded activations: `python train.py data.shard_root=... data.layer=...`.

Settings: conf/train.yaml. The last line printed is the run directory.
"""

import pathlib
import sys

import hydra

from saev import train_config, training

train_config.register()


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(cfg) -> None:
    training.main(cfg)


if __name__ == "__main__":
    training.check_sae_choices(sys.argv[1:], pathlib.Path(__file__).parent / "conf")
    main()
