"""Per-latent statistics and top-activating tokens of a trained SAE (see conf/visualize.yaml).

    python visualize.py ckpt=runs/<id>/<sae> data.shard_root=... data.layer=23

The last line printed is the output directory (`latents.csv`, `top.npz`).
"""

import hydra
from omegaconf import OmegaConf

from saev import training, visuals

visuals.register()


@hydra.main(version_base=None, config_path="conf", config_name="visualize")
def main(cfg) -> None:
    training.run_or_exit(lambda: visuals.main(OmegaConf.to_object(cfg)))


if __name__ == "__main__":
    main()
