"""Throughput and peak memory of visualize's pass (`saev.visualize.statistics.summarize`), issue 8.

    python benchmarks/visualize.py                          # d_sae 16384, top_k 128, CPU or GPU
    python benchmarks/visualize.py --device cuda --n-batches 50

Feeds in-memory random activations (so the disk does not enter the figure; the ordered loader
has its own benchmark) through a random TopK SAE and prints, for the pass and for the bare SAE
(encode + decode of the same batches, what any evaluation costs), tokens per second, plus the
pass's peak memory: on CUDA the peak allocated device memory, on the CPU the growth of the peak
resident set over the bare run. The pass's own state is top_k x d_sae values and (example, token)
pairs: bounded, whatever the number of tokens.
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
        yield {"act": x_BD.roll(i, 0), "example_idx": ex_B, "token_idx": torch.arange(batch_size)}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--top-k", type=int, default=128)
    p.add_argument("--k", type=int, default=64, help="the TopK SAE's active latents per token")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--n-batches", type=int, default=None, help="default: 4 on CPU, 50 on CUDA")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = visuals.device_of(args.device)
    n = args.n_batches or (50 if device.type == "cuda" else 4)
    cfg = nn.SAEConfig(
        activation="topk", d_model=args.d_model, d_sae=args.d_sae, k=args.k, aux_k=0, aux_coeff=0.0
    )
    sae = nn.SAE(cfg).to(device).eval()
    bare(sae, 1, args, device)  # warm-up: allocator, kernels, page faults
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
