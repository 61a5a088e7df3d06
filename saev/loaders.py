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
HALF_EXPONENT = {"float16": 0x7C00, "bfloat16": 0x7F80}


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


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an epoch is cut into *units*: runs of `run` consecutive selected tokens of one example.

    Unit `u` is run `u % n_runs` of example `u // n_runs`; the last run of an example may be
    shorter. Runs are contiguous in the file, and at least `run_kb` long where an example allows,
    so reads stay large while a buffer mixes many more examples than whole examples would.
    """

    sel: Selection
    run: int
    n_runs: int

    @classmethod
    def make(cls, sel: Selection, row_bytes: int, run_kb: float) -> Layout:
        n_runs = max(1, min(sel.n_tokens, int(sel.n_tokens * row_bytes // (run_kb * 1024))))
        run = math.ceil(sel.n_tokens / n_runs)
        return cls(sel, run, math.ceil(sel.n_tokens / run))

    def units(self, examples: np.ndarray) -> np.ndarray:
        return (examples[:, None] * self.n_runs + np.arange(self.n_runs)).reshape(-1)

    def decode(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(example, first token, number of tokens) of each unit."""
        start = self.sel.t0 + (units % self.n_runs) * self.run
        return units // self.n_runs, start, np.minimum(self.run, self.sel.t1 - start)

    def rows(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """example_idx and token_idx of each row that `units` fill, in fill order."""
        ex_U, start_U, len_U = self.decode(units)
        first_U = np.cumsum(len_U) - len_U
        tok_R = np.arange(int(len_U.sum())) + np.repeat(start_U - first_U, len_U)
        return np.repeat(ex_U, len_U), tok_R


class Source:
    """Copies the rows of a sorted list of units into a `[rows, d_model]` array.

    Values stay in the storage dtype (float16/bfloat16 are up-cast when batches are cut, which
    halves the work here and doubles the rows a buffer holds). Lives in each worker process;
    memmaps are opened once per shard and per process, read-only.
    """

    def __init__(self, shard_set: shards.ShardSet, layout: Layout):
        self.shard_set, self.layout = shard_set, layout
        md = shard_set.metadata
        self.dtype, self.n_layers, self.n_tokens = md.dtype, md.n_layers, md.n_tokens_per_example
        self.starts = np.array([f.first_example for f in shard_set.files], dtype=np.int64)
        self._flat: dict[int, np.ndarray] = {}

    def _rows_of(self, i: int) -> np.ndarray:
        """Shard i as a read-only `[examples * layers * tokens, d_model]` view."""
        if i not in self._flat:
            mm = self.shard_set.memmap(i).reshape(-1, self.shard_set.metadata.d_model)
            self._flat[i] = mm.view(
                np.ndarray
            )  # plain ndarray: slicing skips memmap's Python hooks
        return self._flat[i]

    def _finite_sum(self, x: np.ndarray) -> bool:
        """False if x holds NaN or inf (or, rarely, finite float32 values whose sum overflows)."""
        if self.dtype == "float32":
            return bool(np.isfinite(x.sum()))
        # 16-bit floats: NaN and inf have an all-ones exponent, the largest magnitudes' bits.
        # (numpy sums float16 in software, and torch's float16 sum is slower still.)
        return int(np.bitwise_and(x.view(np.uint16), 0x7FFF).max()) < HALF_EXPONENT[self.dtype]

    def fill(self, units: np.ndarray, dst_RD: np.ndarray, perm_R: np.ndarray | None = None):
        """Copy the rows of `units` (ascending) into `dst_RD`: row r of the fill goes to
        `perm_R[r]`, or to r without a permutation. Returns `check`'s result."""
        ex_U, start_U, len_U = self.layout.decode(units)
        file_U = np.searchsorted(self.starts, ex_U, side="right") - 1
        src_U = (ex_U - self.starts[file_U]) * self.n_layers + self.layout.sel.layer_i
        src_U = src_U * self.n_tokens + start_U  # first row of each unit in its file's flat view
        dst_U = np.cumsum(len_U) - len_U
        n_rows, suspect = int(len_U.sum()), []

        def put(r0: int, r1: int, src_rows: np.ndarray) -> None:
            if perm_R is None:
                np.copyto(dst_RD[r0:r1], src_rows)
            else:  # the shuffle itself: scattering here spares the main process a gather
                dst_RD[perm_R[r0:r1]] = src_rows
            # One sum per range while it is in cache: NaN, inf (and overflow) make it non-finite.
            if not self._finite_sum(src_rows):
                suspect.append((r0, r1))

        if len_U.max() * dst_RD[0].nbytes < SMALL_RUN_BYTES:
            # Short runs (CLS only): one vectorized gather per file instead of a loop of copies.
            src_R = np.repeat(src_U - dst_U, len_U) + np.arange(n_rows)
            bounds = np.r_[0, np.flatnonzero(np.diff(file_U)) + 1, len(units)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                r0, r1 = dst_U[a], dst_U[b - 1] + len_U[b - 1]
                put(r0, r1, np.take(self._rows_of(int(file_U[a])), src_R[r0:r1], axis=0))
        else:
            # Merge units adjacent in the same file (ordered reading), then copy each range.
            joined = (file_U[1:] == file_U[:-1]) & (src_U[1:] == src_U[:-1] + len_U[:-1])
            bounds = np.r_[0, np.flatnonzero(~joined) + 1, len(units)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                r0, r1, s0 = dst_U[a], dst_U[b - 1] + len_U[b - 1], src_U[a]
                put(r0, r1, self._rows_of(int(file_U[a]))[s0 : s0 + r1 - r0])
        if not suspect:
            return 0, None, None
        return self.check(units, dst_RD[:n_rows] if perm_R is None else dst_RD[perm_R], suspect)

    def check(self, units, acts_RD, suspect) -> tuple[int, str | None, np.ndarray | None]:
        """(number of non-finite rows, where the first is, mask of finite rows in fill order or
        None); `acts_RD` is in fill order."""
        finite_R = np.ones(len(acts_RD), dtype=bool)
        for a, b in suspect:
            finite_R[a:b] = np.isfinite(shards.to_float32(acts_RD[a:b], self.dtype)).all(axis=-1)
        bad = np.flatnonzero(~finite_R)
        if len(bad) == 0:  # the sums overflowed but every value is finite
            return 0, None, None
        ex_R, tok_R = self.layout.rows(units)
        ex, tok = int(ex_R[bad[0]]), int(tok_R[bad[0]])
        f = self.shard_set.files[int(np.searchsorted(self.starts, ex, side="right") - 1)]
        where = (
            f"{f.path.name} (example {ex}, #{ex - f.first_example} in that file; token {tok}; "
            f"layer {self.layout.sel.layer})"
        )
        return len(bad), where, finite_R


def _worker_main(source: Source, slots_SRD: np.ndarray, tasks, results) -> None:
    # One intra-op thread: the parallelism is across workers, and OpenMP is not fork-safe.
    torch.set_num_threads(1)
    while True:
        msg = tasks.get()
        if msg is None:
            return
        gen, j, slot, units, perm_R = msg
        try:
            results.put((gen, j, source.fill(units, slots_SRD[slot], perm_R), None))
        except BaseException:
            results.put((gen, j, None, traceback.format_exc()))


class Pipeline:
    """Worker processes filling the slots of a shared buffer; yields filled slots in task order."""

    def __init__(self, source: Source, d_model: int, slot_rows: int, n_slots: int, n_workers: int):
        self.source, self.d_model, self.slot_rows = source, d_model, slot_rows
        self.n_slots, self.n_workers = n_slots, n_workers
        storage = np.dtype(shards.NUMPY_STORAGE_DTYPE[source.dtype])
        # MAP_SHARED anonymous memory: forked workers write into the same pages.
        self._buf = mmap.mmap(-1, n_slots * slot_rows * d_model * storage.itemsize)
        self.slots = np.frombuffer(self._buf, dtype=storage).reshape(n_slots, slot_rows, d_model)
        self._procs: list = []
        self._gen = 0
        self._outstanding = 0

    def _start(self) -> None:
        ctx = mp.get_context("fork")  # ms to start, like torch's DataLoader workers on Linux
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        for _ in range(self.n_workers):
            args = (self.source, self.slots, self._tasks, self._results)
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

    def run(self, tasks):
        """For each `(units, perm_R or None)` of the iterable `tasks`, fill a slot and yield
        `(slot_RD, units, perm_R, fill_result)`, in order."""
        if self.n_workers == 0:
            for j, (units, perm_R) in enumerate(tasks):
                slot = self.slots[j % self.n_slots]
                yield slot, units, perm_R, self.source.fill(units, slot, perm_R)
            return
        if not self._procs:
            self._start()
        self._drain()
        self._gen += 1
        gen, tasks, pending, ready = self._gen, iter(tasks), {}, {}

        def submit(j):
            task = next(tasks, None)
            if task is not None:
                self._tasks.put((gen, j, j % self.n_slots, *task))
                self._outstanding += 1
                pending[j] = task

        for j in range(self.n_slots):
            submit(j)
        try:
            j = 0
            while j in pending:
                while j not in ready:
                    g, k, result, err = self._get()
                    self._outstanding -= 1
                    if err is not None:
                        raise RuntimeError(f"loader worker failed:\n{err}")
                    if g == gen:
                        ready[k] = result
                yield self.slots[j % self.n_slots], *pending.pop(j), ready.pop(j)
                if self._gen != gen:
                    raise RuntimeError("abandoned iterator: a newer epoch started on this loader.")
                submit(j + self.n_slots)
                j += 1
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
        if rows is None:  # slots are already shuffled: plain slices (copy_ also up-casts)
            out["act"][dst].copy_(slot_t[pos : pos + take])
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
                source, self.d_model, self.slot_rows, self.n_slots, self.n_workers
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
        self.close()


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
