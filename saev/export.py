"""`python -m saev.export ckpt=<checkpoint> to=<dir> format=saelens|saev`: an SAE checkpoint in
another layout.

- `format=saelens` writes SAELens's `cfg.json` + `sae_weights.safetensors` (`saev.nn.saelens`):
  our normalization folded in, so the export takes raw activations; the hook point is named after
  the model and layer the SAE was trained on (its config.json, else the shards' metadata).
- `format=saev` writes our directory (`config.json` + `sae.safetensors`), for example from a public
  saev checkpoint file, so that `visualize.py ckpt=<dir>` can read it; `data.shard_root=` and
  `data.layer=` record the shards it belongs to.

`ckpt=` is anything `saev.nn.load` reads. The last line printed is the output directory; a mistake
is one line `error: ...` and exit code 2.
"""

from __future__ import annotations

import json
import pathlib
import sys

from saev import cli

FORMATS = ("saelens", "saev")
OPTIONS = {
    "ckpt": "the SAE checkpoint: our directory, a SAELens directory or a public saev file",
    "to": "output directory",
    "format": "saelens (SAELens's layout) or saev (ours)",
    "data.shard_root": "the shards the SAE reads (names its hook point; recorded by format=saev)",
    "data.layer": "the layer it reads (names its hook point; recorded by format=saev)",
    "centered": "public saev schema-1 files only: true if its encoder subtracted b_dec",
}
USAGE = (
    "usage: python -m saev.export ckpt=<checkpoint> to=<dir> format=saelens|saev [key=value ...]"
)


def parse(argv: list[str]) -> dict[str, str]:
    """The `key=value` arguments; ValueError for an unknown key or a missing required one."""
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise ValueError(f"unknown argument {arg!r}; options: {', '.join(OPTIONS)}.")
        args[key] = value
    for key in ("ckpt", "to", "format"):
        if not args.get(key):
            raise ValueError(f"set {key}=<{OPTIONS[key].split(':')[0].split(' (')[0]}>; {USAGE}")
    if args["format"] not in FORMATS:
        raise ValueError(f"format={args['format']!r}: choose one of {list(FORMATS)}.")
    if args.get("centered", "true").lower() not in ("true", "false"):
        raise ValueError(f"centered={args['centered']!r} must be true or false.")
    if "data.layer" in args:
        try:
            int(args["data.layer"])
        except ValueError:
            raise ValueError(f"data.layer={args['data.layer']!r} must be an integer.") from None
    return args


def trained_on(ckpt: pathlib.Path | None, args: dict[str, str]) -> dict:
    """What the SAE reads: shard_root, layer and the model ({family, ckpt}), from the command
    line, else the SAE's config.json, else the shards' metadata; missing ones are None."""
    config = None if ckpt is None else ckpt / "config.json"
    saved = json.loads(config.read_text()) if config is not None and config.is_file() else {}
    data = saved.get("train", {}).get("data", {})
    root = args.get("data.shard_root") or data.get("shard_root")
    layer = args.get("data.layer", data.get("layer"))
    model = (saved.get("shards") or {}).get("model")
    if model is None and root is not None:
        from saev import shards

        try:
            model = shards.read_metadata(root).model
        except (OSError, ValueError, shards.ShardError):
            model = None  # shards moved away: the hook point is named without the model
    return {"shard_root": root, "layer": None if layer is None else int(layer), "model": model}


def saelens_meta(source: dict) -> dict:
    """SAELens's `meta` for an SAE on `source`: the ViT block's output is its residual stream
    after that block, TransformerLens's `blocks.<layer>.hook_resid_post`."""
    meta = {}
    if source["model"]:
        meta["model_name"] = source["model"].get("ckpt")
        meta["model_class_name"] = source["model"].get("family")
    if source["layer"] is not None:
        meta["hook_name"] = f"blocks.{source['layer']}.hook_resid_post"
    return meta


def main(argv: list[str]) -> pathlib.Path:
    args = parse(argv)
    from saev import nn
    from saev.nn import public
    from saev.nn.checkpoints import DIRECTORY_FILES

    ckpt, out = pathlib.Path(args["ckpt"]), pathlib.Path(args["to"])
    if "centered" in args:
        sae = public.load(ckpt, centered=args["centered"].lower() == "true")
    else:
        sae = nn.load(ckpt)
    # A public saev file's folder is no SAE directory: its config.json, if any, is not the SAE's.
    own = ckpt if ckpt.is_dir() else ckpt.parent if ckpt.name in DIRECTORY_FILES else None
    source = trained_on(own, args)
    if args["format"] == "saelens":
        from saev.nn import saelens

        return saelens.save(sae, out, saelens_meta(source))
    data = {k: source[k] for k in ("shard_root", "layer") if source[k] is not None}
    return sae.save(out, {"train": {"data": data}, "imported_from": str(ckpt.absolute())})


def run(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(USAGE)
        for key, doc in OPTIONS.items():
            print(f"  {key:<18} {doc}")
        return
    cli.run_or_exit(lambda: main(argv))


if __name__ == "__main__":
    run(sys.argv[1:])
