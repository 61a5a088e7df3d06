"""Inspect a trained SAE, or compare a sweep of them (see conf/visualize.yaml).

    python visualize.py ckpt=runs/<id>/<sae> [data.shard_root=... data.layer=23] [dump_to=<dir>]
    python visualize.py sweep=runs/multirun/<date>      # L0 vs normalized MSE of every SAE

The last line printed is the output directory (`index.html`, `metrics.json`; or `pareto.png`).
"""

import hydra
from omegaconf import OmegaConf

from saev import training, visuals
from saev.visualize_config import register

register()


@hydra.main(version_base=None, config_path="conf", config_name="visualize")
def main(cfg) -> None:
    training.run_or_exit(lambda: visuals.main(OmegaConf.to_object(cfg)))


if __name__ == "__main__":
    main()
