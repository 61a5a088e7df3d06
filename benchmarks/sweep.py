"""What sharing a data stream saves: wall time of N SAEs trained in one job (what a sweep's job
does) against 1 SAE alone (what a job per SAE would do), on the same shards, where reading
dominates (small SAEs, one epoch over the shards).

    python benchmarks/sweep.py                    # 1.5 GB float32 768-d shards, 8 ReLU SAEs of 32
    python benchmarks/sweep.py --cold             # drop the shards from the page cache first

Runs `saev.train.job.train` in this process, interleaved (1, N, 1, N, ...: other load on a shared
machine hits both alike), and prints each run's wall and CPU time, then N-together / 1-alone (the
target is at most 1.5) and what N separate jobs would cost (N x 1-alone). `--cold` evicts the shard
files from the page cache before every run (posix_fadvise DONTNEED, no root needed), so every run
reads from the disk; without it the shards come from the page cache when they fit in memory (the
script says whether they do).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from loader import N_PATCHES, cpu_seconds, evict, write_shards  # noqa: E402

from saev import shards  # noqa: E402
from saev.data.config import DataConfig  # noqa: E402
from saev.nn import SAEConfig  # noqa: E402
from saev.train import job as training  # noqa: E402
from saev.train.config import TrainConfig, WandbConfig  # noqa: E402


def configs(args, shard_dir: pathlib.Path, runs_root: pathlib.Path, n: int) -> list[TrainConfig]:
    data = DataConfig(
        shard_root=str(shard_dir), layer=0, batch_size=args.batch, n_workers=args.workers,
        buffer_mb=args.buffer_mb, val_fraction=0.0,
    )  # fmt: skip
    sae = SAEConfig(
        activation="relu", d_sae=args.d_sae, exp_factor=None, sparsity_coeff=4e-4,
        sparsity_warmup_steps=0, l1_decoder_norm=False,
    )  # fmt: skip
    n_train = args.epochs * shard_tokens(shard_dir)
    return [
        TrainConfig(
            data=data,
            sae=sae,
            name=f"sae{i}",
            lr=1e-4 * (i + 1),
            seed=i,
            n_train=n_train,
            runs_root=str(runs_root),
            ckpt_every=10**9,
            log_every=10**9,
            wandb=WandbConfig(enabled=False),
        )  # fmt: skip
        for i in range(n)
    ]


def shard_tokens(shard_dir: pathlib.Path) -> int:
    return shards.open_shards(shard_dir).metadata.n_examples * N_PATCHES


def run(args, shard_dir: pathlib.Path, n: int) -> tuple[float, float]:
    """Wall and CPU seconds of one training job of `n` SAEs (setup, one epoch, export)."""
    if args.cold:
        evict(shard_dir)
    runs_root = pathlib.Path(tempfile.mkdtemp(prefix="saev-bench-runs-"))
    try:
        cpu, start = cpu_seconds(), time.perf_counter()
        training.train(configs(args, shard_dir, runs_root, n))
        return time.perf_counter() - start, cpu_seconds() - cpu
    finally:
        shutil.rmtree(runs_root)


def mem_total_gb() -> float:
    with open("/proc/meminfo") as fd:
        kb = next(int(line.split()[1]) for line in fd if line.startswith("MemTotal:"))
    return kb * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "saev-bench-sweep"))
    parser.add_argument("--gb", type=float, default=1.5, help="size of the shards")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=32, help="latents per SAE (small: I/O bound)")
    parser.add_argument("--n-saes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="data.n_workers")
    parser.add_argument("--buffer-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved (1, N) pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--cold", action="store_true", help="evict the shards before each run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shard_dir = write_shards(pathlib.Path(args.root), "float32", args.gb, args.d_model)
    size_gb = sum(p.stat().st_size for p in shard_dir.glob("acts*.bin")) / 1e9
    ram = mem_total_gb()
    fits = "fit in" if size_gb < 0.8 * ram else "exceed"
    source = "disk (evicted before each run)" if args.cold else "page cache (after a warm-up run)"
    print(
        f"shards: {size_gb:.2f} GB ({shard_tokens(shard_dir):,} tokens of d={args.d_model}), "
        f"RAM {ram:.1f} GB: the shards {fits} the page cache; reads come from the {source}"
    )
    print(
        f"SAEs: ReLU d_sae={args.d_sae}, batch {args.batch}, {args.epochs} epoch(s), "
        f"{args.threads} torch thread(s), {args.workers} loader worker(s), {os.cpu_count()} CPUs"
    )
    run(args, shard_dir, 1)  # warm-up: imports, first-touch of buffers, page cache
    times: dict[int, list[tuple[float, float]]] = {1: [], args.n_saes: []}
    for r in range(args.repeats):
        for n in (1, args.n_saes):
            wall, cpu = run(args, shard_dir, n)
            times[n].append((wall, cpu))
            print(f"  pass {r + 1}: {n} SAE(s) in one job: {wall:6.2f} s wall, {cpu:6.2f} s CPU")
    one = statistics.median(w for w, _ in times[1])
    many = statistics.median(w for w, _ in times[args.n_saes])
    print(
        f"median wall: 1 SAE {one:.2f} s, {args.n_saes} SAEs together {many:.2f} s: "
        f"ratio {many / one:.2f} (target <= 1.5); {args.n_saes} separate jobs would take "
        f"~{args.n_saes * one:.2f} s ({args.n_saes * one / many:.1f}x the shared job)"
    )


if __name__ == "__main__":
    main()
