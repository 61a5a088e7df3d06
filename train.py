"""Train SAEs on recorded activations: `python train.py data.shard_root=... data.layer=...`.

Settings: conf/train.yaml. The last line printed is the run directory.
"""

import hydra

from saev import train_config, training

train_config.register()


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(cfg) -> None:
    training.main(cfg)


if __name__ == "__main__":
    main()
