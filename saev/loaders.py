"""Shuffled and ordered activation loaders that read shards at the speed of the storage.

How the shuffled loader works (DESIGN.md, "Training"):

- An epoch is a random permutation of the selected examples (images). It is cut into *fills* of
  `examples_per_fill` examples each; a fill is the unit of work of a worker process.
- The shuffle buffer (`buffer_mb`, float32 after up-casting) is one shared-memory array split into
  `n_workers + 2` equal *slots*. Worker processes (forked, so start-up costs milliseconds) fill
  slots in parallel: for each example of its fill, sorted by file position, a worker copies the
  selected tokens of the chosen layer, one contiguous run of `tokens x d_model` values, straight
  out of a read-only memmap of the shard (opened once per worker), up-casting float16/bfloat16
  on the way, and checks the run for NaN/inf while it is still in cache.
- The main process takes slots in order, permutes each slot's rows and cuts batches from them
  with vectorized `index_select` (a batch may span slots); a finished slot goes straight back to
  the workers with the next fill, so reading overlaps batching.

Shuffle quality is what a slot buys: a batch draws uniformly from the rows of one slot (two at a
slot boundary), which hold the tokens of `examples_per_fill = slot_rows // tokens_per_example`
random examples. For 768-d float32, 196 patches and `buffer_mb=1024` with 2 workers (4 slots of
256 MiB), that is ~445 examples per slot, so a batch of 16384 tokens draws from ~445 distinct
images (~37 tokens each); halving the buffer halves it. Every selected token appears exactly once
per epoch, and the order of examples across the whole epoch is uniformly random.
`tests/test_loaders.py` checks these figures.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import multiprocessing as mp
import queue
import sys
import traceback

import numpy as np
import torch

from saev import shards
from saev.foreign_shards import open_shard_set

logger = logging.getLogger(__name__)

TOKENS = ("patches", "cls", "all")
# Below this many bytes per example run, one fancy-indexed read per shard beats a loop of copies.
SMALL_RUN_BYTES = 64 * 1024


class NonFiniteError(shards.ShardError, ValueError):
    """An activation is NaN or inf; the message names the shard file and example."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which rows of each example a loader reads: tokens `[t0, t1)` of one layer."""

    layer: int
    layer_i: int
    t0: int
    t1: int

    @property
    def n_tokens(self) -> int:
        return self.t1 - self.t0


def select(md: shards.Metadata, layer: int, tokens: str) -> Selection:
    """Resolve a recorded layer and a token selection; clear errors for what the shards lack."""
    if tokens not in TOKENS:
        raise ValueError(f"tokens={tokens!r} is not one of {TOKENS}.")
    layer_i = md.layer_index(int(layer))
    n = md.n_tokens_per_example
    if tokens == "cls":
        if not md.cls_token:
            raise shards.ShardError(
                "tokens='cls' but these shards have no CLS token; use tokens='patches' or 'all'."
            )
        return Selection(int(layer), layer_i, 0, 1)
    if tokens == "patches":
        return Selection(int(layer), layer_i, int(md.cls_token), n)
    return Selection(int(layer), layer_i, 0, n)


class Source:
    """Copies the selected rows of a sorted list of examples into a float32 `[rows, d_model]` array.

    Lives in each worker process; memmaps are opened once per shard and per process, read-only.
    """

    def __init__(self, shard_set: shards.ShardSet, sel: Selection):
        self.shard_set, self.sel = shard_set, sel
        self.dtype = shard_set.metadata.dtype
        self.starts = np.array([f.first_example for f in shard_set.files], dtype=np.int64)
        self._memmaps: dict[int, np.memmap] = {}
        self._staging: np.ndarray | None = None

    def _memmap(self, i: int) -> np.memmap:
        if i not in self._memmaps:
            self._memmaps[i] = self.shard_set.memmap(i)
        return self._memmaps[i]

    def _convert(self, src: np.ndarray, dst: np.ndarray) -> None:
        """dst (float32) <- src (storage dtype), same shape."""
        if self.dtype == "float32":
            np.copyto(dst, src)
            return
        # numpy's half->float is ~1.6 GB/s here, torch's is ~14 GB/s; stage the 16-bit values in a
        # reused writable array first because torch refuses read-only memmaps.
        if self._staging is None or self._staging.size < src.size:
            self._staging = np.empty(src.size, dtype=src.dtype)
        staged = self._staging[: src.size].reshape(src.shape)
        np.copyto(staged, src)
        staged_t = torch.from_numpy(staged)
        if self.dtype == "bfloat16":
            staged_t = staged_t.view(torch.bfloat16)
        torch.from_numpy(dst).copy_(staged_t)

    def fill(
        self, examples: np.ndarray, dst_RD: np.ndarray
    ) -> tuple[int, str | None, np.ndarray | None]:
        """Fill `dst_RD[: len(examples) * n_tokens]`; examples are global indices, ascending.

        Returns (number of non-finite rows, a description of the first one, a mask of finite
        rows or None when all are finite).
        """
        sel, T = self.sel, self.sel.n_tokens
        dst_NTD = dst_RD[: len(examples) * T].reshape(len(examples), T, -1)
        file_i = np.searchsorted(self.starts, examples, side="right") - 1
        bounds = np.flatnonzero(np.diff(file_i)) + 1
        suspect = []
        run_bytes = T * dst_NTD.shape[-1] * shards.DTYPE_ITEMSIZE[self.dtype]
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(examples)]):
            i = int(file_i[a])
            mm, local = self._memmap(i), examples[a:b] - self.starts[i]
            if run_bytes < SMALL_RUN_BYTES:
                self._convert(mm[local, sel.layer_i, sel.t0 : sel.t1], dst_NTD[a:b])
                if not np.isfinite(dst_NTD[a:b].sum()):
                    suspect.append((a, b))
                continue
            # Consecutive examples form one strided copy; a random fill is mostly single examples.
            breaks = np.flatnonzero(np.diff(local) != 1) + 1
            for c, d in zip(np.r_[0, breaks], np.r_[breaks, len(local)]):
                out = dst_NTD[a + c : a + d]
                self._convert(mm[local[c] : local[d - 1] + 1, sel.layer_i, sel.t0 : sel.t1], out)
                # One sum per run while it is in cache: NaN, inf (and overflow) make it non-finite.
                if not np.isfinite(out.sum()):
                    suspect.append((a + c, a + d))
        if not suspect:
            return 0, None, None
        return self._locate_nonfinite(examples, dst_NTD, suspect)

    def _locate_nonfinite(self, examples, dst_NTD, suspect):
        finite_NT = np.ones(dst_NTD.shape[:2], dtype=bool)
        for a, b in suspect:
            finite_NT[a:b] = np.isfinite(dst_NTD[a:b]).all(axis=-1)
        bad = np.argwhere(~finite_NT)
        if len(bad) == 0:  # the sums overflowed but every value is finite
            return 0, None, None
        n, t = (int(x) for x in bad[0])
        ex = int(examples[n])
        f = self.shard_set.files[int(np.searchsorted(self.starts, ex, side="right") - 1)]
        where = (
            f"{f.path.name} (example {ex}, #{ex - f.first_example} in that file; token "
            f"{self.sel.t0 + t}; layer {self.sel.layer})"
        )
        return len(bad), where, finite_NT.reshape(-1)


def _worker_main(source: Source, buf, d_model: int, slot_rows: int, tasks, results) -> None:
    # One intra-op thread: the parallelism is across workers, and OpenMP is not fork-safe.
    torch.set_num_threads(1)
    slots = np.frombuffer(buf, dtype=np.float32).reshape(-1, slot_rows, d_model)
    while True:
        msg = tasks.get()
        if msg is None:
            return
        gen, j, slot, examples = msg
        try:
            results.put((gen, j, source.fill(examples, slots[slot]), None))
        except BaseException:
            results.put((gen, j, None, traceback.format_exc()))


class Pipeline:
    """Worker processes filling the slots of a shared buffer; yields filled slots in task order."""

    def __init__(self, source: Source, d_model: int, slot_rows: int, n_slots: int, n_workers: int):
        self.source, self.d_model, self.slot_rows = source, d_model, slot_rows
        self.n_slots, self.n_workers = n_slots, n_workers
        self._buf = mmap.mmap(
            -1, n_slots * slot_rows * d_model * 4
        )  # MAP_SHARED: seen by forked workers
        self.slots = np.frombuffer(self._buf, dtype=np.float32).reshape(n_slots, slot_rows, d_model)
        self._procs: list = []
        self._gen = 0
        self._outstanding = 0

    def _start(self) -> None:
        ctx = mp.get_context("fork")  # ms to start, like torch's DataLoader workers on Linux
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        for _ in range(self.n_workers):
            args = (
                self.source,
                self._buf,
                self.d_model,
                self.slot_rows,
                self._tasks,
                self._results,
            )
            p = ctx.Process(target=_worker_main, args=args, daemon=True)
            p.start()
            self._procs.append(p)

    def _get(self):
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in self._procs if not p.is_alive()]
                if dead:
                    self.close()
                    msg = f"a loader worker died (exit code {dead[0]})"
                    raise RuntimeError(f"{msg}; out of memory? lower buffer_mb.") from None

    def _drain(self) -> None:
        """Wait for fills of an abandoned epoch so that no worker still writes into a slot."""
        while self._outstanding > 0:
            self._get()
            self._outstanding -= 1

    def run(self, fills: list[np.ndarray]):
        """Yield `(slot_RD, examples, fill_result)` for each fill, in order."""
        if self.n_workers == 0:
            for j, examples in enumerate(fills):
                slot = self.slots[j % self.n_slots]
                yield slot, examples, self.source.fill(examples, slot)
            return
        if not self._procs:
            self._start()
        self._drain()
        self._gen += 1
        gen, ready = self._gen, {}

        def submit(j):
            self._tasks.put((gen, j, j % self.n_slots, fills[j]))
            self._outstanding += 1

        for j in range(min(len(fills), self.n_slots)):
            submit(j)
        try:
            for j in range(len(fills)):
                while j not in ready:
                    g, k, result, err = self._get()
                    self._outstanding -= 1
                    if err is not None:
                        raise RuntimeError(f"loader worker failed:\n{err}")
                    if g == gen:
                        ready[k] = result
                yield self.slots[j % self.n_slots], fills[j], ready.pop(j)
                if self._gen != gen:
                    raise RuntimeError("abandoned iterator: a newer epoch started on this loader.")
                if j + self.n_slots < len(fills):
                    submit(j + self.n_slots)
        finally:
            if self._gen == gen:  # a newer epoch already drained this one's fills
                self._drain()

    def close(self) -> None:
        for _ in self._procs:
            self._tasks.put(None)
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self._procs = []


class _Loader:
    """What the shuffled and ordered loaders share: validation, slot sizing, batch cutting."""

    def __init__(
        self,
        shard_root,
        layer: int,
        batch_size: int,
        tokens: str,
        *,
        examples=None,
        n_workers: int,
        buffer_mb: float,
        rank: int,
        world_size: int,
        skip_nonfinite: bool,
        pin_memory: bool | None,
    ):
        if isinstance(shard_root, shards.ShardSet):
            self.shard_set = shard_root
        else:
            self.shard_set = open_shard_set(shard_root)
        md = self.shard_set.metadata
        self.sel = select(md, layer, tokens)
        self.tokens, self.d_model = tokens, md.d_model
        if batch_size < 1 or n_workers < 0 or buffer_mb <= 0:
            got = f"got {batch_size}, {n_workers}, {buffer_mb}"
            raise ValueError(f"need batch_size >= 1, n_workers >= 0, buffer_mb > 0; {got}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.batch_size, self.n_workers, self.rank, self.world_size = (
            batch_size,
            n_workers,
            rank,
            world_size,
        )
        self.skip_nonfinite = skip_nonfinite
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.examples = self._check_examples(examples, md.n_examples)
        # n_workers filling while one slot is being cut into batches and one waits ready.
        self.n_slots = n_workers + 2 if n_workers else 1
        row_bytes = md.d_model * 4
        self.examples_per_fill = (
            int(buffer_mb * 2**20) // self.n_slots // (row_bytes * self.sel.n_tokens)
        )
        if self.examples_per_fill < 1:
            need = math.ceil(self.n_slots * row_bytes * self.sel.n_tokens / 2**20)
            msg = f"buffer_mb={buffer_mb} cannot hold one example per slot ({self.n_slots} slots)"
            raise ValueError(f"{msg}; use buffer_mb >= {need}.")
        self.slot_rows = self.examples_per_fill * self.sel.n_tokens
        self._pipeline: Pipeline | None = None
        self._pool: list[np.ndarray] = []
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

    def _fills(self, examples_in_order: np.ndarray) -> list[np.ndarray]:
        E = self.examples_per_fill
        return [np.sort(examples_in_order[i : i + E]) for i in range(0, len(examples_in_order), E)]

    def _new_batch(self) -> dict[str, torch.Tensor]:
        B, D = self.batch_size, self.d_model
        if self.pin_memory:
            act = torch.empty(
                (B, D), pin_memory=True
            )  # CUDA's caching host allocator recycles these
        else:
            act = torch.from_numpy(self._pooled())
        ex = torch.empty(B, dtype=torch.int64)
        return {"act": act, "example_idx": ex, "token_idx": torch.empty(B, dtype=torch.int64)}

    def _pooled(self) -> np.ndarray:
        # Fresh 50 MB arrays cost page faults (~1.7 GB/s here); reuse one nobody references any more
        # (refcount 2: the pool list and getrefcount's argument; a live batch tensor adds one).
        for i in range(len(self._pool)):
            if sys.getrefcount(self._pool[i]) == 2:
                return self._pool[i]
        arr = np.empty((self.batch_size, self.d_model), dtype=np.float32)
        if len(self._pool) < 8:
            self._pool.append(arr)
        return arr

    def _batches(self, fills: list[np.ndarray], gen: torch.Generator | None):
        if self._pipeline is None:
            source = Source(self.shard_set, self.sel)
            self._pipeline = Pipeline(
                source, self.d_model, self.slot_rows, self.n_slots, self.n_workers
            )
        B, T = self.batch_size, self.sel.n_tokens
        tok_T = torch.arange(self.sel.t0, self.sel.t1, dtype=torch.int64)
        out, filled, n_bad = None, 0, 0
        for slot_RD, examples, (bad, where, mask) in self._pipeline.run(fills):
            if bad and not self.skip_nonfinite:
                raise NonFiniteError(
                    f"NaN/inf activation in {self.shard_set.root}/{where}; re-record that shard or "
                    "set data.skip_nonfinite=true to drop such tokens."
                )
            n_bad += bad
            slot_t = torch.from_numpy(slot_RD[: len(examples) * T])
            ex_R = torch.from_numpy(examples).repeat_interleave(T)
            tok_R = tok_T.repeat(len(examples))
            rows = None if mask is None else torch.from_numpy(np.flatnonzero(mask))
            n_valid = len(slot_t) if rows is None else len(rows)
            if gen is not None:
                perm = torch.randperm(n_valid, generator=gen)
                rows = perm if rows is None else rows[perm]
            pos = 0
            while pos < n_valid:
                if out is None:
                    out, filled = self._new_batch(), 0
                take = min(B - filled, n_valid - pos)
                dst = slice(filled, filled + take)
                if rows is None:  # ordered and all finite: plain slices
                    out["act"][dst].copy_(slot_t[pos : pos + take])
                    out["example_idx"][dst].copy_(ex_R[pos : pos + take])
                    out["token_idx"][dst].copy_(tok_R[pos : pos + take])
                else:
                    r = rows[pos : pos + take]
                    torch.index_select(slot_t, 0, r, out=out["act"][dst])
                    torch.index_select(ex_R, 0, r, out=out["example_idx"][dst])
                    torch.index_select(tok_R, 0, r, out=out["token_idx"][dst])
                filled, pos = filled + take, pos + take
                if filled == B:
                    yield out
                    out = None
        if out is not None:
            yield {k: v[:filled] for k, v in out.items()}
        self.n_nonfinite += n_bad
        if n_bad:
            logger.warning(
                "Dropped %d non-finite activations this epoch (data.skip_nonfinite=true).", n_bad
            )

    def close(self) -> None:
        """Stop the worker processes (they also stop when the program exits)."""
        if getattr(self, "_pipeline", None) is not None:
            self._pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


class ShuffledLoader(_Loader):
    """One epoch of batches per iteration, in a fresh random order each epoch (see module doc).

    Each batch is `{"act": float32 [B, d_model], "example_idx": int64 [B], "token_idx": int64 [B]}`;
    `token_idx` is the token's position in its stored example (CLS, when recorded, is 0). Under DDP
    each rank takes a disjoint `len(examples) // world_size` examples of the epoch's permutation
    (the few left over vary by epoch), so every rank yields the same number of batches.
    """

    def __init__(
        self,
        shard_root,
        layer: int,
        batch_size: int,
        tokens: str = "patches",
        seed: int = 0,
        *,
        examples=None,
        n_workers: int = 2,
        buffer_mb: float = 1024,
        rank: int = 0,
        world_size: int = 1,
        skip_nonfinite: bool = False,
        pin_memory: bool | None = None,
    ):
        super().__init__(
            shard_root, layer, batch_size, tokens, examples=examples, n_workers=n_workers,
            buffer_mb=buffer_mb, rank=rank, world_size=world_size,
            skip_nonfinite=skip_nonfinite, pin_memory=pin_memory,
        )  # fmt: skip
        self.seed = seed
        self.epoch = 0
        """Epochs started so far; the next iteration's order depends on (seed, epoch)."""
        self.n_examples_per_rank = len(self.examples) // world_size
        if self.n_examples_per_rank == 0:
            raise ValueError(
                f"{len(self.examples)} examples cannot be split over {world_size} ranks."
            )

    def __len__(self) -> int:
        return math.ceil(self.n_examples_per_rank * self.sel.n_tokens / self.batch_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        rng = np.random.default_rng([self.seed, epoch])
        n = self.n_examples_per_rank
        mine = rng.permutation(self.examples)[self.rank * n : (self.rank + 1) * n]
        row_seed = int(np.random.default_rng([self.seed, epoch, self.rank]).integers(2**62))
        return self._batches(self._fills(mine), torch.Generator().manual_seed(row_seed))


class OrderedLoader(_Loader):
    """Batches in disk order (example, then token), for evaluation and visualization.

    Same arguments and batch contents as `ShuffledLoader`. Under DDP each rank reads a contiguous
    part of the examples (parts differ in size by at most one example).
    """

    def __init__(
        self,
        shard_root,
        layer: int,
        batch_size: int,
        tokens: str = "patches",
        *,
        examples=None,
        n_workers: int = 2,
        buffer_mb: float = 256,
        rank: int = 0,
        world_size: int = 1,
        skip_nonfinite: bool = False,
        pin_memory: bool | None = None,
    ):
        super().__init__(
            shard_root, layer, batch_size, tokens, examples=examples, n_workers=n_workers,
            buffer_mb=buffer_mb, rank=rank, world_size=world_size,
            skip_nonfinite=skip_nonfinite, pin_memory=pin_memory,
        )  # fmt: skip
        self.mine = np.array_split(self.examples, world_size)[rank]

    def __len__(self) -> int:
        return math.ceil(len(self.mine) * self.sel.n_tokens / self.batch_size)

    def __iter__(self):
        return self._batches(self._fills(self.mine), None)
