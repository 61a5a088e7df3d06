"""The training data: loaders, `DataConfig` (the Hydra node `data`) and `ShardDataModule`.

`ShuffledLoader` (training) and `OrderedLoader` (evaluation, visualization) serve batches
`{"act": float32 [B, d_model], "example_idx": int64 [B], "token_idx": int64 [B]}` from a shard
directory (ours or the public saev's, see `saev.foreign_shards`); how they read at the speed of
the storage is described in `saev.loaders`. Normalization lives in `saev.normalization`: the
loaders serve raw activations and `ShardDataModule.norm_stats` says how the SAE normalizes them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys

import lightning as L
import numpy as np
import torch

from saev import shards
from saev.foreign_shards import open_shard_set
from saev.loaders import TOKENS, Layout, NonFiniteError, Pipeline, Source, select
from saev.normalization import NormStats, load_or_estimate_moments, stats_from_moments

__all__ = [
    "DataConfig",
    "NonFiniteError",
    "NormStats",
    "OrderedLoader",
    "ShardDataModule",
    "ShuffledLoader",
    "open_shard_set",
]

logger = logging.getLogger(__name__)


class _Loader:
    """What the shuffled and ordered loaders share: validation, buffer sizing, batch cutting."""

    def __init__(
        self,
        shard_root,
        layer: int,
        batch_size: int,
        tokens: str = "patches",
        *,
        examples=None,
        n_workers: int = 2,
        buffer_mb: float = 512,
        run_kb: float = 128,
        rank: int = 0,
        world_size: int = 1,
        skip_nonfinite: bool = False,
        pin_memory: bool | None = None,
    ):
        """`examples`: global example indices to read (default all); `buffer_mb`: the shuffle
        buffer, in storage dtype; `run_kb`: the smallest contiguous read worth cutting an example
        into; `rank`/`world_size`: this process's part of the stream; `pin_memory`: default is
        whether CUDA is available."""
        if isinstance(shard_root, shards.ShardSet):
            self.shard_set = shard_root
        else:
            self.shard_set = open_shard_set(shard_root)
        md = self.shard_set.metadata
        self.sel = select(md, layer, tokens)
        self.tokens, self.d_model, self.dtype = tokens, md.d_model, md.dtype
        if batch_size < 1 or n_workers < 0 or buffer_mb <= 0 or run_kb <= 0:
            got = f"got {batch_size}, {n_workers}, {buffer_mb}, {run_kb}"
            raise ValueError(f"need batch_size >= 1, n_workers >= 0, buffer_mb, run_kb > 0; {got}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.batch_size, self.n_workers = batch_size, n_workers
        # Reader processes actually started: the main process needs a core of its own (on 2 CPUs a
        # second worker only contended). The slots, and so the order, still follow n_workers.
        self.n_procs = min(n_workers, max(1, _usable_cpus() - 1))
        self.rank, self.world_size = rank, world_size
        self.skip_nonfinite = skip_nonfinite
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.examples = self._check_examples(examples, md.n_examples)
        row_bytes = md.d_model * shards.DTYPE_ITEMSIZE[md.dtype]  # the buffer holds storage dtype
        self.layout = Layout.make(self.sel, row_bytes, run_kb)
        # n_workers filling while one slot is being cut into batches and one waits ready.
        self.n_slots = n_workers + 2 if n_workers else 1
        self.units_per_fill = (
            int(buffer_mb * 2**20) // self.n_slots // (row_bytes * self.layout.run)
        )
        if self.units_per_fill < 1:
            need = math.ceil(self.n_slots * row_bytes * self.layout.run / 2**20)
            msg = f"buffer_mb={buffer_mb} cannot hold one run per slot ({self.n_slots} slots)"
            raise ValueError(f"{msg}; use buffer_mb >= {need}.")
        self.slot_rows = self.units_per_fill * self.layout.run
        self._pipeline: Pipeline | None = None
        self._pool: dict[np.dtype, list[np.ndarray]] = {}
        self.n_nonfinite = 0
        """Non-finite rows dropped so far (with skip_nonfinite)."""

    @staticmethod
    def _check_examples(examples, n_examples: int) -> np.ndarray:
        if examples is None:
            return np.arange(n_examples, dtype=np.int64)
        examples = np.unique(np.asarray(examples, dtype=np.int64))
        if len(examples) and (examples[0] < 0 or examples[-1] >= n_examples):
            raise ValueError(
                f"example indices must lie in [0, {n_examples}); got {examples[0]}..{examples[-1]}."
            )
        return examples

    def _tasks(self, units_in_order: np.ndarray, rng: np.random.Generator | None):
        """Lazily, `(units, perm_R)` per fill: consecutive units, sorted so that a worker reads in
        file order, and (when shuffling) where each of their rows goes in the slot."""
        U = self.units_per_fill
        for i in range(0, len(units_in_order), U):
            units = np.sort(units_in_order[i : i + U])
            n_rows = int(self.layout.decode(units)[2].sum())
            yield units, None if rng is None else rng.permutation(n_rows)

    def _new_batch(self) -> dict[str, torch.Tensor]:
        B, D = self.batch_size, self.d_model
        if self.pin_memory:
            # CUDA's caching host allocator recycles pinned blocks once their copies are done.
            act = torch.empty((B, D), pin_memory=True)
        else:
            act = torch.from_numpy(self._pooled(np.float32))
        ex = torch.empty(B, dtype=torch.int64)
        return {"act": act, "example_idx": ex, "token_idx": torch.empty(B, dtype=torch.int64)}

    def _pooled(self, dtype) -> np.ndarray:
        """A `[batch_size, d_model]` array that no live tensor uses any more, else a new one."""
        # Fresh 50 MB arrays cost page faults (~1.5 GB/s here). An array is free at refcount 2
        # (the pool list and getrefcount's argument); a live tensor or view of it adds one.
        pool = self._pool.setdefault(np.dtype(dtype), [])
        for i in range(len(pool)):
            if sys.getrefcount(pool[i]) == 2:
                return pool[i]
        arr = np.empty((self.batch_size, self.d_model), dtype=dtype)
        if len(pool) < 8:
            pool.append(arr)
        return arr

    def _cut(self, out, dst: slice, slot_t, ex_R, tok_R, rows, pos: int) -> None:
        """out[dst] <- rows `rows[pos:...]` of the slot (or its plain slice when rows is None)."""
        take = dst.stop - dst.start
        if rows is None:  # slots are already shuffled: plain slices
            _copy_1thread(out["act"][dst], slot_t[pos : pos + take])
            out["example_idx"][dst].copy_(ex_R[pos : pos + take])
            out["token_idx"][dst].copy_(tok_R[pos : pos + take])
            return
        r = rows[pos : pos + take]
        if slot_t.dtype == torch.float32:
            torch.index_select(slot_t, 0, r, out=out["act"][dst])
        else:  # gather the 16-bit rows, then up-cast them in one vectorized pass (rare: NaN)
            half = torch.from_numpy(self._pooled(shards.NUMPY_STORAGE_DTYPE[self.dtype]))[:take]
            half = half.view(slot_t.dtype)
            torch.index_select(slot_t, 0, r, out=half)
            out["act"][dst].copy_(half)
        torch.index_select(ex_R, 0, r, out=out["example_idx"][dst])
        torch.index_select(tok_R, 0, r, out=out["token_idx"][dst])

    def _batches(self, tasks):
        if self._pipeline is None:
            source = Source(self.shard_set, self.layout)
            self._pipeline = Pipeline(
                source, self.d_model, self.slot_rows, self.n_slots, self.n_procs
            )
        B = self.batch_size
        out, filled, n_bad = None, 0, 0
        for slot_RD, units, perm_R, (bad, where, mask) in self._pipeline.run(tasks):
            if bad and not self.skip_nonfinite:
                raise NonFiniteError(
                    f"NaN/inf activation in {self.shard_set.root}/{where}; re-record that shard or "
                    "set data.skip_nonfinite=true to drop such tokens."
                )
            n_bad += bad
            per_row = [*self.layout.rows(units), *([] if mask is None else [mask])]
            if perm_R is not None:  # the workers scattered the rows: follow them to the slot
                per_row = [_scatter(x, perm_R) for x in per_row]
            ex_R, tok_R = torch.from_numpy(per_row[0]), torch.from_numpy(per_row[1])
            slot_t = torch.from_numpy(slot_RD[: len(ex_R)])
            slot_t = slot_t.view(torch.bfloat16) if self.dtype == "bfloat16" else slot_t
            rows = None if mask is None else torch.from_numpy(np.flatnonzero(per_row[2]))
            n_valid, pos = len(slot_t) if rows is None else len(rows), 0
            while pos < n_valid:
                if out is None:
                    out, filled = self._new_batch(), 0
                take = min(B - filled, n_valid - pos)
                self._cut(out, slice(filled, filled + take), slot_t, ex_R, tok_R, rows, pos)
                filled, pos = filled + take, pos + take
                if filled == B:
                    yield out
                    out = None
        if out is not None:
            yield {k: v[:filled] for k, v in out.items()}
        self.n_nonfinite += n_bad
        if n_bad:
            msg = "Dropped %d non-finite activations this epoch (data.skip_nonfinite=true)."
            logger.warning(msg, n_bad)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the program exits)."""
        if getattr(self, "_pipeline", None) is not None:
            self._pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # At interpreter exit the queues may be gone; multiprocessing then ends the daemon workers.
        try:
            self.close()
        except Exception:
            pass


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Torch runs an element-wise op inline (no OpenMP threads) below this many elements.
_INLINE_NUMEL = 32768


def _copy_1thread(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src (up-casting 16-bit floats) on this thread only.

    torch's multi-threaded copy_ spins its OpenMP threads on the cores the loader's workers need
    (on 2 cores it doubled the main process's CPU time for no gain in wall time). float32 goes
    through numpy's single-threaded copy; float16/bfloat16 through torch's vectorized conversion,
    in pieces small enough that torch does not parallelize them (numpy's float16 cast is ~5x
    slower).
    """
    if src.dtype == dst.dtype:
        np.copyto(dst.numpy(), src.numpy())
        return
    step = max(1, _INLINE_NUMEL // max(1, src[0].numel())) if len(src) else 1
    for i in range(0, len(src), step):
        dst[i : i + step].copy_(src[i : i + step])


def _scatter(x_R: np.ndarray, perm_R: np.ndarray) -> np.ndarray:
    out = np.empty_like(x_R)
    out[perm_R] = x_R
    return out


class ShuffledLoader(_Loader):
    """One epoch of batches per iteration, in a fresh random order each epoch (see module doc).

    Each batch is `{"act": float32 [B, d_model], "example_idx": int64 [B], "token_idx": int64 [B]}`;
    `token_idx` is the token's position in its stored example (CLS, when recorded, is 0). The order
    depends on (seed, epoch) and the buffer layout (buffer_mb, n_workers, run_kb). Under DDP each
    rank takes a disjoint `len(examples) // world_size` examples of the epoch's permutation (the
    few left over vary by epoch), so every rank yields the same number of batches. Keyword
    arguments are those of `_Loader.__init__`.
    """

    def __init__(self, shard_root, layer: int, batch_size: int, tokens="patches", seed=0, **kw):
        super().__init__(shard_root, layer, batch_size, tokens, **kw)
        self.seed = seed
        self.epoch = 0
        """Epochs started so far; the next iteration's order depends on (seed, epoch)."""
        self.n_examples_per_rank = len(self.examples) // self.world_size
        if self.n_examples_per_rank == 0:
            msg = f"{len(self.examples)} examples cannot be split over {self.world_size} ranks."
            raise ValueError(msg)

    def __len__(self) -> int:
        return math.ceil(self.n_examples_per_rank * self.sel.n_tokens / self.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        n = self.n_examples_per_rank
        mine = np.random.default_rng([self.seed, epoch]).permutation(self.examples)
        mine = mine[self.rank * n : (self.rank + 1) * n]
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        return self._batches(self._tasks(rng.permutation(self.layout.units(mine)), rng))


class OrderedLoader(_Loader):
    """Batches in disk order (example, then token), for evaluation and visualization.

    Same arguments (but no seed) and batch contents as `ShuffledLoader`. Under DDP each rank reads
    a contiguous part of the examples (parts differ in size by at most one example).
    """

    @property
    def mine(self) -> np.ndarray:
        return np.array_split(self.examples, self.world_size)[self.rank]

    def __len__(self) -> int:
        return math.ceil(len(self.mine) * self.sel.n_tokens / self.batch_size)

    def __iter__(self):
        return self._batches(self._tasks(self.layout.units(self.mine), None))


# The train/val split must not move when data.seed changes (seed is an SAE-side sweep axis).
SPLIT_SEED = 0x5AE5


@dataclasses.dataclass
class DataConfig:
    """What to read and how (`conf/train.yaml`, node `data`)."""

    shard_root: str
    """Shard directory (the one holding metadata.json), ours or the public saev's."""
    layer: int
    """Layer to train on, as recorded (negative allowed, as in metadata.json)."""
    tokens: str = "patches"
    """"patches", "cls" or "all" (CLS plus patches)."""
    batch_size: int = 16384
    """Global batch size in tokens; each of N DDP ranks gets batch_size // N."""
    seed: int = 0
    """Seed of the shuffle order (epoch e uses (seed, e)); the split does not depend on it."""
    n_workers: int = 2
    """Reader processes filling the shuffle buffer; 0 reads in the main process. At most (CPUs - 1)
    processes start; the buffer layout (and so the order) follows n_workers regardless."""
    buffer_mb: int = 512
    """Shuffle buffer (MiB, storage dtype): a batch mixes ~buffer_mb / (n_workers + 2) of it (~890
    images per batch for ViT-B/16 float32 at 512 MiB; see saev.loaders)."""
    val_fraction: float = 0.01
    """Fraction of examples (images) held out for validation, chosen at random; 0 for none."""
    n_stats_examples: int = 1024
    """Train examples sampled to estimate the normalization statistics."""
    scale_mean: bool = False
    """Subtract the train mean activation."""
    scale_norm: bool = True
    """Scale so normalized activations have mean squared norm d_model (unit variance per dimension
    on average), the scale at which published sparsity coefficients apply (docs/training.md)."""
    skip_nonfinite: bool = False
    """Drop (and count) NaN/inf activations instead of stopping with an error."""

    def __post_init__(self):
        if self.tokens not in TOKENS:
            raise ValueError(f"data.tokens={self.tokens!r} must be one of {TOKENS}.")
        if (
            self.batch_size < 1
            or self.buffer_mb < 1
            or self.n_workers < 0
            or self.n_stats_examples < 1
        ):
            raise ValueError(
                f"data.batch_size ({self.batch_size}), data.buffer_mb ({self.buffer_mb}) and "
                f"data.n_stats_examples ({self.n_stats_examples}) must be >= 1 and data.n_workers "
                f"({self.n_workers}) >= 0."
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in [0, 1).")


def split_examples(n_examples: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) example indices, sorted and disjoint; val is a seeded random subset."""
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_examples))
    if n_val >= n_examples:
        raise ValueError(
            f"data.val_fraction={val_fraction} leaves no train examples out of {n_examples}."
        )
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_examples)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(L.LightningDataModule):
    """Train/val loaders over one layer of a shard directory, plus normalization statistics.

    Run Lightning with `use_distributed_sampler=False`: under DDP each rank reads its own part of
    the stream (rank and world size from torch.distributed) with batch_size // world_size. With
    CUDA, batches come in pinned memory, so Lightning's move to the device (`non_blocking=True`)
    overlaps with the step.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DataConfig) else DataConfig(**dict(cfg))
        self.shard_set: shards.ShardSet | None = None
        self.norm_stats: NormStats | None = None
        self._train_loader = self._val_loader = None
        self._train_epoch = 0

    def setup(self, stage: str | None = None) -> None:
        if self.shard_set is not None:
            return
        cfg = self.cfg
        shard_set = open_shard_set(cfg.shard_root)
        select(shard_set.metadata, cfg.layer, cfg.tokens)  # bad layer/tokens fail here, not mid-fit
        self.rank, self.world_size = _dist()
        if cfg.batch_size % self.world_size:
            raise ValueError(
                f"data.batch_size={cfg.batch_size} is not divisible by the {self.world_size} ranks."
            )
        self.batch_size = cfg.batch_size // self.world_size
        self.train_examples, self.val_examples = split_examples(
            shard_set.metadata.n_examples, cfg.val_fraction
        )
        if len(self.train_examples) < self.world_size:
            raise ValueError(
                f"{len(self.train_examples)} train examples cannot be split over "
                f"{self.world_size} ranks; lower data.val_fraction."
            )
        if cfg.scale_mean or cfg.scale_norm:
            moments = load_or_estimate_moments(
                shard_set.root, cfg.layer, cfg.tokens, self.train_examples, cfg.n_stats_examples,
                lambda sample: OrderedLoader(
                    shard_set, cfg.layer, 65536, cfg.tokens, examples=sample, n_workers=0,
                    buffer_mb=64, skip_nonfinite=cfg.skip_nonfinite, pin_memory=False,
                ),
                shard_set.metadata.d_model,
            )  # fmt: skip
            self.norm_stats = stats_from_moments(
                moments, shard_set.metadata.d_model, cfg.scale_mean, cfg.scale_norm
            )
        else:
            self.norm_stats = NormStats(torch.zeros(shard_set.metadata.d_model), 1.0)
        self.shard_set = shard_set

    @property
    def metadata(self) -> shards.Metadata:
        self._require_setup()
        return self.shard_set.metadata

    @property
    def d_model(self) -> int:
        return self.metadata.d_model

    def _require_setup(self) -> None:
        if self.shard_set is None:
            raise RuntimeError("call ShardDataModule.setup() first.")

    def _common(self) -> dict:
        cfg = self.cfg
        return dict(
            layer=cfg.layer, batch_size=self.batch_size, tokens=cfg.tokens, n_workers=cfg.n_workers,
            rank=self.rank, world_size=self.world_size, skip_nonfinite=cfg.skip_nonfinite,
        )  # fmt: skip

    def train_dataloader(self) -> ShuffledLoader:
        """Raw activations, one epoch per iteration; the same loader (and workers) every epoch."""
        self._require_setup()
        if self._train_loader is None:
            self._train_loader = ShuffledLoader(
                self.shard_set,
                seed=self.cfg.seed,
                examples=self.train_examples,
                buffer_mb=self.cfg.buffer_mb,
                **self._common(),
            )
            self._train_loader.epoch = self._train_epoch
        return self._train_loader

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints, so that a resumed run continues the epoch sequence."""
        epoch = self._train_epoch if self._train_loader is None else self._train_loader.epoch
        return {"train_epoch": epoch}

    def load_state_dict(self, state: dict) -> None:
        self._train_epoch = int(state["train_epoch"])
        if self._train_loader is not None:
            self._train_loader.epoch = self._train_epoch

    def val_dataloader(self) -> OrderedLoader | list:
        """Ordered batches over the held-out examples only ([] when val_fraction is 0)."""
        self._require_setup()
        if len(self.val_examples) == 0:
            return []
        if self._val_loader is None:
            buffer_mb = min(self.cfg.buffer_mb, 256)
            self._val_loader = OrderedLoader(
                self.shard_set, examples=self.val_examples, buffer_mb=buffer_mb, **self._common()
            )
        return self._val_loader

    def teardown(self, stage: str | None = None) -> None:
        for loader in (self._train_loader, self._val_loader):
            if loader is not None:
                loader.close()
