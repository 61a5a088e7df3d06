"""Time to a resumed run's first batch: positioned without reading (`ShuffledLoader.iter_from`)
against reading and discarding the epoch's earlier batches (how resuming worked before).

    python benchmarks/resume.py                  # ~1 GB float32 768-d shards, 64 MiB buffer
    python benchmarks/resume.py --gb 4 --cold    # evict the files from the page cache each time

The shard set is many times the shuffle buffer; the resume point is --at of the way through an
epoch. Prints the seconds from constructing the loader to holding the first batch, for both ways,
median of --passes; with --cold the files are evicted from the page cache before every pass
(`posix_fadvise(DONTNEED)`, no root needed), as for shard sets larger than memory.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from loader import evict, write_shards  # noqa: E402

from saev.data.loaders import ShuffledLoader  # noqa: E402


def first_batch_seconds(root, batch_size: int, buffer_mb: int, at: float, seek: bool) -> float:
    t0 = time.perf_counter()
    loader = ShuffledLoader(root, 0, batch_size, buffer_mb=buffer_mb, n_workers=2)
    k = int(at * len(loader))
    it = loader.iter_from(k) if seek else itertools.islice(iter(loader), k, None)
    next(it)
    seconds = time.perf_counter() - t0
    del it
    loader.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/saev-bench-resume")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--batch-size", type=int, default=16384)
    ap.add_argument("--buffer-mb", type=int, default=64)
    ap.add_argument("--at", type=float, default=0.9, help="resume point, fraction of an epoch")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="evict the shards before every pass")
    args = ap.parse_args()
    root = write_shards(pathlib.Path(args.root), "float32", args.gb, args.d_model)
    size = sum(p.stat().st_size for p in pathlib.Path(root).glob("acts*.bin"))
    print(f"shards: {size / 1e9:.2f} GB ({size / 2**20 / args.buffer_mb:.0f}x the buffer)")
    times = {"read and discard": [], "positioned": []}
    for _ in range(args.passes):  # interleaved, so load on the machine hits both alike
        for name, seek in (("read and discard", False), ("positioned", True)):
            if args.cold:
                evict(root)
            times[name].append(
                first_batch_seconds(root, args.batch_size, args.buffer_mb, args.at, seek)
            )
    cache = "cold" if args.cold else "warm"
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"first batch at {args.at:.0%} of an epoch, {cache} cache, {name}: {median:.2f} s")


if __name__ == "__main__":
    main()
