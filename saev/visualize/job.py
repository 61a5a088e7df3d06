"""`python visualize.py`: evaluate a checkpoint and build its latent browser (`ckpt=`), or plot a
sweep (`sweep=`, `wandb.project=`).

What the pass reads (`PassInputs`) is resolved and checked before torch loads, so that a wrong
path is reported at once; the pass itself (`saev.visualize.statistics`) runs only on a cache miss.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import pathlib

from saev import shards
from saev.nn.config import CONFIG_NAME, WEIGHTS_NAME
from saev.visualize.config import VisualizeConfig, WandbSource, sae_dir

logger = logging.getLogger(__name__)
CACHE_VERSION = 1
"""Part of every pass's cache key: raise it when the cache's content changes meaning."""


@dataclasses.dataclass(frozen=True)
class PassInputs:
    """What a pass reads: resolved from the command line, else from the SAE's config.json."""

    ckpt: pathlib.Path
    shard_root: pathlib.Path
    layer: int
    tokens: str

    @classmethod
    def resolve(cls, cfg: VisualizeConfig) -> PassInputs:
        ckpt = sae_dir(cfg.ckpt)
        trained = json.loads((ckpt / CONFIG_NAME).read_text()).get("train", {}).get("data", {})
        shard_root = cfg.data.shard_root or trained.get("shard_root")
        layer = cfg.data.layer if cfg.data.layer is not None else trained.get("layer")
        if shard_root is None or layer is None:
            raise ValueError(
                f"{ckpt} does not say which shards it was trained on; set data.shard_root, "
                "data.layer."
            )
        # The tokens the SAE was trained on: its latents mean something only there.
        tokens = cfg.data.tokens or trained.get("tokens") or "patches"
        return cls(ckpt, pathlib.Path(shard_root).absolute(), int(layer), tokens)

    def key(self, top_k: int, probe=None) -> dict:
        """Identity of a pass; reading it touches no activations (only small JSON files). A pass
        with label probes (`probe`, a ProbeConfig) also has their settings that change it."""
        with open(self.ckpt / WEIGHTS_NAME, "rb") as fd:
            weights = hashlib.file_digest(fd, "sha256").hexdigest()
        return {
            "version": CACHE_VERSION,
            "weights_sha256": weights,
            "shards_sha256": shards.fingerprint(self.shard_root),
            "layer": self.layer,
            "tokens": self.tokens,
            "top_k": top_k,
        } | ({"probe": {"memory_mb": probe.memory_mb}} if probe and probe.enabled else {})


def main(cfg: VisualizeConfig) -> pathlib.Path:
    """Entry point of `visualize.py`; returns the output directory."""
    from saev import cli

    cli.quiet()
    if cfg.ckpt is None:
        from saev.visualize import pareto

        return pareto.main(cfg, functools.partial(splice_one, cfg) if cfg.splice.enabled else None)
    src = PassInputs.resolve(cfg)
    out_dir = pathlib.Path(cfg.out) if cfg.out else src.ckpt / "visuals"
    # Deferred: torch takes seconds to import, and the checks above should not wait for it.
    from saev import nn
    from saev.visualize import probe, statistics

    device = statistics.device_of(cfg.device)
    sae = nn.load(src.ckpt, device)
    key = src.key(cfg.top_k, cfg.probe)
    prep = None
    if cfg.splice.enabled:  # the model, the layer and the images are checked before any write
        from saev.visualize import faithfulness

        prep = faithfulness.prepare(cfg, src, sae, device)
        # The model's figures do not depend on the probe's settings.
        splice_key = prep.key(src.key(cfg.top_k))
        if cfg.force or faithfulness.cached(out_dir, splice_key) is None:
            prep.vit  # noqa: B018 (built now: a model that cannot be built writes nothing)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create out={out_dir} ({err.strerror}).") from None
    summary = None if cfg.force else statistics.load_cached(out_dir, key)
    if summary is not None and cfg.probe.enabled and probe.load(out_dir) is None:
        summary = None  # a save interrupted between the probe's files and the key
    if summary is None:
        tracker = probe.for_pass(src, cfg, sae, device) if cfg.probe.enabled else None
        summary, metrics = statistics.run_pass(src, cfg, sae, device, tracker)
        if tracker is None:
            probe.clear(out_dir)
        else:
            metrics["probe"] = probe.write(out_dir, tracker.finish())
        statistics.save(out_dir, key, summary, metrics, src)
    else:
        logger.info("pass cached in %s (force=true recomputes it)", statistics.cache_dir(out_dir))
    effects = None
    if prep is not None:
        faithfulness.run(cfg, src, prep, sae, device, out_dir, splice_key)
        if cfg.render:
            from saev.visualize import render

            cache = statistics.cache_dir(out_dir) / "interventions.json"
            chosen = render.choose(summary, cfg)
            effects = faithfulness.effects(
                prep, src, sae, summary, chosen, cfg, device, cache, splice_key
            )
        statistics.write_latents(out_dir, summary, effects)
    if cfg.render:
        from saev.visualize import render

        render.render(cfg, src, summary, sae, device, out_dir, effects)
    return out_dir


def splice_one(cfg: VisualizeConfig, sae_dir: pathlib.Path) -> dict:
    """The spliced evaluation of one SAE of a sweep (`visualize.py sweep=... splice=true`), in
    `<sae>/visuals/cache/` as `ckpt=<sae> splice=true` keeps it; its `splice` figures."""
    from saev import nn
    from saev.visualize import faithfulness, statistics

    one = dataclasses.replace(cfg, ckpt=str(sae_dir), sweep=None, out=None, wandb=WandbSource())
    src = PassInputs.resolve(one)
    device = statistics.device_of(cfg.device)
    sae = nn.load(src.ckpt, device)
    prep = faithfulness.prepare(one, src, sae, device)
    return faithfulness.run(
        one, src, prep, sae, device, src.ckpt / "visuals", prep.key(src.key(cfg.top_k))
    )
