"""`ShardDataModule`: the train/val split of one layer of a shard directory, its loaders and its
normalization statistics; and the wrappers that hand its loaders to Lightning.

Loaders serve raw activations; `ShardDataModule.norm_stats` says how the SAE normalizes them
(`saev.data.normalization`).
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch

from saev import shards
from saev.data.config import DataConfig
from saev.data.loaders import OrderedLoader, ShuffledLoader
from saev.data.normalization import NormStats, load_or_estimate_moments, stats_from_moments
from saev.data.pipeline import select

# The train/val split must not move when data.seed changes (seed is an SAE-side sweep axis).
SPLIT_SEED = 0x5AE5


def split_examples(n_examples: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) example indices, sorted and disjoint; val is a seeded random subset."""
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_examples))
    if n_val >= n_examples:
        raise ValueError(
            f"data.val_fraction={val_fraction} leaves no train examples out of {n_examples}."
        )
    perm = np.random.default_rng(SPLIT_SEED).permutation(n_examples)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(L.LightningDataModule):
    """Train/val loaders over one layer of a shard directory, plus normalization statistics.

    Run Lightning with `use_distributed_sampler=False`: under DDP each rank reads and serves its
    share of every global batch (rank and world size from torch.distributed, looked up when the
    loaders are first built inside `trainer.fit`). With
    CUDA, batches come in pinned memory, so Lightning's move to the device (`non_blocking=True`)
    overlaps with the step. With `upcast = False` (set for a GPU run), float16/bfloat16 shards
    stay 16-bit until they are on the device, which up-casts them (`upcast_batch`, in the
    module's `on_after_batch_transfer`): the CPU copies half the bytes and converts none, and the
    transfer carries half the bytes.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DataConfig) else DataConfig(**dict(cfg))
        self.shard_set: shards.ShardSet | None = None
        self.norm_stats: NormStats | None = None
        self._train_loader = self._val_loader = None
        self._train_epoch = 0
        self.upcast = True
        """Whether loaders up-cast 16-bit activations to float32 on the host."""

    def setup(self, stage: str | None = None) -> None:
        if self.shard_set is not None:
            return
        cfg = self.cfg
        shard_set = shards.open_shard_set(cfg.shard_root)
        select(shard_set.metadata, cfg.layer, cfg.tokens)  # bad layer/tokens fail here, not mid-fit
        self.train_examples, self.val_examples = split_examples(
            shard_set.metadata.n_examples, cfg.val_fraction
        )
        if cfg.scale_mean or cfg.scale_norm:
            moments = load_or_estimate_moments(
                shard_set, cfg.layer, cfg.tokens, self.train_examples, cfg.n_stats_examples,
                lambda sample: OrderedLoader(
                    shard_set, cfg.layer, 65536, cfg.tokens, examples=sample, n_workers=0,
                    buffer_mb=64, skip_nonfinite=cfg.skip_nonfinite, pin_memory=False,
                ),
                shard_set.metadata.d_model,
            )  # fmt: skip
            self.norm_stats = stats_from_moments(
                moments, shard_set.metadata.d_model, cfg.scale_mean, cfg.scale_norm
            )
        else:
            self.norm_stats = NormStats(torch.zeros(shard_set.metadata.d_model), 1.0)
        self.shard_set = shard_set

    @property
    def metadata(self) -> shards.Metadata:
        self._require_setup()
        return self.shard_set.metadata

    @property
    def d_model(self) -> int:
        return self.metadata.d_model

    def _require_setup(self) -> None:
        if self.shard_set is None:
            raise RuntimeError("call ShardDataModule.setup() first.")

    def _common(self) -> dict:
        """Loader arguments. The rank is looked up when a loader is first built, inside
        `trainer.fit` (the process group does not exist before it)."""
        cfg = self.cfg
        rank, world_size = _dist()
        return dict(
            layer=cfg.layer, tokens=cfg.tokens, n_workers=cfg.n_workers, rank=rank,
            world_size=world_size, skip_nonfinite=cfg.skip_nonfinite, read=cfg.read,
            upcast=self.upcast,
        )  # fmt: skip

    def train_dataloader(self) -> ShuffledLoader:
        """Raw activations, one epoch per iteration; the same loader (and readers) every epoch."""
        self._require_setup()
        if self._train_loader is None:
            self._train_loader = ShuffledLoader(
                self.shard_set,
                batch_size=self.cfg.batch_size,  # global: each rank serves its share
                seed=self.cfg.seed,
                examples=self.train_examples,
                buffer_mb=self.cfg.buffer_mb,
                **self._common(),
            )
            self._train_loader.epoch = self._train_epoch
        self._train_loader.set_rank(*_dist())
        return self._train_loader

    def state_dict(self) -> dict:
        """Saved in Lightning checkpoints, so that a resumed run continues the epoch sequence."""
        epoch = self._train_epoch if self._train_loader is None else self._train_loader.epoch
        return {"train_epoch": epoch}

    def load_state_dict(self, state: dict) -> None:
        self._train_epoch = int(state["train_epoch"])
        if self._train_loader is not None:
            self._train_loader.epoch = self._train_epoch

    def val_dataloader(self) -> OrderedLoader | list:
        """Ordered batches over the held-out examples only ([] when val_fraction is 0)."""
        self._require_setup()
        if len(self.val_examples) == 0:
            return []
        if self._val_loader is None:
            buffer_mb = min(self.cfg.buffer_mb, 256)
            common = self._common()
            batch_size = math.ceil(self.cfg.batch_size / common["world_size"])
            self._val_loader = OrderedLoader(
                self.shard_set, batch_size=batch_size, examples=self.val_examples,
                buffer_mb=buffer_mb, **common,
            )  # fmt: skip
        rank, world_size = _dist()
        self._val_loader.set_rank(rank, world_size)
        self._val_loader.batch_size = math.ceil(self.cfg.batch_size / world_size)
        return self._val_loader

    def start_readers(self) -> None:
        """Build the loaders and start their reader threads now, so that the first step does
        not wait for them; inside `trainer.fit` they learn their rank."""
        self.train_dataloader().start()
        val = self.val_dataloader()
        if val:
            val.start()

    def teardown(self, stage: str | None = None) -> None:
        for loader in (self._train_loader, self._val_loader):
            if loader is not None:
                loader.close()


def upcast_batch(batch: dict) -> dict:
    """The batch with float32 activations (16-bit ones are up-cast where they are: on the GPU
    when the loader kept them 16-bit for the transfer)."""
    if batch["act"].dtype != torch.float32:
        batch = {**batch, "act": batch["act"].float()}
    return batch


class SeekableLoader:
    """The train loader positioned from the module's step: epoch `step // len`, from the first
    batch of that epoch not yet trained on, so a resumed run sees exactly the batches an
    uninterrupted one would, without reading the ones before (`ShuffledLoader.iter_from`).
    The loader is built on first use, inside `trainer.fit`, once DDP's process group exists."""

    def __init__(self, dm: ShardDataModule, module: L.LightningModule):
        self.dm, self.module = dm, module

    def __len__(self) -> int:
        return len(self.dm.train_dataloader())

    def __iter__(self):
        loader = self.dm.train_dataloader()
        epoch, skip = divmod(self.module.global_step, len(loader))
        loader.epoch = epoch
        return loader.iter_from(skip)


class LazyLoader:
    """A loader built on first use (see SeekableLoader)."""

    def __init__(self, make):
        self.make = make

    def __len__(self) -> int:
        return len(self.make())

    def __iter__(self):
        return iter(self.make())
