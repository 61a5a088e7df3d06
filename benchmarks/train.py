"""Training-step throughput in SAE-activations/s (activations/s times number of SAEs).

Runs the real `SAEModule` under a Lightning `Trainer` on in-memory random batches (so disk speed
does not count), for 1 and 8 SAEs of ReLU and TopK, and compares against the machine's
matrix-multiply floor measured in the same process: the five dense GEMMs of shape B x D x S that
one SAE step cannot avoid (encoder forward and weight gradient, decoder forward, weight gradient
and input gradient).

    python benchmarks/train.py                               # CPU-sized: d_model 256, d_sae 2048
    python benchmarks/train.py --device cuda --d-model 1024 --d-sae 16384 --batch 16384 \
        --precision bf16-mixed --compile
"""

import argparse
import os
import time

import lightning as L
import torch

from saev.module import Member, SAEModule
from saev.nn import SAEConfig


class RandomBatches:
    """`steps` batches of one fixed random tensor already on the device."""

    def __init__(self, x_BD: torch.Tensor, steps: int):
        self.x_BD, self.steps = x_BD, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([{"act": self.x_BD}] * self.steps)


class Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self._sync(module)
        self.end = time.perf_counter()


def sae_config(kind: str, d_model: int, d_sae: int, k: int) -> SAEConfig:
    if kind == "relu":
        cfg = SAEConfig(
            activation="relu", sparsity_coeff=4e-4, sparsity_warmup_steps=0, l1_decoder_norm=False
        )
    else:
        cfg = SAEConfig(activation="topk", k=k, aux_k=512, aux_coeff=1 / 32)
    return SAEConfig(**{**cfg.__dict__, "d_sae": d_sae}).resolve(d_model)


def step_rate(args, kind: str, n_saes: int) -> float:
    """SAE-activations per second of full training steps."""
    members = [
        Member(f"{i}", sae_config(kind, args.d_model, args.d_sae, args.k), 1e-4, 0, 1.0, seed=i)
        for i in range(n_saes)
    ]
    module = SAEModule(members, log_every=10**9, compile=args.compile)
    x_BD = torch.randn(args.batch, args.d_model, device=args.device)
    timer = Timer(args.warmup)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="32-true" if args.precision == "32" else args.precision,
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, RandomBatches(x_BD, args.warmup + args.steps))
    return args.batch * args.steps * n_saes / (timer.end - timer.start)


def matmul_floor(args) -> float:
    """SAE-activations/s if a step cost only its five B x D x S GEMMs (dense, same dtype)."""
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    B, D, S = args.batch, args.d_model, args.d_sae
    dev = args.device
    x, g = torch.randn(B, D, device=dev, dtype=dtype), torch.randn(B, D, device=dev, dtype=dtype)
    f, W_enc = (
        torch.randn(B, S, device=dev, dtype=dtype),
        torch.randn(D, S, device=dev, dtype=dtype),
    )
    W_dec = torch.randn(S, D, device=dev, dtype=dtype)

    def step():
        x @ W_enc, f @ W_dec, f.T @ g, g @ W_dec.T, x.T @ f

    for _ in range(args.warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
    return B * args.steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n-saes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--kinds", nargs="+", default=["relu", "topk"])
    args = p.parse_args()
    torch.set_float32_matmul_precision("high")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device={args.device} threads={torch.get_num_threads()} load={load:.1f} "
        f"d_model={args.d_model} d_sae={args.d_sae} batch={args.batch} precision={args.precision} "
        f"compile={args.compile}"
    )
    # The machine may be shared: re-measure the floor next to every run and compare with that.
    for kind in args.kinds:
        for n in args.n_saes:
            floor = matmul_floor(args)
            rate = step_rate(args, kind, n)
            print(
                f"{kind:<5} x{n}: {rate:.4g} SAE-activations/s; dense matmul floor {floor:.4g} "
                f"SAE-activations/s; {rate / floor:.0%} of the floor"
            )


if __name__ == "__main__":
    main()
