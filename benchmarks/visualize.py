"""Throughput and peak memory of visualize's pass (`saev.visualize.statistics.summarize`), issue 8.

    python benchmarks/visualize.py                          # d_sae 16384, top_k 128, CPU or GPU
    python benchmarks/visualize.py --device cuda --n-batches 50
    python benchmarks/visualize.py --probe    # label probes (150 patch classes) against none

Feeds in-memory random activations (so the disk does not enter the figure; the ordered loader
has its own benchmark) through a random TopK SAE and prints, for the pass and for the bare SAE
(encode + decode of the same batches, what any evaluation costs), tokens per second, plus the
pass's peak memory: on CUDA the peak allocated device memory, on the CPU the growth of the peak
resident set over the bare run. The pass's own state is top_k x d_sae values and (example, token)
pairs: bounded, whatever the number of tokens.

`--probe` (issue 21) times the pass with label probes (random patch labels of 150 classes plus
"unlabeled", `probe.memory_mb` of histograms) against the pass without, interleaved (`--repeats`
pairs, so a loaded machine slows both alike), and the probe's one-off scoring at the end.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from saev import nn
from saev.visualize import statistics as visuals


def batches(n: int, batch_size: int, d_model: int, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x_BD = torch.randn(batch_size, d_model, generator=gen).to(device)
    for i in range(n):
        ex_B = torch.arange(batch_size) // 256 + i * (batch_size // 256)
        # Fresh values each batch so the top-k really changes; cheap next to the SAE.
        tok_B = torch.arange(batch_size) % 256
        yield {"act": x_BD.roll(i, 0), "example_idx": ex_B, "token_idx": tok_B}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def bare(sae, n: int, args, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for b in batches(n, args.batch_size, args.d_model, device):
        sae.decode(sae.encode(b["act"]))
    sync(device)
    return time.perf_counter() - t0


def probe_vs_none(sae, n: int, args, device) -> None:
    """The pass with and without label probes, interleaved; then the probe's scoring."""
    import numpy as np

    from saev.visualize import probe
    from saev.visualize.labels import Level

    n_examples = n * args.batch_size // 256 + 1
    labels_NP = np.random.default_rng(0).integers(0, 151, (n_examples, 256), dtype=np.uint8)
    level = Level("patch", ["unlabeled", *(f"class {c}" for c in range(1, 151))], labels_NP)
    t_with, t_without, finish = [], [], []
    for _ in range(args.repeats):
        for with_probe in (False, True):
            tracker = None
            if with_probe:
                tracker = probe.Probe([level], sae, False, args.memory_mb, device)
            sync(device)
            t0 = time.perf_counter()
            b = batches(n, args.batch_size, args.d_model, device)
            visuals.summarize(sae, b, args.top_k, device, tracker)
            sync(device)
            (t_with if with_probe else t_without).append(time.perf_counter() - t0)
            if with_probe:
                t0 = time.perf_counter()
                tracker.finish()
                sync(device)
                finish.append(time.perf_counter() - t0)
    w, wo = sum(t_with), sum(t_without)
    print(f"  probe: {tracker.n_bins} bins x 151 labels x ({args.d_sae} latents + "
          f"{2 * args.d_model} neurons), {args.memory_mb} MiB of histograms")  # fmt: skip
    print(f"  pass without probe: {', '.join(f'{t:.2f}' for t in t_without)} s")
    print(f"  pass with probe:    {', '.join(f'{t:.2f}' for t in t_with)} s")
    print(f"  streaming overhead: {w / wo - 1:+.1%} ({args.repeats} interleaved pairs)")
    fin = sum(finish) / len(finish)
    print(
        f"  scoring at the end: {fin:.2f} s once per pass ({fin / (wo / args.repeats):.1%} of "
        f"this {n}-batch pass; less for longer passes)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--top-k", type=int, default=128)
    p.add_argument("--k", type=int, default=64, help="the TopK SAE's active latents per token")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--n-batches", type=int, default=None, help="default: 4 on CPU, 50 on CUDA")
    p.add_argument("--device", default="auto")
    p.add_argument("--probe", action="store_true", help="label probes against none (issue 21)")
    p.add_argument("--repeats", type=int, default=3, help="--probe: interleaved pairs")
    p.add_argument("--memory-mb", type=int, default=1024, help="--probe: probe.memory_mb")
    args = p.parse_args()
    device = visuals.device_of(args.device)
    n = args.n_batches or (50 if device.type == "cuda" else 4)
    cfg = nn.SAEConfig(
        activation="topk", d_model=args.d_model, d_sae=args.d_sae, k=args.k, aux_k=0, aux_coeff=0.0
    )
    sae = nn.SAE(cfg).to(device).eval()
    bare(sae, 1, args, device)  # warm-up: allocator, kernels, page faults
    if args.probe:
        print(f"d_model {args.d_model}, d_sae {args.d_sae}, top_k {args.top_k}, TopK k={args.k}, "
              f"{n} batches of {args.batch_size} tokens on {device}")  # fmt: skip
        return probe_vs_none(sae, n, args, device)
    visuals.summarize(sae, batches(1, args.batch_size, args.d_model, device), args.top_k, device)
    t_bare = bare(sae, n, args, device)
    rss_bare = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync(device)
    t0 = time.perf_counter()
    summary, metrics = visuals.summarize(
        sae, batches(n, args.batch_size, args.d_model, device), args.top_k, device
    )
    sync(device)
    t_pass = time.perf_counter() - t0
    n_tokens = n * args.batch_size
    assert summary.n_tokens == n_tokens
    state_mb = args.top_k * args.d_sae * (4 + 2 * 8) / 2**20
    what = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({device})"
    print(
        f"{what}: d_model {args.d_model}, d_sae {args.d_sae}, top_k {args.top_k}, TopK k={args.k}"
    )
    print(f"  {n} batches of {args.batch_size} tokens ({n_tokens} tokens)")
    print(f"  pass:             {n_tokens / t_pass:12,.0f} tokens/s")
    print(f"  bare SAE (enc+dec): {n_tokens / t_bare:10,.0f} tokens/s")
    print(f"  top-k state: {state_mb:.1f} MiB (top_k x d_sae x (value + example + token))")
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(f"  pass peak device memory above the SAE: {peak:,.0f} MiB")
    else:
        print(
            f"  peak RSS {peak_rss_mb():,.0f} MiB ({peak_rss_mb() - rss_bare:+,.0f} MiB over bare)"
        )


if __name__ == "__main__":
    main()
