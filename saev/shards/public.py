"""Read shard directories written by the public saev project (protocol "2.1") without re-recording.

Facts about that layout (docs/architecture.md, "Shards"): `metadata.json` carries `protocol`,
`family`, `ckpt`, `layers`, `content_tokens_per_example`, `cls_token`, `d_model`, `n_examples`,
`max_tokens_per_shard`, `dtype` (always float32) and `data`, a base64 pickle that we never decode.
`shards.json` lists `{"name", "n_examples"}`. Each `acts*.bin` is a float32 C-order array
`[examples, layers, tokens, d_model]` (CLS is token 0 when `cls_token`), allocated at full size
(`max_tokens_per_shard // (tokens_per_example * n_layers)` examples) whatever it holds, so only
`shards.json` says how many examples are real; a trailing shard may hold 0 examples.

`saev.shards.open_shard_set` recognizes either format and returns the same validated `ShardSet`.
"""

from __future__ import annotations

import pathlib

from saev.shards import format as shards

PROTOCOL = "2.1"
# The fields we need; anything else in the file (notably the pickled `data`) is ignored.
REQUIRED = (
    "family",
    "ckpt",
    "layers",
    "content_tokens_per_example",
    "cls_token",
    "d_model",
    "n_examples",
    "max_tokens_per_shard",
)


def metadata_from_public(root: pathlib.Path, raw: dict) -> shards.Metadata:
    if raw["protocol"] != PROTOCOL:
        raise shards.ShardError(
            f"{root} was written by the public saev with protocol {raw['protocol']!r}; only "
            f"protocol {PROTOCOL!r} is readable: re-record it with a current saev (ours or theirs)."
        )
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise shards.ShardError(
            f"{root / shards.METADATA_NAME} (protocol {PROTOCOL}) lacks {missing}; re-record."
        )
    if raw.get("dtype", "float32") != "float32":
        raise shards.ShardError(
            f"{root}: protocol {PROTOCOL} shards must be float32, metadata says {raw['dtype']!r}."
        )
    n_layers, n_tokens = (
        len(raw["layers"]),
        int(raw["content_tokens_per_example"]) + int(bool(raw["cls_token"])),
    )
    examples_per_shard = int(raw["max_tokens_per_shard"]) // (n_tokens * n_layers)
    if examples_per_shard < 1:
        raise shards.ShardError(
            f"{root}: max_tokens_per_shard is smaller than one example; metadata is corrupt."
        )
    return shards.Metadata(
        model={"family": str(raw["family"]), "ckpt": str(raw["ckpt"])},
        layers=tuple(int(x) for x in raw["layers"]),
        cls_token=bool(raw["cls_token"]),
        n_patches_per_example=int(raw["content_tokens_per_example"]),
        d_model=int(raw["d_model"]),
        dtype="float32",
        n_examples=int(raw["n_examples"]),
        examples_per_shard=examples_per_shard,
        # Only the plain-text dataset path survives; `data` is a pickle and stays unread.
        data={"name": "public-saev", "protocol": PROTOCOL, "root": str(raw.get("dataset", ""))},
    )


def open_public_saev_shards(root: pathlib.Path, raw: dict) -> shards.ShardSet:
    """Validate a protocol-2.1 directory and describe it as a `ShardSet` (files are not copied)."""
    md = metadata_from_public(root, raw)
    listing = shards.read_json(root / shards.SHARDS_NAME)
    allocated = md.examples_per_shard * md.bytes_per_example
    files, start = [], 0
    for entry in listing:
        path, n = root / entry["name"], int(entry["n_examples"])
        if not path.is_file():
            raise shards.ShardError(
                f"{path} is listed in shards.json but missing; copy it back or re-record."
            )
        size = path.stat().st_size
        if n > md.examples_per_shard or size < n * md.bytes_per_example or size > allocated:
            raise shards.ShardError(
                f"{path} has {size} bytes but shards.json says it holds {n} examples of "
                f"{md.bytes_per_example} bytes (files are allocated at {allocated}); it is "
                "truncated or belongs to another recording: re-record."
            )
        files.append(shards.ShardFile(path, n, start))
        start += n
    if start != md.n_examples:
        raise shards.ShardError(
            f"{root}: shards.json lists {start} examples but metadata.json says "
            f"{md.n_examples}; the recording did not finish: re-run it."
        )
    return shards.ShardSet(root, md, tuple(files))
