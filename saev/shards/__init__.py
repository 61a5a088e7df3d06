"""The shard directories that `record.py` writes and every later stage reads: the one place that
knows their file names and layouts (`format`: ours, version 1; `public`: the public saev's
protocol 2.1, readable without re-recording).

`open_shard_set(root)` opens either and returns a validated `ShardSet`; writers use `ShardWriter`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

from saev.shards import public
from saev.shards.format import (
    DTYPE_ITEMSIZE,
    EXAMPLES_NAME,
    METADATA_NAME,
    NUMPY_STORAGE_DTYPE,
    PATCH_LABELS_NAME,
    SHARDS_NAME,
    Metadata,
    ShardError,
    ShardFile,
    ShardSet,
    ShardWriter,
    from_float32,
    open_shards,
    read_json,
    read_patch_labels,
    to_float32,
    write_json_atomic,
)

__all__ = [
    "DTYPE_ITEMSIZE",
    "EXAMPLES_NAME",
    "METADATA_NAME",
    "NUMPY_STORAGE_DTYPE",
    "PATCH_LABELS_NAME",
    "SHARDS_NAME",
    "Metadata",
    "ShardError",
    "ShardFile",
    "ShardSet",
    "ShardWriter",
    "example_records",
    "fingerprint",
    "from_float32",
    "last_example_record",
    "open_shard_set",
    "open_shards",
    "read_json",
    "read_metadata",
    "read_patch_labels",
    "to_float32",
    "write_json_atomic",
]


def read_metadata(root: str | os.PathLike) -> Metadata:
    """The metadata of a shard directory in either format, without opening its activation files
    (rendering from a cache needs no more, even with the activations moved away)."""
    root = pathlib.Path(root)
    raw = _raw_metadata(root)
    return public.metadata_from_public(root, raw) if "protocol" in raw else Metadata.from_json(raw)


def open_shard_set(root: str | os.PathLike) -> ShardSet:
    """Open and validate a shard directory in our format (version 1) or the public saev's (2.1).

    Raises `ShardError` with a one-line message naming the problem and its fix.
    """
    root = pathlib.Path(root)
    raw = _raw_metadata(root)
    if "protocol" in raw:
        return public.open_public_saev_shards(root, raw)
    return open_shards(root)


def fingerprint(root: str | os.PathLike) -> str:
    """sha256 of what identifies a shard directory's content (its metadata and file listing),
    read from small files only."""
    digest = hashlib.sha256()
    for name in (METADATA_NAME, SHARDS_NAME):
        path = pathlib.Path(root) / name
        if not path.is_file():
            raise ShardError(f"{path} does not exist; is data.shard_root a shard directory?")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def example_records(root: str | os.PathLike) -> list[bytes]:
    """The lines of `examples.jsonl`, unparsed (line i is example i's JSON record: where its
    image came from, and its label if any); a million records as dicts would take ~1 GB."""
    path = pathlib.Path(root) / EXAMPLES_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist, so no image can be found.")
    return path.read_bytes().splitlines()


def last_example_record(root: str | os.PathLike) -> bytes:
    """The last line of `examples.jsonl`, read from its end (for resuming a recording)."""
    with open(pathlib.Path(root) / EXAMPLES_NAME, "rb") as fd:
        fd.seek(max(0, os.fstat(fd.fileno()).st_size - 65536))
        return fd.read().splitlines()[-1]


def _raw_metadata(root: pathlib.Path) -> dict:
    if not root.is_dir():
        raise ShardError(
            f"shard directory {root} does not exist; pass the directory record.py printed "
            "(the one holding metadata.json)."
        )
    raw = read_json(root / METADATA_NAME)
    if not isinstance(raw, dict):
        raise ShardError(f"{root / METADATA_NAME} is not a JSON object; the directory is corrupt.")
    return raw
