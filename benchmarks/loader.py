"""Shuffled-loader bandwidth and CPU against a raw read of the same shard files (issues 3, 22).

    python benchmarks/loader.py                       # ~2 GB float32 and ~1 GB float16, 768-d
    python benchmarks/loader.py --dtypes float32 --buffer-mb 512
    python benchmarks/loader.py --cold --dtypes float32   # the files evicted before every pass
    python benchmarks/loader.py --cold --gb 6 --memory-limit-gb 3   # shards larger than memory
    python benchmarks/loader.py --baseline ../main   # another checkout's loader, interleaved
    python benchmarks/loader.py --n-workers 1,2,4,8  # reader scaling

Writes the shards once under --root (reused on later runs), warms the page cache, then prints for
each dtype: the raw bandwidth (each whole file read into a fresh numpy array, the better of
`np.fromfile` and a copy out of a memmap; median of --passes passes), the ShuffledLoader's
bandwidth over one full epoch including its start-up (constructing it, starting the readers,
mapping the files and touching the buffer for the first time), their ratio, the same for the
loader's second epoch (what a long training run sees), and the CPU time per GB of each (the
loader's over both epochs: its reader threads, each read from /proc/self/task/<tid>/stat before
the loader closes, and its main thread, the rest of the process's; for a --baseline checkout whose
readers are processes, those and the forkserver that starts them; the read's of the cheaper way),
which depends much less than bandwidth on what else runs, the same for the second epoch alone
(what each further epoch of a long run costs), and the start-up: how much longer the
first epoch took than the second, and when its first batch came.
Bandwidth is bytes of the shard files per second, so float16 numbers compare like with like
(the loader hands out twice those bytes as float32, or the same bytes with --keep-16bit: what
a GPU run's host does, the GPU up-casting after the transfer).
Shards have one layer and no CLS token, so the loader reads every byte of every file.

With --cold, the files are dropped from the page cache (`evict`) before every raw pass and every
loader epoch, so both read from the disk, as for shard sets larger than memory; the raw read is
then the disk's sequential bandwidth through 16 MiB `read`s into one reused buffer. Each line
--memory-limit-gb puts the benchmark into a memory cgroup of that size (root; as a SLURM job's
limit does), so that shards larger than it cannot stay cached: the regime of terabyte sets.
Every loader pass runs in a fresh subprocess (a fresh loader, as a training job has). With
--baseline DIR, each pass also runs the loader of the checkout at DIR (PYTHONPATH=DIR), right
after this one's, so that both see the same load; each gets its own lines.
Each line also gives the distinct examples per batch (median over the epoch's batches; the
shuffle quality that a faster read path must keep).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from saev import shards
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
    """CPU time of this process, user + system, all its threads (reader threads included)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def stat_cpu_seconds(path: str) -> float:
    """User + system CPU time in a Linux /proc stat file (a process's or a thread's)."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loader_cpu_seconds(loader, c0: float) -> dict[str, float]:
    """CPU seconds since `c0` (`cpu_seconds()` before the loader was built) of the loader's
    readers and of the rest ("main": the main thread, its fills instead of waiting included),
    read while the readers live. Reader threads are this process's: their time is taken out of
    the process's. A --baseline checkout's reader processes (and the forkserver that started
    them) are not this process's children, so no getrusage here counts them: read apart."""
    pipe, own = loader._pipeline, cpu_seconds() - c0
    if pipe is None or hasattr(pipe, "_threads"):
        readers = 0.0
        for t in pipe._threads if pipe else []:
            try:
                readers += stat_cpu_seconds(f"/proc/self/task/{t.native_id}/stat")
            except (FileNotFoundError, ProcessLookupError):
                pass
        return {"main": own - readers, "readers": readers}
    from multiprocessing import forkserver

    server = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    readers = 0.0
    for pid in [p.pid for p in pipe._procs] + ([server] if server else []):
        try:
            readers += stat_cpu_seconds(f"/proc/{pid}/stat")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return {"main": own, "readers": readers}


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
    epoch (readers, memory maps and buffer already set up), the rows served per epoch, the
    distinct examples of each batch, and the seconds until the first batch; with a CUDA
    `device`, each batch is also copied into it (the bandwidth into the GPU); with `cold`, the
    files are evicted before each epoch."""
    import torch

    from saev.data.loaders import ShuffledLoader

    to_device = device != "cpu"
    seconds, rows, distinct = [], [], []
    if cold:
        evict(root)
    c0 = cpu_seconds()
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
        if epoch == 0:  # the first epoch's CPU: the second's is the steady state's
            first_cpu = loader_cpu_seconds(loader, c0)
        if cold and epoch == 0:
            evict(root)
        start = time.perf_counter()
    cpu = loader_cpu_seconds(loader, c0)
    cpu |= {f"{k}_first": v for k, v in first_cpu.items()}
    loader.close()
    return seconds, rows, distinct, first_batch, cpu


def loader_pass(args, seed: int, pythonpath: str | None) -> dict:
    """`loader_epochs` in a fresh subprocess that imports saev from `pythonpath` (else this
    checkout's)."""
    path = pythonpath or str(pathlib.Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": path}
    job = {k: str(v) for k, v in vars(args).items()} | {"seed": seed}
    out = subprocess.run(
        [sys.executable, __file__, "--one-pass", json.dumps(job)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"loader pass ({path}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_pass(job: dict) -> None:
    """The --one-pass subprocess: one fresh loader's two epochs, as JSON on stdout."""
    seconds, rows, distinct, first_batch, cpu = loader_epochs(
        pathlib.Path(job["root"]), int(job["batch_size"]), int(job["buffer_mb"]),
        int(job["n_workers"]), int(job["seed"]), job["device"], job["cold"] == "True",
        job["read"], job["keep_16bit"] != "True",
    )  # fmt: skip
    print(
        json.dumps(dict(seconds=seconds, rows=rows, distinct=distinct, first=first_batch, cpu=cpu))
    )


def measure(root, paths, n_bytes: int, args, n_workers: int) -> dict:
    """Per pass: the raw reads (bandwidth, CPU s/GB) and, for this checkout and --baseline, one
    fresh loader's two epochs. Raw passes and loaders alternate: other processes share this
    machine, so all should see the same load."""
    hows = ["read16"] if args.cold else ["fromfile", "memmap"]
    impls = {"this": None} | ({"baseline": args.baseline} if args.baseline else {})
    raw = {how: {"bw": [], "cpu": []} for how in hows}
    runs = {name: [] for name in impls}
    job = argparse.Namespace(**{**vars(args), "root": root, "n_workers": n_workers})
    for seed in range(args.passes):
        for how in hows:
            if args.cold:
                evict(root)
            c0 = cpu_seconds()
            raw[how]["bw"].append(n_bytes / raw_pass(paths, how))
            raw[how]["cpu"].append((cpu_seconds() - c0) / (n_bytes / 1e9))
        for name, pythonpath in impls.items():
            runs[name].append(loader_pass(job, seed, pythonpath))
    return {"raw": raw, "runs": runs}


def report(dtype, n_bytes, n_files, row_bytes, read, n_workers, got, args) -> None:
    med = statistics.median
    raw = {how: (med(v["bw"]), med(v["cpu"])) for how, v in got["raw"].items()}
    raw_bw = max(bw for bw, _ in raw.values())
    raw_cpu = min(cpu for _, cpu in raw.values())  # the cheapest read: the strictest reference
    gb = n_bytes / 1e9
    cold = " (cold)" if args.cold else ""
    reads = ", ".join(
        f"{how} {bw / 1e9:.2f} GB/s at {cpu:.2f} CPU s/GB" for how, (bw, cpu) in raw.items()
    )
    print(f"{dtype}{cold}: {gb:.2f} GB in {n_files} files | raw read: {reads}")
    # fadvise cannot drop pages that the readers keep mapped: mmap's second epoch is cached.
    second_note = "; files may stay cached, mapped" if args.cold and read == "mmap" else ""
    for name, runs in got["runs"].items():
        assert all(n * row_bytes == n_bytes for r in runs for n in r["rows"])  # every activation
        first = [n_bytes / r["seconds"][0] for r in runs]
        second = [n_bytes / r["seconds"][1] for r in runs]
        main = med(r["cpu"]["main"] / (2 * gb) for r in runs)
        readers = med(r["cpu"]["readers"] / (2 * gb) for r in runs)
        total = med((r["cpu"]["main"] + r["cpu"]["readers"]) / (2 * gb) for r in runs)
        # The second epoch alone: what each further epoch of a long run costs.
        steady = {
            who: med((r["cpu"][who] - r["cpu"][f"{who}_first"]) / gb for r in runs)
            for who in ("main", "readers")
        }
        steady_total = med(
            sum(r["cpu"][who] - r["cpu"][f"{who}_first"] for who in ("main", "readers")) / gb
            for r in runs
        )
        distinct = med(d for r in runs for d in r["distinct"])
        extra = med(r["seconds"][0] - r["seconds"][1] for r in runs)
        print(
            f"  [{name}] ShuffledLoader, {n_workers} workers, buffer {args.buffer_mb} MB, batch "
            f"{args.batch_size}, read {read}{', 16-bit batches' if args.keep_16bit else ''}, "
            f"into {args.device}\n"
            f"    first epoch (start-up included) {', '.join(f'{b / 1e9:.2f}' for b in first)} "
            f"GB/s, median {med(first) / 1e9:.2f} = {med(first) / raw_bw:.0%} of raw | second "
            f"epoch{second_note} {', '.join(f'{b / 1e9:.2f}' for b in second)} GB/s, median "
            f"{med(second) / raw_bw:.0%} of raw\n"
            f"    CPU s per GB: loader {total:.2f} (main {main:.2f} + readers {readers:.2f}) = "
            f"{total / raw_cpu:.1f}x the raw read's {raw_cpu:.2f}; second epoch alone "
            f"{steady_total:.2f} (main {steady['main']:.2f} + readers {steady['readers']:.2f}) = "
            f"{steady_total / raw_cpu:.1f}x\n    distinct examples per batch "
            f"{distinct:.0f} | first epoch - second {extra:.2f} s, first batch after "
            f"{med(r['first'] for r in runs):.2f} s"
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one-pass":
        return one_pass(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/saev-bench-shards", type=pathlib.Path)
    parser.add_argument("--gb", default=2.0, type=float, help="size of the float32 shards")
    parser.add_argument("--d-model", default=768, type=int)
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--batch-size", default=16384, type=int)
    parser.add_argument("--buffer-mb", default=512, type=int)
    parser.add_argument("--n-workers", default="2", help="a comma-separated list: reader scaling")
    parser.add_argument("--passes", default=3, type=int)
    parser.add_argument("--device", default="cpu", help="copy each batch into it (cuda: to GPU)")
    parser.add_argument("--cold", action="store_true", help="evict the files before every pass")
    parser.add_argument("--read", default="auto", choices=READS, help="the loader's read path")
    parser.add_argument(
        "--keep-16bit", action="store_true", help="16-bit batches, as for a GPU (which up-casts)"
    )
    parser.add_argument("--memory-limit-gb", type=float, help="run inside a memory cgroup (root)")
    parser.add_argument("--baseline", help="also run the loader of the checkout at this path")
    args = parser.parse_args()
    if args.memory_limit_gb:
        limit_memory(args.memory_limit_gb)  # the loader subprocesses inherit the cgroup
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
        read = resolve_read(args.read, shards.open_shards(root))
        for n_workers in [int(n) for n in args.n_workers.split(",")]:
            got = measure(root, paths, n_bytes, args, n_workers)
            report(dtype, n_bytes, len(paths), row_bytes, read, n_workers, got, args)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
