"""Shuffled-loader bandwidth against the raw read bandwidth of the same shard files (issue 3).

    python benchmarks/loader.py                       # ~2 GB float32 and ~1 GB float16, 768-d
    python benchmarks/loader.py --dtypes float32 --buffer-mb 512
    python benchmarks/loader.py --cold --dtypes float32   # the files evicted before every pass
    python benchmarks/loader.py --cold --gb 6 --memory-limit-gb 3   # shards larger than memory

Writes the shards once under --root (reused on later runs), warms the page cache, then prints for
each dtype: the raw bandwidth (each whole file read into a fresh numpy array, the better of
`np.fromfile` and a copy out of a memmap; median of --passes passes), the ShuffledLoader's
bandwidth over one full epoch including its start-up (constructing it, forking the workers,
mapping the files and touching the buffer for the first time), their ratio, the same for the
loader's second epoch (what a long training run sees), and the CPU time per GB of each (the
loader's over both epochs, workers included), which does not depend on what else runs, and the
start-up: how much longer the first epoch took than the second, and when its first batch came.
Bandwidth is bytes of the shard files per second, so float16 numbers compare like with like
(the loader hands out twice those bytes as float32, or the same bytes with --keep-16bit: what
a GPU run's host does, the GPU up-casting after the transfer).
Shards have one layer and no CLS token, so the loader reads every byte of every file.

With --cold, the files are dropped from the page cache (`evict`) before every raw pass and every
loader epoch, so both read from the disk, as for shard sets larger than memory; the raw read is
then the disk's sequential bandwidth through 16 MiB `read`s into one reused buffer. Each line
--memory-limit-gb puts the benchmark into a memory cgroup of that size (root; as a SLURM job's
limit does), so that shards larger than it cannot stay cached: the regime of terabyte sets.
Each line also gives the distinct examples per batch (median over the epoch's batches; the
shuffle quality that a faster read path must keep).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import statistics
import time

import numpy as np

from saev import shards
from saev.data.loaders import ShuffledLoader
from saev.data.pipeline import READS, resolve_read

N_PATCHES = 196  # ViT-B/16 at 224 px
READ_BYTES = 16 * 2**20  # the sequential reference's read size with --cold


def write_shards(root: pathlib.Path, dtype: str, gb: float, d_model: int) -> pathlib.Path:
    bytes_per_example = N_PATCHES * d_model * shards.DTYPE_ITEMSIZE[dtype]
    n_examples = int(gb * 1e9 // bytes_per_example)
    md = shards.Metadata(
        model={"family": "benchmark", "ckpt": "random"}, layers=(0,), cls_token=False,
        n_patches_per_example=N_PATCHES, d_model=d_model, dtype=dtype, n_examples=n_examples,
        examples_per_shard=512, data={"name": "random-normal", "gb": gb},
    )  # fmt: skip
    writer = shards.ShardWriter(root, md)
    if not writer.complete:
        size = f"{n_examples * bytes_per_example / 1e9:.2f} GB"
        print(f"writing {n_examples} examples ({size}) to {writer.root}")
        rng = np.random.default_rng(0)
        for start in range(writer.n_done, n_examples, 64):
            n = min(64, n_examples - start)
            acts = rng.standard_normal((n, 1, N_PATCHES, d_model), dtype=np.float32)
            writer.add(acts, [{"index": i} for i in range(start, start + n)])
    writer.close()
    return writer.root


def evict(shard_dir: pathlib.Path) -> None:
    """Drop the shard files' pages from the page cache (no root needed), so the next read comes
    from the disk, as for shard sets larger than memory."""
    for path in pathlib.Path(shard_dir).glob("acts*.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def limit_memory(gb: float) -> None:
    """Move this process into a fresh memory cgroup of `gb` (needs root; cgroup v2 or v1)."""
    limit = str(int(gb * 2**30))
    if pathlib.Path("/sys/fs/cgroup/cgroup.controllers").exists():
        group, knob = pathlib.Path("/sys/fs/cgroup/saev-bench"), "memory.max"
    else:
        group, knob = pathlib.Path("/sys/fs/cgroup/memory/saev-bench"), "memory.limit_in_bytes"
    group.mkdir(exist_ok=True)
    (group / knob).write_text(limit)
    (group / "cgroup.procs").write_text(str(os.getpid()))


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the loader's workers), user + system."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def raw_pass(paths: list[pathlib.Path], how: str) -> float:
    """Seconds to read every file whole into a fresh numpy array."""
    start = time.perf_counter()
    if how == "read16":
        chunk = bytearray(READ_BYTES)
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(chunk) == READ_BYTES:
                    pass
        return time.perf_counter() - start
    for path in paths:
        if how == "fromfile":
            arr = np.fromfile(path, dtype=np.uint8)
        else:
            arr = np.array(np.memmap(path, dtype=np.uint8, mode="r"))
        del arr
    return time.perf_counter() - start


def loader_epochs(
    root,
    batch_size: int,
    buffer_mb: int,
    n_workers: int,
    seed: int,
    device="cpu",
    cold=False,
    read="auto",
    upcast=True,
):
    """Seconds for a fresh loader's first epoch (its start-up included) and for its second
    epoch (workers, memory maps and buffer already set up), the rows served per epoch, the
    distinct examples of each batch, and the seconds until the first batch; with a CUDA
    `device`, each batch is also copied into it (the bandwidth into the GPU); with `cold`, the
    files are evicted before each epoch."""
    import torch

    to_device = device != "cpu"
    seconds, rows, distinct = [], [], []
    if cold:
        evict(root)
    start = time.perf_counter()
    loader = ShuffledLoader(
        root, 0, batch_size, "patches", seed=seed, n_workers=n_workers, buffer_mb=buffer_mb,
        read=read, upcast=upcast,
    )  # fmt: skip
    first_batch = None
    for epoch in range(2):
        rows.append(0)
        examples = []  # of full batches; counted after the clock stops (np.unique: ~1 ms a batch)
        for batch in loader:
            if first_batch is None:
                first_batch = time.perf_counter() - start
            act = batch["act"].to(device, non_blocking=True) if to_device else batch["act"]
            rows[-1] += len(act)
            if len(act) == batch_size:
                examples.append(batch["example_idx"].numpy().copy())
        if to_device and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        distinct += [len(np.unique(ex)) for ex in examples]
        if cold and epoch == 0:
            evict(root)
        start = time.perf_counter()
    loader.close()
    return seconds, rows, distinct, first_batch


def measure(root, paths, n_bytes: int, row_bytes: int, args):
    """Bandwidths (bytes/s) of raw passes and loader epochs, and CPU seconds per GB of each.

    Raw passes and loader epochs alternate: other processes share this machine, so the two
    measurements should see the same load.
    """
    hows = ["read16"] if args.cold else ["fromfile", "memmap"]
    raw, loader_bw, cpu = {how: [] for how in hows}, [], {"raw": [], "loader": []}
    steady_bw, distinct, startup = [], [], {"extra": [], "first_batch": []}
    for seed in range(args.passes):
        for how in raw:
            if args.cold:
                evict(root)
            c0 = cpu_seconds()
            raw[how].append(n_bytes / raw_pass(paths, how))
            cpu["raw"].append((cpu_seconds() - c0) / (n_bytes / 1e9))
        c0 = cpu_seconds()
        seconds, rows, batch_distinct, first_batch = loader_epochs(
            root, args.batch_size, args.buffer_mb, args.n_workers, seed, args.device, args.cold,
            args.read, not args.keep_16bit,
        )  # fmt: skip
        distinct += batch_distinct
        cpu["loader"].append((cpu_seconds() - c0) / (2 * n_bytes / 1e9))
        assert all(n * row_bytes == n_bytes for n in rows)  # every activation, each epoch
        loader_bw.append(n_bytes / seconds[0])
        steady_bw.append(n_bytes / seconds[1])
        startup["extra"].append(seconds[0] - seconds[1])
        startup["first_batch"].append(first_batch)
    return raw, loader_bw, steady_bw, cpu, distinct, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/saev-bench-shards", type=pathlib.Path)
    parser.add_argument("--gb", default=2.0, type=float, help="size of the float32 shards")
    parser.add_argument("--d-model", default=768, type=int)
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--batch-size", default=16384, type=int)
    parser.add_argument("--buffer-mb", default=512, type=int)
    parser.add_argument("--n-workers", default=2, type=int)
    parser.add_argument("--passes", default=3, type=int)
    parser.add_argument("--device", default="cpu", help="copy each batch into it (cuda: to GPU)")
    parser.add_argument("--cold", action="store_true", help="evict the files before every pass")
    parser.add_argument("--read", default="auto", choices=READS, help="the loader's read path")
    parser.add_argument(
        "--keep-16bit", action="store_true", help="16-bit batches, as for a GPU (which up-casts)"
    )
    parser.add_argument("--memory-limit-gb", type=float, help="run inside a memory cgroup (root)")
    args = parser.parse_args()
    if args.memory_limit_gb:
        limit_memory(args.memory_limit_gb)
    limit = f", memory limit {args.memory_limit_gb} GiB" if args.memory_limit_gb else ""
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs{limit}")
    for dtype in args.dtypes.split(","):
        gb = args.gb * shards.DTYPE_ITEMSIZE[dtype] / 4  # same number of activations for each dtype
        root = write_shards(args.root / dtype, dtype, gb, args.d_model)
        paths = [f.path for f in shards.open_shards(root).files]
        n_bytes = sum(p.stat().st_size for p in paths)
        if not args.cold:
            raw_pass(paths, "fromfile")  # warm the page cache
        row_bytes = args.d_model * shards.DTYPE_ITEMSIZE[dtype]
        raw, loader_bw, steady_bw, cpu, distinct, startup = measure(
            root, paths, n_bytes, row_bytes, args
        )
        read = resolve_read(args.read, shards.open_shards(root))
        # fadvise cannot drop pages that the workers keep mapped: mmap's second epoch is cached.
        second_note = "; files may stay cached, mapped" if args.cold and read == "mmap" else ""
        raw_bw = max(statistics.median(v) for v in raw.values())
        med = statistics.median(loader_bw)
        raws = ", ".join(f"{how} {statistics.median(v) / 1e9:.2f}" for how, v in raw.items())
        print(
            f"{dtype}{' (cold)' if args.cold else ''}: {n_bytes / 1e9:.2f} GB in {len(paths)} "
            f"files | raw read ({raws}) -> {raw_bw / 1e9:.2f} GB/s | "
            f"ShuffledLoader epochs {', '.join(f'{b / 1e9:.2f}' for b in loader_bw)} GB/s, median "
            f"{med / 1e9:.2f} GB/s = {med / raw_bw:.0%} of raw | buffer {args.buffer_mb} MB, "
            f"{args.n_workers} workers, batch {args.batch_size}, into {args.device}, read "
            f"{read}{', 16-bit batches' if args.keep_16bit else ''}\n  second epoch of the same "
            f"loader (start-up paid{second_note}): "
            f"{', '.join(f'{b / 1e9:.2f}' for b in steady_bw)} GB/s, median "
            f"{statistics.median(steady_bw) / raw_bw:.0%} of raw | CPU s per GB: raw "
            f"{statistics.median(cpu['raw']):.2f}, loader {statistics.median(cpu['loader']):.2f}"
            f" | distinct examples per batch {statistics.median(distinct):.0f}\n  start-up: "
            f"first epoch - second {statistics.median(startup['extra']):.2f} s, first batch after"
            f" {statistics.median(startup['first_batch']):.2f} s"
        )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
