"""The reader processes behind `saev.data.loaders`: they copy runs of activations from the shard
files into the slots of one shared-memory shuffle buffer, each to its shuffled rows.

- `Layout` cuts an epoch into units (runs of consecutive tokens of one example and layer, which are
  contiguous in a shard file and at least `run_kb` long, so reads stay large);
- `Source` copies a fill (units sorted by file position) into a slot, asking the kernel for all of
  its ranges first (`WILLNEED`) so that the disk has many requests in flight, by `mmap` when the
  files fit in half the memory and by `pread` otherwise, checking for NaN/inf while rows are in
  cache;
- `Pipeline` runs the workers (processes started by a forkserver, so that no thread of the main
  process can leave a lock held in them; the main process fills a slot itself rather than wait)
  and hands slots back in task order. The slots live in one shared-memory file (`SharedBuffer`)
  that the workers map through a descriptor passed at start.

Why it is built this way, the shuffle's quality and the measured figures: docs/architecture.md,
"Loading".
"""

from __future__ import annotations

import dataclasses
import logging
import math
import mmap
import multiprocessing as mp
import multiprocessing.reduction
import os
import pathlib
import queue
import signal
import threading
import traceback
import weakref

import numpy as np

from saev import shards
from saev.data.config import READS, TOKENS

logger = logging.getLogger(__name__)

# Below this many bytes per unit, one fancy-indexed read per shard beats a loop of copies.
SMALL_RUN_BYTES = 64 * 1024
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
PREFAULT_BYTES = 32 * 2**20  # a multiple of the page size
HALF_EXPONENT = {"float16": 0x7C00, "bfloat16": 0x7F80}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SCRATCH_BYTES = 2**20  # pread's bounce buffer: a shuffled range stays in L2 for its scatter
HAS_FADVISE = hasattr(os, "posix_fadvise")  # not on macOS: no prefetch there
FORK_WITH_THREADS = (
    "Starting loader workers while other threads run (%s): through a forkserver, so that none of "
    "their locks is inherited."
)


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
    """A worker keeps one descriptor per shard it reads (a mapping holds one too): lift the soft
    limit on open files (often 1024, below the shard count of a large recording) toward the hard
    one."""
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
    halves the work here and doubles the rows a buffer holds). Lives in each worker process;
    files (and memmaps) are opened once per shard and per process, read-only. `read` is "mmap" or
    "pread" (`resolve_read`).
    """

    def __init__(self, shard_set: shards.ShardSet, layout: Layout, read: str = "mmap"):
        self.shard_set, self.layout, self.read = shard_set, layout, read
        md = shard_set.metadata
        self.dtype, self.n_layers, self.n_tokens = md.dtype, md.n_layers, md.n_tokens_per_example
        self.row_bytes = md.d_model * shards.DTYPE_ITEMSIZE[md.dtype]
        self.starts = np.array([f.first_example for f in shard_set.files], dtype=np.int64)
        # Read here, not at each use: a worker's module is imported afresh (forkserver), so
        # these travel with the Source (tests shrink them to reach every path).
        self.small_run_bytes, self.scratch_bytes = SMALL_RUN_BYTES, SCRATCH_BYTES
        allow_open_files(len(shard_set.files))
        self._open_nothing()

    def _open_nothing(self) -> None:
        self._flat: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}
        self._maps: dict[int, mmap.mmap] = {}
        self._scratch_RD: np.ndarray | None = None

    def __getstate__(self) -> dict:
        """What a worker needs to open the files itself (descriptors and maps stay here)."""
        state = self.__dict__.copy()
        for key in ("_flat", "_fds", "_maps", "_scratch_RD"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        allow_open_files(len(self.shard_set.files))
        self._open_nothing()

    def _rows_of(self, i: int) -> np.ndarray:
        """Shard i as a read-only `[examples * layers * tokens, d_model]` view."""
        if i not in self._flat:
            mm = self.shard_set.memmap(i)
            # Pages come from prefetch(); a fault that still misses reads just its page, not
            # the 8 MiB around it that the default read-around would (mostly other fills' rows).
            mm._mmap.madvise(mmap.MADV_RANDOM)
            self._maps[i] = mm._mmap
            flat = mm.reshape(-1, self.shard_set.metadata.d_model)
            self._flat[i] = flat.view(np.ndarray)  # plain ndarray: no memmap hooks on slicing
        return self._flat[i]

    def _fd(self, i: int) -> int:
        if i not in self._fds:
            self._fds[i] = os.open(self.shard_set.files[i].path, os.O_RDONLY)
            if HAS_FADVISE:  # pread's readahead would read past the rows (prefetch is precise)
                os.posix_fadvise(self._fds[i], 0, 0, os.POSIX_FADV_RANDOM)
        return self._fds[i]

    def prefetch(self, file_U: np.ndarray, row_U: np.ndarray, n_rows_U: np.ndarray) -> None:
        """Ask the kernel for every range at once (asynchronous reads; a no-op for cached pages),
        so that the disk has many requests in flight while the ranges are copied one by one.
        Mapped shards are asked through their mapping (`madvise`, the same readahead as
        `posix_fadvise`), so that a worker holds one descriptor per shard either way."""
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
        memmap, or pread pieces of at most SCRATCH_BYTES through a reused scratch buffer."""
        if self.read == "mmap":
            yield 0, self._rows_of(i)[row0 : row0 + n_rows]
            return
        if self._scratch_RD is None or self._scratch_RD.shape[1:] != like_RD.shape[1:]:
            rows = max(1, self.scratch_bytes // self.row_bytes)
            self._scratch_RD = np.empty((rows, *like_RD.shape[1:]), dtype=like_RD.dtype)
        step = len(self._scratch_RD)
        for a in range(0, n_rows, step):
            piece_RD = self._scratch_RD[: min(step, n_rows - a)]
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
            else:  # the shuffle itself: scattering here spares the main process a gather
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


def _die_with_parent(main_pid: int) -> None:
    """Have the kernel kill this worker when the process that started it dies (SIGKILL, OOM):
    otherwise an orphaned worker waits forever on its task queue, holding memory and maps.

    The parent is the forkserver, which exits when the main process dies (its pipe from the main
    process closes); the check after prctl covers a main process that died before it took effect.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the daemon flag covers clean exits only
        pass
    try:
        os.kill(main_pid, 0)
    except ProcessLookupError:
        os._exit(1)
    if os.getppid() == 1:  # the forkserver died before prctl took effect
        os._exit(1)
    # The forkserver exits when the last holder of its "alive" pipe does: the main process, and
    # every process it forked, which keeps a copy so as to start processes of its own. A worker
    # starts none: without its copy, a dead main process takes the forkserver, and so (through
    # PDEATHSIG) this worker, with it.
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        os.close(alive_fd)
        server._forkserver_alive_fd = None


class SharedBuffer:
    """Memory that the main process and its workers map: an anonymous shared-memory file
    (`memfd`, else an unlinked file in /dev/shm), handed to workers as a descriptor.

    Workers are not forked from the main process (`Pipeline._start`), so they cannot inherit a
    mapping; a descriptor needs no name that a killed process would leave behind. Pickling one
    (as a worker's argument) sends the descriptor with it (`DupFd`, as multiprocessing's own
    shared arenas do).
    """

    def __init__(self, n_bytes: int, fd: int | None = None):
        self.n_bytes = n_bytes
        if fd is None:
            fd = _anonymous_shm_fd()
            os.ftruncate(fd, n_bytes)
        self.fd = fd
        self._close_fd = weakref.finalize(self, os.close, fd)
        self.map = mmap.mmap(fd, n_bytes)  # MAP_SHARED

    def __reduce__(self):
        return _attach_buffer, (self.n_bytes, multiprocessing.reduction.DupFd(self.fd))

    def close(self) -> None:
        """Close the descriptor (the mapping keeps the memory, but no worker can attach)."""
        self._close_fd()
        self.fd = -1


def _attach_buffer(n_bytes: int, dup) -> SharedBuffer:
    return SharedBuffer(n_bytes, dup.detach())


def _anonymous_shm_fd() -> int:
    if hasattr(os, "memfd_create"):
        return os.memfd_create("saev-shuffle-buffer", os.MFD_CLOEXEC)
    import tempfile

    fd, name = tempfile.mkstemp(
        prefix="saev-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    os.unlink(name)
    return fd


READER_NAME = "saev-reader"


def _start_context():
    """A forkserver: a clean single-threaded process, started by fork + exec, that forks the
    workers. A plain fork copies only the calling thread, so a lock that another thread (W&B, a
    process group, a job before this one) holds at that moment stays held in the child forever;
    spawn is as safe but imports numpy afresh in every worker."""
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        if forkserver._forkserver._forkserver_pid is None:  # before it starts: what it imports
            ctx.set_forkserver_preload([__name__])
    _readers_skip_main()
    return ctx


def _readers_skip_main() -> None:
    """Have multiprocessing not re-run `__main__` in a reader, as it does for every process it
    does not fork: a reader needs nothing from it (its target lives here), and a script or
    notebook cell without an `if __name__ == "__main__"` guard would run again in each reader.
    Only processes named READER_NAME are affected."""
    from multiprocessing import spawn

    if getattr(spawn.get_preparation_data, "_skips_main", False):
        return
    prepare = spawn.get_preparation_data

    def preparation_data(name):
        data = prepare(name)
        if name.startswith(READER_NAME):
            data.pop("init_main_from_name", None)
            data.pop("init_main_from_path", None)
        return data

    preparation_data._skips_main = True
    spawn.get_preparation_data = preparation_data


def map_slot(buf: mmap.mmap, slots_SRD: np.ndarray, slot: int, mapped: set) -> None:
    """Map a slot's pages into this process's page tables in one call, the first time this
    process uses the slot (`mapped`: the slots it has mapped).

    Every process faults shared pages into its own page tables, 4 KiB at a time (shared memory
    has no huge pages by default): writing a fresh 512 MiB buffer took a worker 0.15 s of page
    faults on this VM, even where the main process had already allocated the pages. A populate
    call maps them (allocating any that are still missing) in 0.04 s; the mapping is writable,
    so the writes that follow take no fault.
    """
    if slot in mapped:
        return
    mapped.add(slot)
    nbytes = slots_SRD[0].nbytes  # slots_SRD is the whole of buf
    start = slot * nbytes
    aligned = start - start % mmap.PAGESIZE
    try:
        buf.madvise(MADV_POPULATE_READ, aligned, min(len(buf), start + nbytes) - aligned)
    except (OSError, ValueError):  # before Linux 5.14: the writes fault the pages in
        pass


def fill(source: Source, units, dst_RD, perm_R, verify: bool):
    """`source.fill`, or without the NaN/inf check where `verify` is False."""
    return (source.fill if verify else source.fill_unchecked)(units, dst_RD, perm_R)


def _worker_main(source: Source, shared: SharedBuffer, shape, dtype, tasks, results, main_pid):
    _die_with_parent(main_pid)
    # SLURM sends a job's requeue signal (submitit's SIGUSR2) to every process of the step: it
    # is for the main process, and would kill a worker (a forkserver's child has the default
    # action, where a forked one inherited the main process's handler).
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    buf = shared.map
    shared.close()  # the mapping keeps the memory
    slots_SRD = np.frombuffer(buf, dtype=dtype).reshape(shape)
    mapped: set[int] = set()  # page tables are per process: a new one starts with none mapped
    while True:
        msg = tasks.get()
        if msg is None:
            return
        gen, j, slot, units, perm_R, verify = msg
        map_slot(buf, slots_SRD, slot, mapped)
        try:
            results.put((gen, j, fill(source, units, slots_SRD[slot], perm_R, verify), None))
        except BaseException:
            results.put((gen, j, None, traceback.format_exc()))


class Pipeline:
    """Worker processes filling the slots of a shared buffer; yields filled slots in task order."""

    def __init__(self, source: Source, d_model: int, slot_rows: int, n_slots: int, n_workers: int):
        self.source, self.d_model, self.slot_rows = source, d_model, slot_rows
        self.n_slots, self.n_workers = n_slots, n_workers
        storage = np.dtype(shards.NUMPY_STORAGE_DTYPE[source.dtype])
        # Shared memory that the workers map too (SharedBuffer), so they write into these pages.
        self._shared = SharedBuffer(n_slots * slot_rows * d_model * storage.itemsize)
        self._buf = self._shared.map
        self.slots = np.frombuffer(self._buf, dtype=storage).reshape(n_slots, slot_rows, d_model)
        self._procs: list = []
        self._mapped: set[int] = set()  # slots mapped into this (the main) process
        self._gen = 0
        self._outstanding = 0
        # Page-aligned pieces of the buffer never touched yet, in the order the slots are first
        # filled, from the middle of slot 0 on: the first worker maps slot 0 from its start
        # (map_slot), and the two meet halfway (see _prefault).
        total, page = len(self._buf), mmap.PAGESIZE
        first = self.slots[0].nbytes // 2 // page * page
        self._fresh = [
            (a, min(PREFAULT_BYTES, total - a)) for a in range(first, total, PREFAULT_BYTES)
        ]

    def _start(self) -> None:
        # Started by a forkserver (_start_context), never forked from here: safe whatever threads
        # this process runs (a notebook kernel, W&B, a process group, the job before this one of
        # an in-process multirun). An info line still names them, for whoever debugs a start.
        others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        if others:
            logger.info(FORK_WITH_THREADS, ", ".join(others))
        ctx = _start_context()
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        shape, dtype = self.slots.shape, self.slots.dtype
        for _ in range(self.n_workers):
            args = (
                self.source,
                self._shared,
                shape,
                dtype,
                self._tasks,
                self._results,
                os.getpid(),
            )
            p = ctx.Process(target=_worker_main, args=args, name=READER_NAME, daemon=True)
            p.start()
            self._procs.append(p)

    def _get(self):
        while True:
            try:
                return self._results.get(timeout=1.0)
            except queue.Empty:
                self._check_alive()

    def _check_alive(self) -> None:
        """Stop with an error once a worker has died (the OOM killer, most likely), even when
        the main process could finish the epoch alone by filling every slot itself (`_help`)."""
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
        """For each `(units, perm_R or None, verify)` of the iterable `tasks` (`Source.fill`'s
        arguments), fill a slot and yield `(slot_RD, units, perm_R, verify, fill_result)`, in
        order."""
        if self.n_workers == 0:
            for j, (units, perm_R, verify) in enumerate(tasks):
                map_slot(self._buf, self.slots, j % self.n_slots, self._mapped)
                slot = self.slots[j % self.n_slots]
                yield slot, units, perm_R, verify, fill(self.source, units, slot, perm_R, verify)
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
                    if self._prefault() or self._help(gen, ready):
                        continue
                    g, k, result, err = self._get()
                    self._outstanding -= 1
                    if err is not None:
                        raise RuntimeError(f"loader worker failed:\n{err}")
                    if g == gen:
                        ready[k] = result
                self._check_alive()  # a waitpid per worker and slot
                yield self.slots[j % self.n_slots], *pending.pop(j), ready.pop(j)
                if self._gen != gen:
                    raise RuntimeError("abandoned iterator: a newer epoch started on this loader.")
                submit(j + self.n_slots)
                j += 1
        finally:
            if self._gen == gen:  # a newer epoch already drained this one's fills
                self._drain()

    def _prefault(self) -> bool:
        """Instead of waiting for a worker, allocate the next piece of the buffer that nothing
        has touched yet; False if there is none (or a result is waiting).

        Fresh memory costs a page fault per 4 KiB (~1-2 GB/s in a VM, where the host faults too):
        a third of a first epoch. The main process would be idle until the first slot is full,
        so it takes that cost off the workers, which then only map the pages (map_slot).
        MADV_POPULATE_WRITE (Linux 5.14) allocates and maps the pages without writing them, so
        it is safe on a slot that a worker is already filling.
        """
        if not self._fresh or not self._results.empty():
            return False
        start, length = self._fresh.pop(0)
        try:
            self._buf.madvise(MADV_POPULATE_WRITE, start, length)
        except (OSError, ValueError):  # older kernel: the workers fault the pages in
            self._fresh = []
        return True

    def _help(self, gen: int, ready: dict) -> bool:
        """Instead of waiting for a worker, fill a queued slot here; False if none is queued (or
        a result is waiting). With fewer workers than CPUs the main process has a core idling."""
        if not self._results.empty():
            return False
        try:
            msg = self._tasks.get_nowait()
        except queue.Empty:
            return False
        g, k, slot, units, perm_R, verify = msg
        # No worker will answer this task now, even if the fill below raises (else _drain would
        # wait for it forever).
        self._outstanding -= 1
        map_slot(self._buf, self.slots, slot, self._mapped)
        result = fill(self.source, units, self.slots[slot], perm_R, verify)
        if g == gen:
            ready[k] = result
        return True

    def close(self) -> None:
        for _ in self._procs:
            self._tasks.put(None)
        all_stopped = True  # each worker took its sentinel, so no task is left in the pipe
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
            all_stopped &= p.exitcode == 0
        if self._procs:
            # End the task queue's feeder thread, which would outlive the loader (see _start).
            # Only when the pipe is empty: a task nobody reads would block it (and the join).
            self._tasks.close()
            if all_stopped:
                self._tasks.join_thread()
            else:
                self._tasks.cancel_join_thread()
        self._procs = []
        self._outstanding = 0  # no worker is left to write into a slot (nor to answer _drain)
