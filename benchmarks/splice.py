"""Images per second of the spliced evaluation (`visualize.py ... splice=true`), issue 20, against
three bare forwards of the same images (clean, spliced, mean-ablated as three separate runs).

    python benchmarks/splice.py                                 # vit_small_patch16_224, CPU
    python benchmarks/splice.py --device cuda --n-images 512 --batch-size 64

Records `--n-images` synthetic images with a random-weight timm ViT (`record.py`, layer
`--layer`), then times `saev.visualize.faithfulness.evaluate` (the blocks below the layer once
per batch, the four variants as rows of one batch above it) and the bare baseline: for each
batch, the same input preparation and three full `ViT.output` forwards. The evaluation's fourth
variant (the SAE plus its error, the sanity check) is included in its time. Sharing the lower
blocks costs (N - A)/N + 4 A/N forwards of an N-block model with A blocks above the SAE's,
against 3: it is faster whenever A < 2N/3, which holds where SAEs are usually trained.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def record(args, work: pathlib.Path) -> pathlib.Path:
    cmd = [
        sys.executable, str(ROOT / "record.py"), "model.family=timm", f"model.ckpt={args.ckpt}",
        f"layers=[{args.layer}]", f"data.n_images={args.n_images}", f"dump_to={work}",
        f"device={args.device}", "n_workers=0",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(res.stderr[-2000:])
    return pathlib.Path(res.stdout.strip().splitlines()[-1])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default="vit_small_patch16_224")
    parser.add_argument("--layer", type=int, default=-2)
    parser.add_argument("--n-images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--exp-factor", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from saev import nn
    from saev.visualize import faithfulness, splice
    from saev.visualize.config import SpliceConfig, VisualizeConfig
    from saev.visualize.job import PassInputs

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        shards = record(args, pathlib.Path(tmp))
        cfg = VisualizeConfig(
            ckpt=str(shards), splice=SpliceConfig(True, args.n_images, args.batch_size)
        )
        src = PassInputs(pathlib.Path(tmp), shards, args.layer, "patches")
        vit = splice.load_vit(shards, device)
        d = vit.d_model
        sae_cfg = nn.SAEConfig(
            activation="topk", k=32, aux_k=0, aux_coeff=0.0, d_model=d,
            d_sae=args.exp_factor * d, dead_after_tokens=10**6,
        )  # fmt: skip
        sae = nn.SAE(sae_cfg).to(device).eval()
        prep = faithfulness.prepare(cfg, src, sae, device)
        prep._vit = vit
        n_blocks, (block,) = len(vit.blocks), vit.resolve_layers([args.layer])
        chunks = np.array_split(prep.sample_N, max(1, -(-len(prep.sample_N) // args.batch_size)))

        @torch.inference_mode()
        def bare():
            for chunk in chunks:
                x = faithfulness.pixels(prep, chunk, device)
                for _ in range(3):
                    vit.output(x)

        def shared():
            faithfulness.evaluate(prep, src, sae, cfg, device)

        timings = {"spliced evaluation (shared lower blocks)": [], "three bare forwards": []}
        runs = dict(zip(timings, (shared, bare)))
        for fn in runs.values():  # warm up: first-call allocations, caches
            fn()
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits both
            for name, fn in runs.items():
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                timings[name].append(time.perf_counter() - t)
    n = len(prep.sample_N)
    print(
        f"{args.ckpt} on {device}: {n} images, batch {args.batch_size}, block {block} of "
        f"{n_blocks}, SAE {d} -> {args.exp_factor * d}, threads {torch.get_num_threads()}"
    )
    best = {name: min(ts) for name, ts in timings.items()}
    for name, t in best.items():
        print(f"  {name:42s} {n / t:8.1f} images/s  ({t:.2f} s, best of {args.repeats})")
    ratio = best["three bare forwards"] / best["spliced evaluation (shared lower blocks)"]
    above = n_blocks - block - 1  # blocks after the SAE's: the only ones run four times
    expected = 3 / ((n_blocks - above) / n_blocks + 4 * above / n_blocks)
    print(f"  speed-up {ratio:.2f}x (block count alone predicts {expected:.2f}x)")


if __name__ == "__main__":
    main()
