"""Our shard format, version 1 (docs/architecture.md, "Shards"): names, metadata, reading, writing.

A shard directory `<dump_to>/<hash>/` holds `metadata.json`, `shards.json`, `acts%06d.bin` files of
shape `[examples, layers, tokens, d_model]`, `examples.jsonl`, and `labels.bin` when patches have
labels. Writers (`record.py`, `saev.synthetic`) and readers (loaders, visualize) all go through
`saev.shards`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np

FORMAT = "saev-shards"
VERSION = 1
METADATA_NAME = "metadata.json"
SHARDS_NAME = "shards.json"
EXAMPLES_NAME = "examples.jsonl"
PATCH_LABELS_NAME = "labels.bin"
"""Optional per-patch labels (ade20k): uint8 `[n_examples, n_patches_per_example]`, C order."""
LOCK_NAME = ".lock"
OPTIONAL_METADATA = {"transform"}
"""Metadata fields added after version 1 was first written; readers must not require them."""

# numpy has no bfloat16; bfloat16 shards are stored as their raw 16-bit patterns (the upper half
# of a float32) and read back as uint16 views that `to_float32` widens.
DTYPE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
NUMPY_STORAGE_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class ShardError(Exception):
    """A shard directory is missing, incomplete or inconsistent. The message says how to fix it."""


def shard_name(i: int) -> str:
    return f"acts{i:06d}.bin"


@dataclasses.dataclass(frozen=True)
class Metadata:
    """Everything a reader needs to interpret the `.bin` files (`metadata.json`)."""

    model: dict
    """`{"family": ..., "ckpt": ...}` of the ViT that produced the activations."""
    layers: tuple[int, ...]
    """Recorded layers as the user gave them (negative indices count from the end)."""
    cls_token: bool
    """Whether token 0 of each example is the CLS token."""
    n_patches_per_example: int
    d_model: int
    dtype: str
    """"float32", "float16" or "bfloat16"."""
    n_examples: int
    examples_per_shard: int
    data: dict
    """JSON description of the image dataset (name, root, split, ...). Never a pickle."""
    transform: list | None = None
    """The pixel-moving steps of the model's eval transform (`saev.record.crops.describe`), so
    visualize shows each image as the model saw it. Optional and outside the content hash: None
    (and no key in metadata.json) in shards recorded before it was stored, or by writers without
    images."""

    def __post_init__(self):
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ShardError(f"dtype '{self.dtype}' is not one of {sorted(DTYPE_ITEMSIZE)}.")
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    @property
    def n_tokens_per_example(self) -> int:
        return self.n_patches_per_example + int(self.cls_token)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def bytes_per_example(self) -> int:
        return self.n_layers * self.n_tokens_per_example * self.d_model * DTYPE_ITEMSIZE[self.dtype]

    def content_hash(self) -> str:
        """sha256 of the fields that decide the content; names the shard directory."""
        fields = {
            "model": self.model,
            "layers": list(self.layers),
            "cls_token": self.cls_token,
            "n_patches_per_example": self.n_patches_per_example,
            "dtype": self.dtype,
            "data": self.data,
        }
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["n_tokens_per_example"] = self.n_tokens_per_example
        if d["transform"] is None:  # metadata.json stays byte-identical to older writers'
            del d["transform"]
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_json(cls, d: dict) -> Metadata:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ShardError(
                f"unknown shard format {d.get('format')!r} version {d.get('version')!r}; "
                f"this saev reads '{FORMAT}' version {VERSION} "
                "(and the public saev's protocol 2.1)."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - d.keys() - OPTIONAL_METADATA
        if missing:
            raise ShardError(f"metadata.json lacks {sorted(missing)}; re-record the shards.")
        return cls(**{k: d[k] for k in names if k in d})

    def layer_index(self, layer: int) -> int:
        """Position of `layer` (as recorded) along the layers axis of the `.bin` files."""
        if layer not in self.layers:
            raise ShardError(
                f"layer {layer} was not recorded; these shards hold layers {list(self.layers)}."
            )
        return self.layers.index(layer)


def fsync_dir(directory: pathlib.Path) -> None:
    """Make renames and new names in `directory` durable: a rename is only on disk once the
    directory itself is synced (POSIX; without it a power loss can forget a finished shard)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: pathlib.Path, obj) -> None:
    """Write JSON so that readers see the old file or the new one, never half of either, and the
    new one survives a power loss once this returns."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fd:
        json.dump(obj, fd, indent=2)
        fd.flush()
        os.fsync(fd.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: pathlib.Path):
    try:
        with open(path) as fd:
            return json.load(fd)
    except FileNotFoundError:
        raise ShardError(
            f"{path} does not exist; is this a shard directory written by record.py?"
        ) from None
    except json.JSONDecodeError as err:
        raise ShardError(
            f"{path} is not valid JSON ({err}); the shard directory is corrupt."
        ) from None


@dataclasses.dataclass(frozen=True)
class ShardFile:
    path: pathlib.Path
    n_examples: int
    first_example: int
    """Global index of this file's first example."""


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """A validated, read-only view of a shard directory (ours, or the public saev's)."""

    root: pathlib.Path
    metadata: Metadata
    files: tuple[ShardFile, ...]

    @property
    def n_examples(self) -> int:
        return sum(f.n_examples for f in self.files)

    def memmap(self, i: int) -> np.memmap:
        """Shard `i`, read-only, `[n_examples, n_layers, n_tokens, d_model]` in storage dtype."""
        md, f = self.metadata, self.files[i]
        shape = (f.n_examples, md.n_layers, md.n_tokens_per_example, md.d_model)
        return np.memmap(f.path, dtype=NUMPY_STORAGE_DTYPE[md.dtype], mode="r", shape=shape)


def read_patch_labels(root: pathlib.Path, md: Metadata) -> np.ndarray | None:
    """Each patch's label, uint8 `[n_examples, n_patches_per_example]` (read-only), or None when
    the recording stored none (only datasets with segmentation masks do)."""
    path = pathlib.Path(root) / PATCH_LABELS_NAME
    if not path.is_file() or path.stat().st_size == 0:  # numpy cannot map an empty file
        return None
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, md.n_patches_per_example)


def open_shards(
    root: str | os.PathLike, *, strict_sizes: bool = True, require_complete: bool = True
) -> ShardSet:
    """Open and validate a shard directory of format version 1.

    Checks that every file in `shards.json` exists with exactly the size its example count implies
    and (with `require_complete`) that the recording has finished, i.e. `shards.json` holds the
    `n_examples` of `metadata.json`, so a bad directory fails here, before any training step.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise ShardError(f"shard directory {root} does not exist; pass the path record.py printed.")
    md = Metadata.from_json(read_json(root / METADATA_NAME))
    listing = read_json(root / SHARDS_NAME)
    files, start = [], 0
    for entry in listing:
        path = root / entry["name"]
        n = int(entry["n_examples"])
        if not path.is_file():
            raise ShardError(
                f"{path} is listed in shards.json but missing; re-run the same record.py command."
            )
        expected = n * md.bytes_per_example
        if strict_sizes and path.stat().st_size != expected:
            raise ShardError(
                f"{path} has {path.stat().st_size} bytes but shards.json implies {expected} "
                f"({n} examples); the file is truncated or corrupt, re-record it."
            )
        files.append(ShardFile(path, n, start))
        start += n
    if start > md.n_examples:
        raise ShardError(
            f"{root / SHARDS_NAME} lists {start} examples but metadata.json says {md.n_examples}; "
            "the directory is corrupt, re-record it."
        )
    if require_complete and start < md.n_examples:
        raise ShardError(
            f"the recording in {root} has not finished ({start} of {md.n_examples} examples); "
            "re-run the same record.py command to resume it, or wait for the one running."
        )
    return ShardSet(root, md, tuple(files))


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored activations (any of the three dtypes) to float32."""
    if dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def from_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Narrow float32 activations to the storage representation of `dtype` (round half to even)."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "bfloat16":
        bits = arr.view(np.uint32)
        rounding = ((bits >> 16) & 1) + 0x7FFF
        return ((bits + rounding) >> 16).astype(np.uint16)
    return arr.astype(NUMPY_STORAGE_DTYPE[dtype])


class ShardWriter:
    """Appends examples to `<dump_to>/<hash>/`: exclusive (a lock), atomic per shard, resumable.

    Each shard is written to a temporary name, fsynced and renamed; only then are its examples
    appended to `examples.jsonl` (and their patch labels to `labels.bin`) and the shard registered
    in `shards.json` (replaced atomically). `shards.json` is the truth: on open, anything past it
    (a renamed but unregistered shard, extra `examples.jsonl` lines or labels, temporary files) is
    discarded, and `n_done` says where to resume.

    `metadata.n_examples` is the number of candidate images; when some are skipped as unreadable,
    `finish()` rewrites it to the number written, which also marks the directory complete.
    """

    def __init__(self, dump_to: str | os.PathLike, metadata: Metadata, patch_labels: bool = False):
        import fcntl

        self.metadata = metadata
        self.patch_labels = patch_labels
        self.root = pathlib.Path(dump_to) / metadata.content_hash()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = open(self.root / LOCK_NAME, "a+")
        except OSError as err:
            raise ShardError(
                f"cannot write to dump_to={dump_to} ({err.strerror}); choose a writable directory."
            ) from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fd.close()
            raise ShardError(
                f"another process is writing to {self.root}; wait for it to finish (or kill it) "
                "and re-run."
            ) from None
        self._recover()
        self._buffer = np.empty(
            (
                metadata.examples_per_shard,
                metadata.n_layers,
                metadata.n_tokens_per_example,
                metadata.d_model,
            ),
            dtype=NUMPY_STORAGE_DTYPE[metadata.dtype],
        )
        self._buffered_examples: list[dict] = []
        labels_shape = (metadata.examples_per_shard, metadata.n_patches_per_example)
        self._labels = np.empty(labels_shape if patch_labels else (0, 0), np.uint8)

    def _recover(self) -> None:
        md_path = self.root / METADATA_NAME
        shards_path = self.root / SHARDS_NAME
        self.listing: list[dict] = read_json(shards_path) if shards_path.exists() else []
        self.n_done = sum(e["n_examples"] for e in self.listing)
        if md_path.exists():
            existing = read_json(md_path)
            ours = self.metadata.to_json()
            for key in OPTIONAL_METADATA - existing.keys():  # resumed from an older recording
                ours.pop(key, None)
            finished_short = existing.get("n_examples") == self.n_done < ours["n_examples"]
            if finished_short:  # a finished run that skipped unreadable images
                ours["n_examples"] = self.n_done
            if existing != ours:
                raise ShardError(
                    f"{md_path} disagrees with this run's settings; the directory is corrupt or "
                    "from another saev version: move it away and re-run."
                )
            self.metadata = Metadata.from_json(existing)
        else:
            write_json_atomic(md_path, self.metadata.to_json())
        registered = {e["name"] for e in self.listing}
        for path in self.root.iterdir():
            stray_tmp = (
                path.name.endswith(".tmp") or ".tmp" in path.name and path.name.startswith(".")
            )
            stray_bin = (
                path.name.startswith("acts")
                and path.name.endswith(".bin")
                and path.name not in registered
            )
            if stray_tmp or stray_bin:
                path.unlink()
        self._truncate_examples(self.n_done)
        if self.patch_labels:
            self._truncate_labels(self.n_done)

    def _truncate_labels(self, n_examples: int) -> None:
        path = self.root / PATCH_LABELS_NAME
        path.touch()
        expected = n_examples * self.metadata.n_patches_per_example
        if path.stat().st_size < expected:
            raise ShardError(f"{path} has fewer labels than shards.json has examples; re-record.")
        os.truncate(path, expected)

    def _truncate_examples(self, n_lines: int) -> None:
        path = self.root / EXAMPLES_NAME
        if not path.exists():
            path.touch()
            return
        with open(path, "rb+") as fd:
            offset = 0
            for _ in range(n_lines):
                line = fd.readline()
                if not line.endswith(b"\n"):
                    raise ShardError(
                        f"{path} has fewer lines than shards.json has examples; re-record."
                    )
                offset += len(line)
            fd.truncate(offset)

    @property
    def complete(self) -> bool:
        return self.n_done >= self.metadata.n_examples

    def add(
        self, acts_NLTD: np.ndarray, examples: list[dict], patch_labels_NP: np.ndarray | None = None
    ) -> None:
        """Append `N` examples' activations `[N, layers, tokens, d_model]` and their sources.

        `acts_NLTD` is float32, or already in the storage representation of `metadata.dtype`
        (float16; uint16 bit patterns for bfloat16), which skips a conversion on the CPU.
        `patch_labels_NP` (uint8) is required exactly when the writer was opened with patch labels.
        """
        md = self.metadata
        expected = (md.n_layers, md.n_tokens_per_example, md.d_model)
        if acts_NLTD.shape[1:] != expected or len(examples) != acts_NLTD.shape[0]:
            raise ShardError(
                f"got activations of shape {acts_NLTD.shape} for {len(examples)} examples; "
                f"expected [N, *{expected}]."
            )
        if (patch_labels_NP is not None) != self.patch_labels:
            raise ShardError("patch labels must be given exactly when the writer records them.")
        storage = np.dtype(NUMPY_STORAGE_DTYPE[md.dtype])
        stored = acts_NLTD if acts_NLTD.dtype == storage else from_float32(acts_NLTD, md.dtype)
        i = 0
        while i < len(stored):
            start = len(self._buffered_examples)
            take = min(len(stored) - i, md.examples_per_shard - start)
            self._buffer[start : start + take] = stored[i : i + take]
            if patch_labels_NP is not None:
                self._labels[start : start + take] = patch_labels_NP[i : i + take]
            self._buffered_examples.extend(examples[i : i + take])
            i += take
            if len(self._buffered_examples) == md.examples_per_shard:
                self.flush()

    def flush(self) -> None:
        """Write the buffered examples as the next shard (short only for the last shard)."""
        n = len(self._buffered_examples)
        if n == 0:
            return
        name = shard_name(len(self.listing))
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in self._buffered_examples)
        try:
            with open(tmp, "wb") as fd:
                fd.write(memoryview(np.ascontiguousarray(self._buffer[:n])).cast("B"))
                fd.flush()
                os.fsync(fd.fileno())
            os.replace(tmp, final)
            # The shard's name must be durable before shards.json can point at it.
            fsync_dir(self.root)
            with open(self.root / EXAMPLES_NAME, "a") as fd:
                fd.write(lines)
                fd.flush()
                os.fsync(fd.fileno())
            if self.patch_labels:
                with open(self.root / PATCH_LABELS_NAME, "ab") as fd:
                    fd.write(memoryview(np.ascontiguousarray(self._labels[:n])).cast("B"))
                    fd.flush()
                    os.fsync(fd.fileno())
            write_json_atomic(
                self.root / SHARDS_NAME, [*self.listing, {"name": name, "n_examples": n}]
            )
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise ShardError(
                f"could not write {final} ({err.strerror}); {self.n_done} examples are safely "
                "recorded: free space and re-run the same command to resume."
            ) from None
        self.listing.append({"name": name, "n_examples": n})
        self.n_done += n
        self._buffered_examples = []

    def finish(self) -> None:
        """Write the last (short) shard; if fewer examples than planned were written (unreadable
        images skipped), record the true count in `metadata.json`, which marks it complete."""
        self.flush()
        if self.n_done != self.metadata.n_examples:
            self.metadata = dataclasses.replace(self.metadata, n_examples=self.n_done)
            try:
                write_json_atomic(self.root / METADATA_NAME, self.metadata.to_json())
            except OSError as err:
                raise ShardError(
                    f"could not update {self.root / METADATA_NAME} ({err.strerror}); free space "
                    "and re-run the same command to finish."
                ) from None

    def close(self) -> None:
        self.flush()
        self._lock_fd.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._lock_fd.close()
