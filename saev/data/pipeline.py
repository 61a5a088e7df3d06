"""The reader threads behind `saev.data.loaders`: they copy runs of activations from the shard
files into the slots of one shuffle buffer, each to its shuffled rows.

- `Layout` cuts an epoch into units (runs of consecutive tokens of one example and layer, which are
  contiguous in a shard file and at least `run_kb` long, so reads stay large);
- `Source` copies a fill (units sorted by file position) into a slot, asking the kernel for all of
  its ranges first (`WILLNEED`) so that the disk has many requests in flight, by `mmap` when the
  files fit in half the memory and by `pread` otherwise, checking for NaN/inf while rows are in
  cache;
- `Pipeline` runs the readers (threads of this process: numpy's copies release the GIL; the main
  thread fills a slot itself rather than wait) and hands slots back in task order. The slots are
  one private numpy array.

Why it is built this way, the shuffle's quality and the measured figures: docs/architecture.md,
"Loading".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import os
import pathlib
import queue
import sys
import threading

import numpy as np

from saev import shards
from saev.data.config import READS, TOKENS

logger = logging.getLogger(__name__)

# Below this many bytes per unit, one fancy-indexed read per shard beats a loop of copies.
SMALL_RUN_BYTES = 64 * 1024
HALF_EXPONENT = {"float16": 0x7C00, "bfloat16": 0x7F80}
SCRATCH_BYTES = 2**20  # pread's bounce buffer: a shuffled range stays in L2 for its scatter
HAS_FADVISE = hasattr(os, "posix_fadvise")  # not on macOS: no prefetch there


def memory_bytes() -> int:
    """This process's memory: physical RAM, or less where a cgroup (a SLURM job's) limits it."""
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return limit
    for _, controllers, path in lines:
        if controllers == "":  # cgroup v2
            candidates = [f"/sys/fs/cgroup{path}/memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"]
        else:
            continue
        for name in candidates:
            try:
                value = pathlib.Path(name).read_text().strip()
            except OSError:
                continue
            if value.isdigit():
                limit = min(limit, int(value))
    return limit


def allow_open_files(n: int) -> None:
    """A loader keeps one descriptor per shard it reads (a mapping holds one too), which its
    readers share: lift the soft limit on open files (often 1024, below the shard count of a large
    recording) toward the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256  # and some for everything else
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(
            resource.RLIMIT_NOFILE,
            (want if hard == resource.RLIM_INFINITY else min(want, hard), hard),
        )


def resolve_read(read: str, shard_set: shards.ShardSet) -> str:
    """`read` with "auto" resolved: mmap when the shard files fit in half the memory (they can
    stay cached, and mapped pages copy fastest), else pread (see module doc)."""
    if read not in READS:
        raise ValueError(f"read={read!r} is not one of {READS}.")
    if read != "auto":
        return read
    n_bytes = sum(f.path.stat().st_size for f in shard_set.files)
    return "mmap" if n_bytes <= memory_bytes() // 2 else "pread"


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
    halves the work here and doubles the rows a buffer holds). One Source serves a loader's reader
    threads and its main thread: files (and memmaps) are opened once per shard, read-only, on first
    use (under a lock) and shared; each thread has its own pread scratch buffer. `read` is "mmap"
    or "pread" (`resolve_read`).
    """

    def __init__(self, shard_set: shards.ShardSet, layout: Layout, read: str = "mmap"):
        self.shard_set, self.layout, self.read = shard_set, layout, read
        md = shard_set.metadata
        self.dtype, self.n_layers, self.n_tokens = md.dtype, md.n_layers, md.n_tokens_per_example
        self.row_bytes = md.d_model * shards.DTYPE_ITEMSIZE[md.dtype]
        self.starts = np.array([f.first_example for f in shard_set.files], dtype=np.int64)
        # Read once, here (tests shrink them to reach every path).
        self.small_run_bytes, self.scratch_bytes = SMALL_RUN_BYTES, SCRATCH_BYTES
        allow_open_files(len(shard_set.files))
        self._flat: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}
        self._maps: dict[int, mmap.mmap] = {}
        self._opening = threading.Lock()  # two readers must not open the same shard twice
        self._local = threading.local()  # each thread's scratch_RD

    def close(self) -> None:
        """Close the descriptors and drop the maps (a later fill opens them again). Only when no
        thread is filling: a closed descriptor's number may be reused by the next file opened."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        self._flat, self._maps = {}, {}  # a map closes when no view of it is left

    def _rows_of(self, i: int) -> np.ndarray:
        """Shard i as a read-only `[examples * layers * tokens, d_model]` view."""
        flat = self._flat.get(i)
        if flat is not None:
            return flat
        with self._opening:
            if i not in self._flat:
                mm = self.shard_set.memmap(i)
                # Pages come from prefetch(); a fault that still misses reads just its page, not
                # the 8 MiB around it that the default read-around would (mostly other fills').
                mm._mmap.madvise(mmap.MADV_RANDOM)
                self._maps[i] = mm._mmap  # before _flat: a thread that finds _flat[i] uses it
                flat = mm.reshape(-1, self.shard_set.metadata.d_model)
                self._flat[i] = flat.view(np.ndarray)  # plain ndarray: no memmap hooks on slicing
            return self._flat[i]

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is not None:
            return fd
        with self._opening:
            if i not in self._fds:
                fd = os.open(self.shard_set.files[i].path, os.O_RDONLY)
                if HAS_FADVISE:  # pread's readahead would read past the rows (prefetch is precise)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[i] = fd
            return self._fds[i]

    def prefetch(self, file_U: np.ndarray, row_U: np.ndarray, n_rows_U: np.ndarray) -> None:
        """Ask the kernel for every range at once (asynchronous reads; a no-op for cached pages),
        so that the disk has many requests in flight while the ranges are copied one by one.
        Mapped shards are asked through their mapping (`madvise`, the same readahead as
        `posix_fadvise`), so that a loader holds one descriptor per shard either way."""
        page = mmap.PAGESIZE
        for i, r0, n in zip(file_U.tolist(), row_U.tolist(), n_rows_U.tolist()):
            start, length = r0 * self.row_bytes, n * self.row_bytes
            if self.read == "mmap" or not HAS_FADVISE:
                self._rows_of(i)
                aligned = start - start % page
                self._maps[i].madvise(mmap.MADV_WILLNEED, aligned, start + length - aligned)
            else:
                os.posix_fadvise(self._fd(i), start, length, os.POSIX_FADV_WILLNEED)

    def _pread(self, i: int, row0: int, dst_RD: np.ndarray) -> None:
        """dst_RD <- rows [row0, row0 + len(dst_RD)) of shard i's flat view."""
        view, offset = memoryview(dst_RD).cast("B"), row0 * self.row_bytes
        while len(view):
            n = os.preadv(self._fd(i), [view], offset)
            if n <= 0:  # open_shards checked the sizes: the file shrank since
                path = self.shard_set.files[i].path
                raise shards.ShardError(f"{path} is shorter than shards.json says; re-record it.")
            view, offset = view[n:], offset + n

    def _ranges(self, i: int, row0: int, n_rows: int, like_RD: np.ndarray):
        """`(offset, rows)` pieces of rows [row0, row0 + n_rows) of shard i: one view of the
        memmap, or pread pieces of at most SCRATCH_BYTES through this thread's scratch buffer."""
        if self.read == "mmap":
            yield 0, self._rows_of(i)[row0 : row0 + n_rows]
            return
        scratch_RD = getattr(self._local, "scratch_RD", None)
        if scratch_RD is None or scratch_RD.shape[1:] != like_RD.shape[1:]:
            shape = (max(1, self.scratch_bytes // self.row_bytes), *like_RD.shape[1:])
            scratch_RD = self._local.scratch_RD = np.empty(shape, dtype=like_RD.dtype)
        step = len(scratch_RD)
        for a in range(0, n_rows, step):
            piece_RD = scratch_RD[: min(step, n_rows - a)]
            self._pread(i, row0 + a, piece_RD)
            yield a, piece_RD

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
        return self._fill(units, dst_RD, perm_R, verify=True)

    def fill_unchecked(self, units: np.ndarray, dst_RD: np.ndarray, perm_R=None):
        """`fill` without the NaN/inf check, for units already found finite: `(0, None, None)`."""
        return self._fill(units, dst_RD, perm_R, verify=False)

    def _fill(self, units: np.ndarray, dst_RD: np.ndarray, perm_R, verify: bool):
        ex_U, start_U, len_U = self.layout.decode(units)
        file_U = np.searchsorted(self.starts, ex_U, side="right") - 1
        src_U = (ex_U - self.starts[file_U]) * self.n_layers + self.layout.sel.layer_i
        src_U = src_U * self.n_tokens + start_U  # first row of each unit in its file's flat view
        dst_U = np.cumsum(len_U) - len_U
        n_rows, suspect = int(len_U.sum()), []

        def put(r0: int, r1: int, src_rows: np.ndarray) -> None:
            if perm_R is None:
                np.copyto(dst_RD[r0:r1], src_rows)
            else:  # the shuffle itself: scattering here spares the main thread a gather
                dst_RD[perm_R[r0:r1]] = src_rows
            # One sum per range while it is in cache: NaN, inf (and overflow) make it non-finite.
            if verify and not self._finite_sum(src_rows):
                suspect.append((r0, r1))

        # Merge units adjacent in the same file (ordered reading): one range each.
        joined = (file_U[1:] == file_U[:-1]) & (src_U[1:] == src_U[:-1] + len_U[:-1])
        first = np.r_[0, np.flatnonzero(~joined) + 1]
        last = np.r_[first[1:], len(units)] - 1
        n_rows_G = dst_U[last] + len_U[last] - dst_U[first]
        self.prefetch(file_U[first], src_U[first], n_rows_G)
        if len_U.max() * self.row_bytes < self.small_run_bytes:
            # Short runs (CLS only): one vectorized gather per file out of its memmap, instead
            # of a loop of tiny copies or preads (only the rows' pages are mapped).
            src_R = np.repeat(src_U - dst_U, len_U) + np.arange(n_rows)
            bounds = np.r_[0, np.flatnonzero(np.diff(file_U)) + 1, len(units)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                r0, r1 = dst_U[a], dst_U[b - 1] + len_U[b - 1]
                put(r0, r1, np.take(self._rows_of(int(file_U[a])), src_R[r0:r1], axis=0))
        else:
            for a, n in zip(first.tolist(), n_rows_G.tolist()):
                i, r0, s0 = int(file_U[a]), int(dst_U[a]), int(src_U[a])
                if self.read == "pread" and perm_R is None:  # straight into the slot
                    self._pread(i, s0, dst_RD[r0 : r0 + n])
                    if verify and not self._finite_sum(dst_RD[r0 : r0 + n]):
                        suspect.append((r0, r0 + n))
                    continue
                for off, rows_RD in self._ranges(i, s0, n, dst_RD):
                    put(r0 + off, r0 + off + len(rows_RD), rows_RD)
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


def fill(source: Source, units, dst_RD, perm_R, verify: bool):
    """`source.fill`, or without the NaN/inf check where `verify` is False."""
    return (source.fill if verify else source.fill_unchecked)(units, dst_RD, perm_R)


def _read(source: Source, slots_SRD: np.ndarray, tasks: queue.Queue, results: queue.Queue):
    """A reader thread: fills slots until it takes None. Every task it takes gets an answer, its
    exception included, so the main thread never waits for one that will not come."""
    while (msg := tasks.get()) is not None:
        gen, j, slot, units, perm_R, verify = msg
        try:
            result = fill(source, units, slots_SRD[slot], perm_R, verify)
        except BaseException as err:
            results.put((gen, j, None, err))
        else:
            results.put((gen, j, result, None))


class Pipeline:
    """Reader threads filling the slots of one buffer; yields filled slots in task order.

    The copies (numpy's fancy-indexed assignment and copyto, pread) release the GIL, so readers
    and the main thread copy in parallel. The buffer is private memory (`np.empty`), which numpy
    backs with transparent huge pages where the kernel allows them; shared memory, which reader
    processes needed, gets 4 KiB pages, and faulting them in cost a fresh loader a third of its
    first epoch. So nothing prefaults the buffer any more: a huge page takes one fault per 2 MiB,
    within a reader's copy.
    """

    def __init__(self, source: Source, d_model: int, slot_rows: int, n_slots: int, n_workers: int):
        self.source, self.d_model, self.slot_rows = source, d_model, slot_rows
        self.n_slots, self.n_workers = n_slots, n_workers
        storage = np.dtype(shards.NUMPY_STORAGE_DTYPE[source.dtype])
        self.slots = np.empty((n_slots, slot_rows, d_model), dtype=storage)
        self._threads: list[threading.Thread] = []
        self._tasks: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._gen = 0  # epochs started (run calls); a newer one ends an abandoned iterator
        self._outstanding = 0  # tasks handed to the readers and not answered yet

    def start(self) -> None:
        """Start the reader threads, unless they run (or there are none to run)."""
        if self._threads or not self.n_workers:
            return
        # Fresh queues: nothing of a closed pipeline's epoch is left in them.
        self._tasks, self._results = queue.Queue(), queue.Queue()
        args = (self.source, self.slots, self._tasks, self._results)
        for i in range(self.n_workers):
            # daemon: a program that never closes its loader still exits (readers wait in get).
            t = threading.Thread(target=_read, args=args, name=f"saev-reader-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _get(self):
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                if not self._threads or not all(t.is_alive() for t in self._threads):
                    # close() from another thread, or a bug: no answer will come.
                    raise RuntimeError("the loader's reader threads stopped mid-epoch.") from None

    def _drain(self) -> None:
        """Before a new epoch (or after an abandoned one) reuses the slots: drop the tasks that no
        reader took yet, and wait for the fills in progress, so that no reader still writes."""
        while self._outstanding > 0:
            try:
                self._tasks.get_nowait()
            except queue.Empty:
                self._get()  # an answer, or an error of the abandoned epoch: nobody wants it
            self._outstanding -= 1

    def run(self, tasks):
        """For each `(units, perm_R or None, verify)` of the iterable `tasks` (`Source.fill`'s
        arguments), fill a slot and yield `(slot_RD, units, perm_R, verify, fill_result)`, in
        order. A reader's exception is raised here, as it was raised there."""
        if self.n_workers == 0:
            for j, (units, perm_R, verify) in enumerate(tasks):
                slot = self.slots[j % self.n_slots]
                yield slot, units, perm_R, verify, fill(self.source, units, slot, perm_R, verify)
            return
        self.start()
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
                    if self._help(gen, ready):
                        continue
                    g, k, result, err = self._get()
                    self._outstanding -= 1
                    if err is not None:
                        raise err
                    if g == gen:
                        ready[k] = result
                yield self.slots[j % self.n_slots], *pending.pop(j), ready.pop(j)
                if self._gen != gen:
                    msg = "abandoned iterator: a newer epoch started on this loader, or it closed."
                    raise RuntimeError(msg)
                submit(j + self.n_slots)
                j += 1
        finally:
            if self._gen == gen:  # else a newer epoch (or close) already drained this one's fills
                self._drain()

    def _help(self, gen: int, ready: dict) -> bool:
        """Instead of waiting for a reader, fill a queued slot here; False if none is queued (or
        a result is waiting). With fewer readers than CPUs the main thread has a core idling."""
        if not self._results.empty():
            return False
        try:
            g, k, slot, units, perm_R, verify = self._tasks.get_nowait()
        except queue.Empty:
            return False
        # No reader will answer this task now, even if the fill below raises (else _drain would
        # wait for it forever).
        self._outstanding -= 1
        result = fill(self.source, units, self.slots[slot], perm_R, verify)
        if g == gen:
            ready[k] = result
        return True

    def close(self) -> None:
        """Stop the readers and join them: each ends after the fill it is doing, if any (tasks
        that none took are dropped). An epoch still iterating then raises; a later `run` starts
        new readers."""
        while True:
            try:
                self._tasks.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._tasks.put(None)
        me = threading.current_thread()  # close() from a reader (a garbage collection there)
        if not sys.is_finalizing():  # at exit a daemon thread may be frozen: join would hang
            for t in self._threads:
                if t is not me:
                    t.join()
        if me not in self._threads and not any(t.is_alive() for t in self._threads):
            self.source.close()
        self._threads = []
        self._gen += 1  # an iterator still open raises at its next slot
        self._outstanding = 0  # no reader is left to write into a slot (nor to answer _drain)
