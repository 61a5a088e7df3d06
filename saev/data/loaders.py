"""`ShuffledLoader` (training) and `OrderedLoader` (evaluation, visualization): batches
`{"act": float32 [B, d_model], "example_idx": int64 [B], "token_idx": int64 [B]}` from a shard
directory, ours or the public saev's (`saev.shards.open_shard_set`).

They cut batches from the slots that `saev.data.pipeline`'s reader threads fill; how the reading
keeps up with the storage, and the shuffle's quality, are in docs/architecture.md ("Loading").
Loaders serve raw activations: normalization belongs to the SAE.
"""

from __future__ import annotations

import itertools
import logging
import math
import mmap
import os
import sys

import numpy as np
import torch

from saev import shards
from saev.data.pipeline import (
    READS,
    TOKENS,
    Layout,
    NonFiniteError,
    Pipeline,
    Source,
    resolve_read,
    select,
)

__all__ = ["NonFiniteError", "OrderedLoader", "ShuffledLoader", "READS", "TOKENS"]

logger = logging.getLogger(__name__)


TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        read: str = "auto",
        upcast: bool = True,
    ):
        """`examples`: global example indices to read (default all); `buffer_mb`: the shuffle
        buffer, in storage dtype; `run_kb`: the smallest contiguous read worth cutting an example
        into; `rank`/`world_size`: this process's part of the stream; `pin_memory`: default is
        whether CUDA is available; `read`: how readers copy from the files, "mmap", "pread" or
        "auto" (mmap when the files fit in half the memory; saev.data.pipeline); `upcast`: whether
        float16/bfloat16 shards give float32 batches (else batches keep the storage dtype, for a
        GPU to up-cast: half the bytes to copy and transfer, and no conversion on the CPU)."""
        if isinstance(shard_root, shards.ShardSet):
            self.shard_set = shard_root
        else:
            self.shard_set = shards.open_shard_set(shard_root)
        md = self.shard_set.metadata
        self.sel = select(md, layer, tokens)
        self.tokens, self.d_model, self.dtype = tokens, md.d_model, md.dtype
        if batch_size < 1 or n_workers < 0 or buffer_mb <= 0 or run_kb <= 0:
            got = f"got {batch_size}, {n_workers}, {buffer_mb}, {run_kb}"
            raise ValueError(f"need batch_size >= 1, n_workers >= 0, buffer_mb, run_kb > 0; {got}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.batch_size, self.n_workers = batch_size, n_workers
        # Reader threads actually started: the main thread needs a core of its own (on 2 CPUs a
        # second reader only contended). The slots, and so the order, still follow n_workers.
        self.n_readers = min(n_workers, max(1, _usable_cpus() - 1))
        self.rank, self.world_size = rank, world_size
        self.skip_nonfinite = skip_nonfinite
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.examples = self._check_examples(examples, md.n_examples)
        self.read = resolve_read(read, self.shard_set)
        self.act_dtype = torch.float32 if upcast else TORCH_DTYPE[md.dtype]
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
        # Units whose rows a fill has found finite: shards do not change once written, so each
        # unit is checked for NaN/inf once per loader (its first epoch), not in every epoch (a
        # sum over every byte: an eighth of a cached epoch's CPU). Units with non-finite rows
        # stay unchecked, so each epoch drops their rows again.
        self._finite_U = np.zeros(md.n_examples * self.layout.n_runs, dtype=bool)
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
        """Lazily, per fill of the whole stream: `(units, dest_R, pos_R, n_rows)`, where `units`
        are this rank's part of the fill (every world_size-th of its units, sorted so that a
        reader reads in file order), `dest_R` says where each of their rows goes in the slot,
        `pos_R` (ascending) is the stream position within the fill of each slot row, and
        `n_rows` counts the whole fill's rows, all ranks together.

        A fill is U consecutive units of `units_in_order` and, when shuffling, a permutation of
        its rows: the same for every world size, so that the ranks of a DDP run together hold
        exactly the rows a one-process run puts at each stream position."""
        U, N = self.units_per_fill, self.world_size if self.interleaved else 1
        g0 = 0  # the fill's first stream position
        for i in range(0, len(units_in_order), U):
            units = np.sort(units_in_order[i : i + U])
            len_U = self.layout.decode(units)[2]
            n_rows = int(len_U.sum())
            if rng is None:
                pos_R = np.arange(n_rows)
            else:
                pos_R = batch_grouped(rng.permutation(n_rows), g0, self.batch_size)
            g0 += n_rows
            if N > 1:
                mine_U = np.arange(len(units)) % N == self.rank
                pos_R = pos_R[np.repeat(mine_U, len_U)]
                units = units[mine_U]
            # A row's slot row is the rank of its stream position among this rank's positions;
            # they are distinct integers below n_rows, so a lookup table ranks them in O(rows).
            if N == 1:
                dest_R, sorted_R = pos_R, np.arange(n_rows)
            else:
                taken = np.zeros(n_rows, dtype=bool)
                taken[pos_R] = True
                sorted_R = np.flatnonzero(taken)
                rank_of = np.empty(n_rows, dtype=np.int64)
                rank_of[sorted_R] = np.arange(len(sorted_R))
                dest_R = rank_of[pos_R]
            yield units, (None if rng is None and N == 1 else dest_R), sorted_R, n_rows

    def _new_batch(self) -> dict[str, torch.Tensor]:
        B, D = self.batch_size, self.d_model
        if self.pin_memory:
            # CUDA's caching host allocator recycles pinned blocks once their copies are done.
            act = torch.empty((B, D), dtype=self.act_dtype, pin_memory=True)
        elif self.act_dtype == torch.float32:
            act = torch.from_numpy(self._pooled(np.float32))
        else:
            act = torch.from_numpy(self._pooled(np.uint16)).view(self.act_dtype)
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
        arr = small_page_array((self.batch_size, self.d_model), dtype)
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
        if slot_t.dtype == out["act"].dtype:
            torch.index_select(slot_t, 0, r, out=out["act"][dst])
        else:  # gather the 16-bit rows, then up-cast them in one vectorized pass (rare: NaN)
            half = torch.from_numpy(self._pooled(shards.NUMPY_STORAGE_DTYPE[self.dtype]))[:take]
            half = half.view(slot_t.dtype)
            torch.index_select(slot_t, 0, r, out=half)
            out["act"][dst].copy_(half)
        torch.index_select(ex_R, 0, r, out=out["example_idx"][dst])
        torch.index_select(tok_R, 0, r, out=out["token_idx"][dst])

    def _batches(self, tasks, total_rows: int, first_batch: int = 0):
        """Batch b of the stream holds its stream positions [b * B, (b + 1) * B): this rank's
        rows there (all of them with one rank; about B / world_size each under DDP, so that the
        ranks' batch b together is the one-process batch b), less any non-finite rows dropped.
        Every rank yields every batch from `first_batch` on, possibly empty, so all ranks take
        the same number of steps; fills that end before `first_batch` are not read. `total_rows`
        is the stream's length (all ranks), so the last batch is known when it is cut: the epoch's
        report of dropped rows comes before it (a trainer stops after `len` batches and never
        resumes the generator)."""
        B, g0 = self.batch_size, 0
        tasks = iter(tasks)
        for task in tasks:  # skipped fills are never handed to a reader
            if g0 + task[3] > first_batch * B:
                tasks = itertools.chain([task], tasks)
                break
            g0 += task[3]
        else:
            return
        self.start()
        jobs = (
            (units, dest_R, not self._finite_U[units].all())
            for units, dest_R, _, _ in self._track(tasks)
        )
        out, filled, batch, n_bad = self._new_batch(), 0, first_batch, 0
        for slot_RD, units, dest_R, checked, (bad, where, mask) in self._pipeline.run(jobs):
            pos_R, n_rows = self._tracked.pop(0)
            if bad and not self.skip_nonfinite:
                raise NonFiniteError(
                    f"NaN/inf activation in {self.shard_set.root}/{where}; re-record that shard or "
                    "set data.skip_nonfinite=true to drop such tokens."
                )
            n_bad += bad
            self.n_nonfinite += bad
            if checked:  # units found finite need no NaN/inf check in later epochs
                self._mark_finite(units, mask)
            per_row = [*self.layout.rows(units), *([] if mask is None else [mask])]
            if dest_R is not None:  # the readers scattered the rows: follow them to the slot
                per_row = [_scatter(x, dest_R) for x in per_row]
            ex_R, tok_R = torch.from_numpy(per_row[0]), torch.from_numpy(per_row[1])
            slot_t = torch.from_numpy(slot_RD[: len(ex_R)])
            slot_t = slot_t.view(torch.bfloat16) if self.dtype == "bfloat16" else slot_t
            valid = None if mask is None else np.flatnonzero(per_row[2])
            stream_R = g0 + (pos_R if valid is None else pos_R[valid])
            rows = None if valid is None else torch.from_numpy(valid)
            # Slot rows (valid ones, in slot order) of each batch this fill reaches.
            last = (g0 + n_rows - 1) // B
            cuts = np.searchsorted(stream_R, np.arange(batch, last + 2) * B)
            for b, lo, hi in zip(range(batch, last + 1), cuts[:-1], cuts[1:]):
                take = int(hi - lo)
                self._cut(out, slice(filled, filled + take), slot_t, ex_R, tok_R, rows, int(lo))
                filled += take
                ends_here = (b + 1) * B <= g0 + n_rows
                if ends_here or g0 + n_rows == total_rows:  # batch b is complete
                    if (b + 1) * B >= total_rows:
                        self._report_dropped(n_bad)
                    yield {k: v[:filled] for k, v in out.items()}
                    out, filled, batch = self._new_batch(), 0, b + 1
            g0 += n_rows

    def _mark_finite(self, units: np.ndarray, finite_R: np.ndarray | None) -> None:
        """Remember which of a checked fill's units hold only finite rows (`finite_R`: its mask
        in fill order, None when every row is finite)."""
        if finite_R is None:
            self._finite_U[units] = True
            return
        len_U = self.layout.decode(units)[2]
        first_U = np.cumsum(len_U) - len_U
        self._finite_U[units] = np.logical_and.reduceat(finite_R, first_U)

    @staticmethod
    def _report_dropped(n_bad: int) -> None:
        if n_bad:
            msg = "Dropped %d non-finite activations this epoch (data.skip_nonfinite=true)."
            logger.warning(msg, n_bad)

    def start(self) -> None:
        """Allocate the buffer and start the reader threads now (else on first iteration)."""
        if self._pipeline is None:
            source = Source(self.shard_set, self.layout, self.read)
            self._pipeline = Pipeline(
                source, self.d_model, self.slot_rows, self.n_slots, self.n_readers
            )
        self._pipeline.start()

    def set_rank(self, rank: int, world_size: int) -> None:
        """This process's part of the stream, once DDP's process group says what it is."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.rank, self.world_size = rank, world_size

    def _track(self, tasks):
        """Pass tasks through, remembering each one's (pos_R, n_rows) for when its slot comes
        back (the pipeline returns slots in task order)."""
        self._tracked: list = []
        for task in tasks:
            self._tracked.append((task[2], task[3]))
            yield task

    def close(self) -> None:
        """Stop and join the reader threads, and close the shard files (a later iteration starts
        them again)."""
        if getattr(self, "_pipeline", None) is not None:
            self._pipeline.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # At interpreter exit modules may be gone; the daemon readers then end with the process.
        try:
            self.close()
        except Exception:
            pass


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _copy_1thread(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src (up-casting 16-bit floats) on this thread only.

    torch's multi-threaded copy_ spins its OpenMP threads on the cores the loader's readers need
    (on 2 cores it doubled the main process's CPU time for no gain in wall time). float32 goes
    through numpy's single-threaded copy; float16/bfloat16 through torch's vectorized conversion
    with one intra-op thread for the call (numpy's float16 cast is ~5x slower; cutting the batch
    into pieces below torch's parallel grain took 4.2-5.0 ms per 16384 x 768 batch here, one call
    2.9-3.5 ms).
    """
    if src.dtype == dst.dtype:
        if src.dtype != torch.float32:  # numpy has no bfloat16: copy the bits
            src, dst = src.view(torch.int16), dst.view(torch.int16)
        np.copyto(dst.numpy(), src.numpy())
        return
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        dst.copy_(src)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def small_page_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized array in 4 KiB pages (numpy asks for huge pages for large arrays).

    A batch array is faulted in once and then reused (`_Loader._pooled`), so huge pages save
    little; but a fresh huge page is the costliest memory a VM hands out when its host takes
    freed guest memory back (free page reporting: this VM reports 8 MiB blocks). Here the first
    touch of a 50 MB batch array took 0.10-0.13 s in huge pages against 0.03 s in small ones,
    on the main process's path to the first batches.
    """
    n_bytes = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
    buf = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype=dtype, count=math.prod(shape)).reshape(shape)


def batch_grouped(perm_R: np.ndarray, g0: int, batch_size: int) -> np.ndarray:
    """`perm_R` (row r of a fill goes to fill position perm_R[r]; the fill starts at stream
    position g0) with each batch's rows put in fill order: every row stays in its batch, so each
    batch holds the same uniformly random subset of rows, and only the order within a batch,
    which no training step depends on, changes.

    Why: the readers scatter rows in fill order to their positions in the slot. A uniformly
    random order sends consecutive rows to random pages of a 128 MiB slot (a TLB and cache miss
    per row: 0.41 us per 1.5 KiB float16 row here); in batch order they go to a few sequential
    streams, one per batch the fill reaches (0.21 us, near memcpy's 0.17).
    """
    batch_R = (perm_R + g0) // batch_size - g0 // batch_size  # batch within the fill, from 0
    small = np.min_scalar_type(int(batch_R.max(initial=0)))  # 16 bits or fewer: a radix sort
    order = np.argsort(batch_R.astype(small), kind="stable")
    grouped_R = np.empty_like(perm_R)
    grouped_R[order] = np.arange(len(perm_R), dtype=perm_R.dtype)
    return grouped_R


def _scatter(x_R: np.ndarray, perm_R: np.ndarray) -> np.ndarray:
    out = np.empty_like(x_R)
    out[perm_R] = x_R
    return out


class ShuffledLoader(_Loader):
    """One epoch of batches per iteration, in a fresh random order each epoch (see module doc).

    Each batch is `{"act": float32 [B, d_model], "example_idx": int64 [B], "token_idx": int64 [B]}`
    (with `upcast=False`, "act" keeps a 16-bit storage dtype);
    `token_idx` is the token's position in its stored example (CLS, when recorded, is 0). The order
    depends on (seed, epoch) and the buffer layout (buffer_mb, n_workers, run_kb), never on the
    world size: under DDP, `batch_size` is the global batch and each rank reads and serves its
    share of every global batch (about batch_size / world_size rows, varying slightly by batch),
    so the ranks' batches together are the one-process run's. Keyword arguments are those of
    `_Loader.__init__`.
    """

    interleaved = True

    def __init__(self, shard_root, layer: int, batch_size: int, tokens="patches", seed=0, **kw):
        super().__init__(shard_root, layer, batch_size, tokens, **kw)
        self.seed = seed
        self.epoch = 0
        """Epochs started so far; the next iteration's order depends on (seed, epoch)."""
        if len(self.examples) * self.sel.n_tokens < self.world_size:
            msg = f"{len(self.examples)} examples cannot be split over {self.world_size} ranks."
            raise ValueError(msg)

    def __len__(self) -> int:
        return math.ceil(len(self.examples) * self.sel.n_tokens / self.batch_size)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, first_batch: int):
        """This epoch's batches from batch `first_batch` on, exactly those an uninterrupted
        iteration yields there, without reading the fills before it: the order depends only on
        (seed, epoch), so the fills that end before the batch are skipped unread (their shuffle
        permutations are still drawn, keeping the generator in step)."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = np.random.default_rng([self.seed, epoch]).permutation(self.examples)
        rng = np.random.default_rng([self.seed, epoch, 0])
        tasks = self._tasks(rng.permutation(self.layout.units(order)), rng)
        return self._batches(tasks, len(self.examples) * self.sel.n_tokens, first_batch)


class OrderedLoader(_Loader):
    """Batches in disk order (example, then token), for evaluation and visualization.

    Same arguments (but no seed) and batch contents as `ShuffledLoader`. Under DDP each rank reads
    a contiguous part of the examples (parts differ in size by at most one example), in batches
    of `batch_size`, and every rank yields the same number of batches: the last ones of a rank
    with a smaller part (or none) are empty.
    """

    interleaved = False

    @property
    def mine(self) -> np.ndarray:
        return np.array_split(self.examples, self.world_size)[self.rank]

    def __len__(self) -> int:
        # Every rank takes as many steps as the one with the largest part (array_split gives the
        # first parts one example more), so a rank with fewer examples, or none, ends on empty
        # batches instead of leaving the others waiting in a collective.
        largest = math.ceil(len(self.examples) / self.world_size)
        return math.ceil(largest * self.sel.n_tokens / self.batch_size)

    def __iter__(self):
        tasks = self._tasks(self.layout.units(self.mine), None)
        n_batches = 0
        for batch in self._batches(tasks, len(self.mine) * self.sel.n_tokens):
            n_batches += 1
            yield batch
        for _ in range(n_batches, len(self)):
            yield self._empty_batch()

    def _empty_batch(self) -> dict[str, torch.Tensor]:
        empty = torch.empty(0, dtype=torch.int64)
        act = torch.empty((0, self.d_model), dtype=self.act_dtype)
        return {"act": act, "example_idx": empty, "token_idx": empty.clone()}
