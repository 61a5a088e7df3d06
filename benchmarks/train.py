"""Training-step throughput in SAE-activations/s (activations/s times number of SAEs).

Two measurements, each interleaved with its references in the same process (the machine may be
shared, so ratios measured side by side are what count; medians over --repeats rounds):

1. The real `SAEModule` step under a Lightning `Trainer` on in-memory batches (disk speed does
   not count), for 1 and 8 SAEs of each kind, against the dense matmul floor: the five B x D x S
   products a dense SAE step cannot avoid (encoder forward and weight gradient, decoder forward,
   weight and input gradient), and for the TopK family the one product its sparse step keeps.
   (JumpReLU's encoder product stays float32 under bf16-mixed by design, against a bf16 floor.)
2. The bare TopK step (our SAE, Adam, parallel-gradient removal, clipping, renormalization)
   against EleutherAI's sparsify doing the same (its `Sae`, Adam, its gradient projection and
   renormalization, its dead-latent bookkeeping), when `eai-sparsify` is installed
   (`pip install saev[bench]`).
3. `--batched-n` same-shape SAEs of each of `--batched-kinds` as one batched group (saev.nn.batched)
   against the same SAEs run one by one (`SAEModule(batched=False)`), same `SAEModule` step.

    python benchmarks/train.py                # CPU-sized: d_model 256, d_sae 8192, batch 4096
    python benchmarks/train.py --device cuda --d-model 1024 --d-sae 16384 --batch 16384 \
        --precision bf16-mixed --compile
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import lightning as L
import torch

from saev.nn import SAE, SAEConfig
from saev.train.module import Member, SAEModule


class RandomBatches:
    """`steps` batches of one fixed random tensor already on the device."""

    def __init__(self, x_BD: torch.Tensor, steps: int):
        self.x_BD, self.steps = x_BD, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([{"act": self.x_BD}] * self.steps)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer(L.Callback):
    """Wall time of the steps from `warmup` up to `end`, each counted from its batch's start. The
    run has one step more than is timed: `SAEModule` computes its metrics at the final step
    (about a step's cost more), which a real run does once every `log_every` steps."""

    def __init__(self, warmup: int, end: int, device: str):
        self.warmup, self.end_step, self.device = warmup, end, device
        self.start = self.end = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step in (self.warmup, self.end_step):
            sync(self.device)
            now = time.perf_counter()
            if trainer.global_step == self.warmup:
                self.start = now
            else:
                self.end = now


def sae_config(kind: str, d_model: int, d_sae: int, k: int) -> SAEConfig:
    aux = dict(k=k, aux_k=512, aux_coeff=1 / 32)
    cfg = {
        "relu": dict(
            activation="relu", sparsity_coeff=4e-4, sparsity_warmup_steps=0, l1_decoder_norm=False
        ),
        "jumprelu": dict(
            activation="jumprelu", sparsity_coeff=1e-3, sparsity_warmup_steps=0,
            bandwidth=1e-3, init_threshold=1e-3,
        ),
        "topk": dict(activation="topk", **aux),
        "batchtopk": dict(activation="batchtopk", threshold_momentum=0.01, **aux),
    }[kind]  # fmt: skip
    return SAEConfig(d_sae=d_sae, **cfg).resolve(d_model)


def module_rate(args, kind: str, n_saes: int, batched: bool = True) -> float:
    """SAE-activations per second of full training steps through Lightning."""
    members = [
        Member(f"{i}", sae_config(kind, args.d_model, args.d_sae, args.k), 1e-4, 0, 1.0, seed=i)
        for i in range(n_saes)
    ]
    module = SAEModule(members, log_every=10**9, compile=args.compile, batched=batched)
    x_BD = torch.randn(args.batch, args.d_model, device=args.device)
    n_steps = args.warmup + args.steps + 1  # the last one, with metrics, is not timed
    timer = Timer(args.warmup, args.warmup + args.steps, args.device)
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
        precision="32-true" if args.precision == "32" else args.precision,
        max_steps=n_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, RandomBatches(x_BD, n_steps))
    return args.batch * args.steps * n_saes / (timer.end - timer.start)


def timed(step, args) -> float:
    """Activations/s of `step()` after warmup."""
    for _ in range(args.warmup):
        step()
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    return args.batch * args.steps / (time.perf_counter() - start)


def matmul_floor(args, n_products: int) -> float:
    """Activations/s if a step cost only its first `n_products` of the five B x D x S products
    (dense, in the step's compute dtype)."""
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    B, D, S, dev = args.batch, args.d_model, args.d_sae, args.device
    x, g = (torch.randn(B, D, device=dev, dtype=dtype) for _ in range(2))
    f = torch.randn(B, S, device=dev, dtype=dtype)
    W_enc, W_dec = (
        torch.randn(D, S, device=dev, dtype=dtype),
        torch.randn(S, D, device=dev, dtype=dtype),
    )
    products = [lambda: x @ W_enc, lambda: f @ W_dec, lambda: f.T @ g, lambda: g @ W_dec.T]
    products.append(lambda: x.T @ f)

    def step():
        for p in products[:n_products]:
            p()

    return timed(step, args)


def autocast(args):
    if args.precision != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)


def ours_bare_step(args, x_BD):
    """Our TopK SAE step as `SAEModule.training_step` takes it, without Lightning."""
    sae = SAE(sae_config("topk", args.d_model, args.d_sae, args.k)).to(args.device).train()
    sae.init_b_dec_(x_BD)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)  # as SAEModule
    forward = torch.compile(sae) if args.compile else sae

    def step():
        with autocast(args):
            out = forward(x_BD)
        assert torch.isfinite(out.loss.detach()).item()  # the module's per-step finite check
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.normalize_decoder_()

    return step


def sparsify_bare_step(args, x_BD):
    """sparsify's TopK step as its `Trainer` takes it with the Adam optimizer: forward with the
    dead mask (AuxK skipped while nothing is dead), fvu + auxk_alpha * auxk, gradient
    projection, Adam, renormalization, dead-latent bookkeeping."""
    from sparsify import Sae, SaeConfig

    cfg = SaeConfig(num_latents=args.d_sae, k=args.k)
    sae = Sae(args.d_model, cfg, device=args.device)
    sae.b_dec.data = x_BD.mean(0)
    lr = 2e-4 / (args.d_sae / 2**14) ** 0.5  # sparsify's own Adam default
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired_S = torch.zeros(args.d_sae, dtype=torch.long, device=args.device)
    forward = torch.compile(sae) if args.compile else sae

    def step():
        dead_S = since_fired_S > 10_000_000
        with autocast(args):
            out = forward(x_BD, dead_mask=dead_S)
        loss = out.fvu + out.auxk_loss / 32
        did_fire = torch.zeros(args.d_sae, dtype=torch.bool, device=args.device)
        did_fire[out.latent_indices.flatten()] = True
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        since_fired_S.add_(len(x_BD))
        since_fired_S[did_fire] = 0

    return step


def compare_with_sparsify(args) -> None:
    if not args.device.startswith("cuda"):
        # sparsify picks its Triton decoder whenever Triton imports; it runs only on CUDA.
        os.environ["SPARSIFY_DISABLE_TRITON"] = "1"
    try:
        import sparsify  # noqa: F401
    except ImportError as err:
        print(f"sparsify not importable ({err}); `pip install saev[bench]` to compare with it.")
        return
    x_BD = torch.randn(args.batch, args.d_model, device=args.device) + 2.0
    ours, theirs = ours_bare_step(args, x_BD), sparsify_bare_step(args, x_BD)
    rates = {"ours": [], "sparsify": [], "floor1": []}
    for _ in range(args.repeats):
        rates["ours"].append(timed(ours, args))
        rates["sparsify"].append(timed(theirs, args))
        rates["floor1"].append(matmul_floor(args, 1))
    ratio = [a / b for a, b in zip(rates["ours"], rates["sparsify"])]
    of_floor = [a / b for a, b in zip(rates["ours"], rates["floor1"])]
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"bare topk k={args.k}: ours {med['ours']:.4g} act/s, sparsify {med['sparsify']:.4g} "
        f"act/s, one-product floor {med['floor1']:.4g} act/s (medians of {args.repeats})"
    )
    print(
        f"  ours / sparsify per round: {' '.join(f'{r:.2f}' for r in ratio)} "
        f"(median {statistics.median(ratio):.2f}x); ours / one-product floor: median "
        f"{statistics.median(of_floor):.0%}"
    )


def compare_with_floor(args) -> None:
    for kind in args.kinds:
        for n in args.n_saes:
            floors = {1: [], 5: []}
            rates = []
            for _ in range(args.repeats):
                rates.append(module_rate(args, kind, n))
                for p in floors:
                    floors[p].append(matmul_floor(args, p))
            rate = statistics.median(rates)
            f5, f1 = (statistics.median(floors[p]) for p in (5, 1))
            sparse = kind in ("topk", "batchtopk")
            line = (
                f"{kind:<9} x{n}: {rate:.4g} SAE-activations/s; dense 5-product floor {f5:.4g} "
                f"({rate / f5:.0%} of it)"
            )
            if sparse:
                line += f"; 1-product floor {f1:.4g} ({rate / f1:.0%} of it)"
            print(line)


def compare_batched(args) -> None:
    """N same-shape SAEs as one batched group against the same N run one by one."""
    n = args.batched_n
    for kind in args.batched_kinds:
        rates = {True: [], False: []}
        for _ in range(args.repeats):
            for batched in rates:
                rates[batched].append(module_rate(args, kind, n, batched))
        ratio = [a / b for a, b in zip(rates[True], rates[False])]
        med = {b: statistics.median(r) for b, r in rates.items()}
        step = {b: args.batch * n / r for b, r in med.items()}  # seconds per step of all N
        print(
            f"{kind:<9} x{n} batched {step[True] * 1e3:.4g} ms/step, {med[True]:.4g} "
            f"SAE-activations/s | separate {step[False] * 1e3:.4g} ms/step, {med[False]:.4g} "
            f"SAE-activations/s | batched / separate per round: "
            f"{' '.join(f'{r:.2f}' for r in ratio)} (median {statistics.median(ratio):.2f}x)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians count")
    p.add_argument("--n-saes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--kinds", nargs="+", default=["relu", "jumprelu", "topk", "batchtopk"])
    p.add_argument("--batched-n", type=int, default=8, help="SAEs per batched group")
    p.add_argument("--batched-kinds", nargs="+", default=["relu", "topk"])
    p.add_argument("--skip", nargs="*", default=[], choices=["module", "sparsify", "batched"])
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={args.device} threads={torch.get_num_threads()} load={load:.1f} "
        f"d_model={args.d_model} d_sae={args.d_sae} batch={args.batch} k={args.k} "
        f"precision={args.precision} compile={args.compile}"
    )
    if "sparsify" not in args.skip:
        compare_with_sparsify(args)
    if "module" not in args.skip:
        compare_with_floor(args)
    if "batched" not in args.skip:
        compare_batched(args)


if __name__ == "__main__":
    main()
