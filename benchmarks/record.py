"""Recording throughput against the bare forward pass, on the same already-decoded images.

    python benchmarks/record.py   # random ViT-Ti/16 (12 blocks, d 192) at 96 px: CPU-sized
    python benchmarks/record.py --family timm --ckpt vit_base_patch16_224 --device cuda

Both sides see identical image tensors, so decoding is out of the picture. The recording side is
`saev.record.job.record_loop`, the loop `record.py` runs: DataLoader and collate, hooked forward
that stops after the last recorded block, narrowing and copy to the host, the writer thread and
shard files written (and fsynced) to a temporary directory. The bare side calls the trunk's own
forward on each batch. Each side runs `--repeats` times, interleaved, and the best time counts,
since other processes on a shared machine only ever slow a run down.
"""

import argparse
import dataclasses
import tempfile
import time

import torch

from saev import shards
from saev.record import images
from saev.record import job as recording
from saev.record import vit as vitlib
from saev.record.config import ModelConfig, RecordConfig, SyntheticImagesConfig


@dataclasses.dataclass
class PreDecoded:
    """Images already run through the model's transform; `load` hands out the tensors."""

    x_NCHW: torch.Tensor
    has_patch_labels = False

    def __len__(self) -> int:
        return len(self.x_NCHW)

    def load(self, i: int) -> torch.Tensor:
        return self.x_NCHW[i]

    def describe(self) -> dict:
        return {"name": "pre-decoded", "n_images": len(self)}

    def source(self, i: int) -> dict:
        return {"index": i}


class Clock:
    """Wall seconds and this process's CPU seconds (all its threads) of a `with` block. CPU time
    barely moves when other processes share the machine; wall time is what a user waits."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bare(vit: vitlib.ViT, x_NCHW: torch.Tensor, batch_size: int, device) -> Clock:
    clock = Clock()
    with clock, torch.inference_mode():
        for b in range(0, len(x_NCHW), batch_size):
            out = vit.forward(x_NCHW[b : b + batch_size].to(device))
            float(out.flatten()[0])  # wait for the device, as recording waits for its copy
    return clock


def recorded(cfg: RecordConfig, vit: vitlib.ViT, data: PreDecoded, device) -> Clock:
    blocks = vit.resolve_layers(cfg.layers)
    recorder = vitlib.Recorder(vit, blocks, cls_token=vit.has_cls)
    md = recording.shard_metadata(cfg, vit, len(blocks), vit.has_cls, data)
    identity = dataclasses.replace(vit, transform=lambda x: x)
    clock = Clock()
    with tempfile.TemporaryDirectory() as dump_to:
        with clock, shards.ShardWriter(dump_to, md) as writer:
            recording.record_loop(cfg, identity, recorder, data, writer, 0, device)
            writer.finish()
    recorder.close()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="tiny")
    parser.add_argument("--ckpt", default="img96-patch16-dim192-depth12-heads3")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, nargs="+", default=[-1])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-patches-per-shard", type=int, default=200_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; 1 gives steadier figures on a shared machine, where threads "
        "that wait for each other at every op turn others' load into noise",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = RecordConfig(
        model=ModelConfig(family=args.family, ckpt=args.ckpt, pretrained=False),
        data=SyntheticImagesConfig(n_images=args.n_images),
        layers=args.layers,
        dtype=args.dtype,
        max_patches_per_shard=args.max_patches_per_shard,
        batch_size=args.batch_size,
        n_workers=0,  # the images are decoded already
        device=args.device,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.device != "auto":
        device = torch.device(args.device)
    vit = vitlib.load(cfg.model, device)
    synthetic = images.SyntheticDataset(args.n_images, seed=0)
    data = PreDecoded(
        torch.stack([vit.transform(synthetic.load(i)) for i in range(len(synthetic))])
    )
    bare(vit, data.x_NCHW[: args.batch_size], args.batch_size, device)  # warm-up

    runs = {"bare": [], "record": []}
    for r in range(args.repeats):
        # Alternate which side goes first, so drifting load on a shared machine favors neither.
        for side in ("bare", "record") if r % 2 == 0 else ("record", "bare"):
            run = bare(vit, data.x_NCHW, args.batch_size, device) if side == "bare" else None
            runs[side].append(run or recorded(cfg, vit, data, device))
    print(
        f"model {args.family}:{args.ckpt} on {device}, {args.n_images} images, batch "
        f"{args.batch_size}, layers {args.layers}, {args.dtype}, torch threads "
        f"{torch.get_num_threads()}, best of {args.repeats}"
    )
    best = {}
    for side, clocks in runs.items():
        best[side] = min(c.wall for c in clocks), min(c.cpu for c in clocks)
        walls = " ".join(f"{c.wall:.2f}" for c in clocks)
        print(
            f"{side:6}: {args.n_images / best[side][0]:8.1f} images/s wall, "
            f"{1e3 * best[side][1] / args.n_images:7.2f} CPU-ms/image (wall s: {walls})"
        )
    wall_ratio = best["record"][0] / best["bare"][0]
    cpu_ratio = best["record"][1] / best["bare"][1]
    print(f"ratio record/bare: wall {wall_ratio:.3f} ({wall_ratio - 1:+.1%}), CPU {cpu_ratio:.3f}")


if __name__ == "__main__":
    main()
