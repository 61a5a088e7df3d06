"""The recording job behind `record.py`: run a ViT over an image dataset and write shards.

Order of work: check the config and the dataset (cheap, before torch is imported, so a typo fails
in under a second), build the model, open the shard directory (its lock makes the run exclusive),
then stream batches: DataLoader workers decode, the main thread runs the hooked forward pass, and a
writer thread copies activations into shards so disk writes overlap the next batches.

Resuming: `ShardWriter` says how many examples are safely on disk. The run restarts at the batch
that holds the next image, so every batch has exactly the images it had in an uninterrupted run
and the resumed shards are byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import queue
import sys
import threading

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from saev import cli, shards
from saev.record import crops, images
from saev.record.config import RecordConfig


class RecordError(Exception):
    """A problem the user can fix (bad input, full disk, ...): shown as one line, no traceback."""


USER_ERRORS = (RecordError, shards.ShardError, ValueError)
"""What `record.py` reports as `error: <message>` (exit code 2) unless `debug=true`."""


def main(cfg: DictConfig) -> pathlib.Path:
    """Validate the composed Hydra config and record; returns the shard directory."""
    try:
        config = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise RecordError(
            f"{err.full_key} is required: add {err.full_key}=... to the command."
        ) from err
    except OmegaConfBaseException as err:
        raise RecordError(str(err).splitlines()[0]) from err
    return record(config)


def record(cfg: RecordConfig) -> pathlib.Path:
    cli.quiet()
    dataset = images.build(cfg.data)
    dump_to = _writable(cfg.dump_to)
    # Deferred: importing torch and timm takes seconds, and the checks above should not wait.
    from saev.record import vit as vitlib

    device = _device(cfg.device)
    _allow_tf32(cfg.tf32)
    vit = vitlib.load(cfg.model, device)
    blocks = vit.resolve_layers(cfg.layers)
    cls_token = vit.has_cls if cfg.cls_token is None else cfg.cls_token
    recorder = vitlib.Recorder(vit, blocks, cls_token)
    metadata = shard_metadata(cfg, vit, len(blocks), cls_token, dataset)
    with shards.ShardWriter(dump_to, metadata, patch_labels=dataset.has_patch_labels) as writer:
        if not writer.complete:
            start = _resume_at(writer, dataset)
            if start > 0:
                print(
                    f"resuming {writer.root} after {writer.n_done} recorded examples",
                    file=sys.stderr,
                )
            record_loop(cfg, vit, recorder, dataset, writer, start, device)
        writer.finish()
    recorder.close()
    return writer.root


def shard_metadata(
    cfg: RecordConfig, vit, n_layers: int, cls_token: bool, dataset
) -> shards.Metadata:
    """The shard directory's metadata; shards hold as many examples as fit in
    `max_patches_per_shard` token vectors (layers x tokens per example)."""
    n_vectors = n_layers * (vit.n_patches + int(cls_token))
    if cfg.max_patches_per_shard < n_vectors:
        raise RecordError(
            f"max_patches_per_shard={cfg.max_patches_per_shard} is below one example's "
            f"{n_vectors} token vectors (layers x tokens)."
        )
    return shards.Metadata(
        model=vit.description,
        layers=tuple(cfg.layers),
        cls_token=cls_token,
        n_patches_per_example=vit.n_patches,
        d_model=vit.d_model,
        dtype=cfg.dtype,
        n_examples=len(dataset),
        examples_per_shard=cfg.max_patches_per_shard // n_vectors,
        data=dataset.describe(),
        transform=crops.describe(vit.transform),
    )


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecordError(f"device={name} but CUDA is not available here; use device=cpu.")
    return torch.device(name)


def _allow_tf32(allow: bool) -> None:
    """TF32 matmuls and convolutions on Ampere and newer GPUs (no effect elsewhere): ~2-3x the
    float32 forward for a relative error around 1e-3, far below what an SAE reconstructs."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def _writable(dump_to: str) -> pathlib.Path:
    path = pathlib.Path(dump_to).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecordError(
            f"cannot create dump_to={dump_to} ({err.strerror}); choose a writable directory."
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RecordError(f"dump_to={dump_to} is not writable; choose a writable directory.")
    return path


def _resume_at(writer: shards.ShardWriter, dataset: images.Dataset) -> int:
    """Index of the first candidate image not yet on disk (after the last recorded example)."""
    if writer.n_done == 0:
        return 0
    last = shards.last_example_record(writer.root)
    import json

    try:
        return dataset.find(json.loads(last)) + 1
    except (KeyError, ValueError):
        raise RecordError(
            f"{writer.root} was recorded from other images than data.root now holds; move it away."
        ) from None


@dataclasses.dataclass
class Batch:
    x_BCHW: object
    """Decoded images (a torch tensor), or None when none in the batch could be read."""
    indices: list[int]
    """Candidate index of each row of `x_BCHW`."""
    labels_BP: np.ndarray | None
    errors: list[tuple[int, str]]
    """(candidate index, message) of each image that could not be read."""

    def pin_memory(self) -> Batch:
        """Called by `DataLoader(pin_memory=True)`, which leaves types it does not know in
        pageable memory; pinned, the copy to the GPU is asynchronous and overlaps the forward."""
        if self.x_BCHW is None:
            return self
        return dataclasses.replace(self, x_BCHW=self.x_BCHW.pin_memory())


def collate(samples) -> Batch:
    import torch

    good = [s for s in samples if s[3] is None]
    x = torch.stack([s[0] for s in good]) if good else None
    labels = np.stack([s[2] for s in good]) if good and good[0][2] is not None else None
    return Batch(
        x, [s[1] for s in good], labels, [(s[1], s[3]) for s in samples if s[3] is not None]
    )


def record_loop(cfg, vit, recorder, dataset, writer, start: int, device) -> None:
    """Decode, forward and write every candidate image from `start` on (`benchmarks/record.py`
    times this against the bare forward pass)."""
    import torch

    size = cfg.batch_size
    # Batches always cover [k * size, (k + 1) * size), resumed or not (see the module docstring).
    batches = [
        list(range(b, min(b + size, len(dataset))))
        for b in range(start // size * size, len(dataset), size)
    ]
    decoded = images.Decoded(dataset, vit.transform, vit.patch_size, vit.n_patches)
    loader = torch.utils.data.DataLoader(
        decoded,
        batch_sampler=batches,
        # More decoding processes than CPUs only adds contention.
        num_workers=min(cfg.n_workers, len(os.sched_getaffinity(0))),
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    bar = cli.progress(total=len(dataset), initial=start, unit="img")
    skipped: list[str] = []
    # Closing the bar on any exit ends its line, so an error message starts a line of its own.
    with bar, _BackgroundWriter(writer, cfg.dtype) as out:
        for batch in loader:
            errors = [msg for i, msg in batch.errors if i >= start]
            if errors and not getattr(cfg.data, "skip_bad_images", False):
                raise RecordError(
                    f"{errors[0]} (set data.skip_bad_images=true to skip unreadable images)"
                )
            skipped.extend(errors)
            if batch.x_BCHW is not None:
                acts_BLTD = recorder(batch.x_BCHW.to(device, non_blocking=True))
                keep = [j for j, i in enumerate(batch.indices) if i >= start]
                if keep:
                    host, done = to_host(acts_BLTD[keep[0] :], cfg.dtype)
                    labels = batch.labels_BP[keep[0] :] if batch.labels_BP is not None else None
                    out.add(host, done, [dataset.source(batch.indices[j]) for j in keep], labels)
            bar.update(sum(i >= start for i in batch.indices) + len(errors))
    if skipped:
        print(f"skipped {len(skipped)} unreadable images; the first: {skipped[0]}", file=sys.stderr)


def to_host(acts, dtype: str):
    """Activations narrowed to the storage dtype on their device, then copied to host memory.

    Narrowing on the device halves the transfer for 16-bit dtypes; torch rounds to nearest even
    like `shards.from_float32`, so the bytes are the same either way. On CUDA the copy goes to
    pinned memory without waiting, so the next batch's forward pass overlaps it; the returned
    event marks it done (None elsewhere). `host_array` turns the pair into numpy.
    """
    import torch

    narrow = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    acts = acts.to(narrow[dtype])
    if dtype == "bfloat16":
        acts = acts.view(torch.int16)  # numpy has no bfloat16: keep the bit patterns
    if acts.device.type != "cuda":
        return acts.cpu(), None
    host = torch.empty(acts.shape, dtype=acts.dtype, pin_memory=True)
    host.copy_(acts, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def host_array(host, done, dtype: str) -> np.ndarray:
    """The storage representation `ShardWriter.add` takes, once the copy to `host` is done."""
    if done is not None:
        done.synchronize()
    arr = host.numpy()
    return arr.view(np.uint16) if dtype == "bfloat16" else arr


class _BackgroundWriter:
    """Feeds `ShardWriter.add` from a thread, so waiting for device copies and copying and
    fsyncing shards overlap the next forward passes. A bounded queue keeps memory flat; errors
    surface on the next `add` or on exit."""

    def __init__(self, writer: shards.ShardWriter, dtype: str, depth: int = 4):
        self.writer, self.dtype = writer, dtype
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="shard-writer", daemon=True)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                host, done, examples, labels_NP = item
                try:
                    self.writer.add(host_array(host, done, self.dtype), examples, labels_NP)
                except BaseException as err:
                    self._error = err

    def add(self, host, done, examples: list[dict], labels_NP: np.ndarray | None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((host, done, examples, labels_NP))

    def __enter__(self) -> _BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
