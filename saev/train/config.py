"""Typed schema of `conf/train.yaml`, registered in Hydra's ConfigStore (`train_schema`).

A training job is a list of `TrainConfig`s, one per SAE, that agree on everything outside
`PER_SAE_KEYS` (what is read and how the job runs). `sweep` (a cartesian product) or `members`
(explicit override lists, which the grouping sweeper of `python train.py -m` hands in) in the
primary config expands into such a list.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Any

from omegaconf import MISSING

from saev.data.config import DataConfig
from saev.nn.config import TOPK_FAMILY, SAEConfig, dead_after

PER_SAE_KEYS = ("name", "sae", "lr", "lr_warmup_steps", "grad_clip", "seed")
"""Settings that touch only one SAE and its optimizer; they may differ within one job."""
PRECISIONS = ("32", "bf16-mixed")
LR_AT_16K = 2e-3
"""Default Adam learning rate at d_sae = 2^14; see `default_lr`."""
LR_MAX_TOPK = 5e-3
"""The most `default_lr` gives a TopK-family SAE (the rule's value at d_sae ~2600)."""


def default_lr(d_sae: int, activation: str) -> float:
    """The learning rate when `lr` is not given: LR_AT_16K * sqrt(2^14 / d_sae), and for the
    TopK family (topk, batchtopk, Matryoshka) at most LR_MAX_TOPK.

    Gao et al. 2024 (sec. 2.2 and fig. 11) find the best Adam lr falls as 1/sqrt(n_latents);
    sparsify uses 5e-3 * sqrt(2^14 / d_sae), dictionary_learning 2e-4 / sqrt(d_sae / 2^14). The
    constant sits between them; on benchmarks/recovery.py, every kind recovers >= 90% of the
    true features with it in a short budget (4e-4 flat recovered 8.9% at d_sae 2048).

    The cap: Gao et al. fit the rule on wide TopK SAEs; carried down to d_sae 96 it gives 2.6e-2,
    where Adam's steps churn the unit decoder rows so much that a TopK or BatchTopK dictionary as
    wide as its features loses 5-19% of them; 5e-3 recovers 88-100% there (docs/training.md,
    "The learning rate's cap"). JumpReLU keeps the rule: its thresholds need the larger steps in
    a short run (26.6% of the features at 5e-3, >= 90% at the rule's 1.6e-2, d_sae 256).
    """
    lr = LR_AT_16K * (2**14 / d_sae) ** 0.5
    return min(lr, LR_MAX_TOPK) if activation in TOPK_FAMILY else lr


@dataclasses.dataclass
class TrainerConfig:
    """Lightning `Trainer` settings passed through."""

    accelerator: str = "auto"
    """"cpu", "gpu", "auto", ..."""
    devices: Any = 1
    """Number of devices, a list of ids, or "auto"."""
    strategy: str = "auto"
    """"auto", "ddp", ... (each rank reads its own part of every batch)."""


@dataclasses.dataclass
class WandbConfig:
    """Weights & Biases: one run per SAE, grouped by the job's run id."""

    enabled: bool = True
    project: str = "saev"
    entity: str | None = None
    mode: str | None = None
    """"online", "offline" or "disabled"; None follows WANDB_MODE, else "offline" (no network or
    account needed; `wandb sync <run_dir>/wandb/offline-run-*` uploads later)."""
    group: str | None = None
    """W&B group of this job's runs; None: the run id. A sweep sets it to the sweep's name."""
    tags: list[str] = dataclasses.field(default_factory=list)
    """W&B tags of every run of the job (a sweep adds the job's name)."""


@dataclasses.dataclass
class TrainConfig:
    """One SAE's training run; a job trains several that share `data` and the job settings."""

    data: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(shard_root=MISSING, layer=MISSING)
    )
    """What to read (saev.data.config.DataConfig); data.shard_root and data.layer are required."""
    sae: SAEConfig = MISSING
    """The SAE (config group `sae`: relu, topk, batchtopk, jumprelu, matryoshka)."""
    name: str | None = None
    """Directory name of this SAE in the run; None gives '<index>-<kind>[-swept values]'."""
    lr: float | None = None
    """Adam learning rate; None: `default_lr(d_sae, activation)` (1/sqrt(d_sae), capped at 5e-3
    for the TopK family), recorded here once d_sae is known (job.json and each SAE's config.json
    hold the value)."""
    lr_warmup_steps: int = 100
    """Steps of linear learning-rate warmup from 0."""
    grad_clip: float = 1.0
    """Max gradient norm of this SAE's parameters; 0 disables."""
    seed: int = 0
    """Seed of this SAE's initialization (data order: data.seed)."""
    n_train: int = 100_000_000
    """Activations (tokens) to train on; steps = n_train // data.batch_size."""
    runs_root: str = "runs"
    """Runs are written to <runs_root>/<run_id>/."""
    run_id: str | None = None
    """None: a new id (time and random suffix). Give an old id with ckpt_path=last to resume."""
    ckpt_path: str | None = None
    """"last" resumes <runs_root>/<run_id>/checkpoints/last.ckpt; or a path to a .ckpt."""
    ckpt_every: int = 1000
    """Steps between Lightning checkpoints (used to resume)."""
    precision: str = "32"
    """"32" or "bf16-mixed" (bf16 autocast, float32 weights and optimizer state)."""
    compile: bool = False
    """torch.compile the step's forward pass (all SAEs together)."""
    batched: bool | None = None
    """Run same-kind, same-shape SAEs as batched products (saev.nn.batched); None: on a GPU only
    (on CPU the two paths measured level; docs/training.md, "Batched groups")."""
    val_every: int = 0
    """Validate every this many steps; 0: only at the end (always at the end)."""
    log_every: int = 50
    """Steps between train/ metric logs."""
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    sweep: Any = None
    """Per-SAE settings to cross, e.g. {sae: [relu, topk], lr: [3e-4, 1e-3]}: one SAE per
    combination, all in this job."""
    members: list[list[str]] | None = None
    """One override list per SAE of this job, e.g. [[sae=relu], [sae=topk, sae.k=64]], each
    composed on top of the job's overrides. `python train.py -m` (saev.train.sweep) sets it."""

    def __post_init__(self):
        if self.lr is None and getattr(self.sae, "d_sae", None) is not None:
            self.lr = default_lr(self.sae.d_sae, self.sae.activation)
        if isinstance(self.sae, SAEConfig) and self.sae.dead_after_tokens is None:
            # Recorded as resolved (job.json, config.json), like lr.
            self.sae = dataclasses.replace(self.sae, dead_after_tokens=dead_after(self.n_train))
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        positive = {
            "n_train": self.n_train,
            "ckpt_every": self.ckpt_every,
            "log_every": self.log_every,
        }
        nonneg = {
            "lr_warmup_steps": self.lr_warmup_steps,
            "grad_clip": self.grad_clip,
            "val_every": self.val_every,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        for name, value in nonneg.items():
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}.")
        if str(self.precision) not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be one of {list(PRECISIONS)}.")
        self.precision = str(self.precision)
        if (
            self.ckpt_path is not None
            and self.ckpt_path != "last"
            and not self.ckpt_path.endswith(".ckpt")
        ):
            raise ValueError(f"ckpt_path must be 'last' or a .ckpt file, got {self.ckpt_path!r}.")
        if self.ckpt_path == "last" and self.run_id is None:
            raise ValueError("ckpt_path=last needs run_id=<the run to resume>.")
        self.sweep = dict(self.sweep or {})
        for key, values in self.sweep.items():
            if key.split(".")[0] not in PER_SAE_KEYS:
                raise ValueError(
                    f"sweep key {key!r} is not a per-SAE setting {list(PER_SAE_KEYS)}; "
                    "sweep it with `python train.py -m` (one job per value) instead."
                )
            if not isinstance(values, list | tuple) or not values:
                raise ValueError(f"sweep.{key} must be a non-empty list, got {values!r}.")
        if self.members is not None:
            if not self.members:
                raise ValueError("members must list at least one SAE's overrides.")
            if self.sweep:
                raise ValueError("give either sweep or members, not both.")
            self.members = [list(m) for m in self.members]

    def job_fields(self) -> dict:
        """Everything that must agree across the SAEs of one job."""
        d = dataclasses.asdict(self)
        for key in (*PER_SAE_KEYS, "sweep", "members"):
            d.pop(key)
        return d


def override_value(value) -> str:
    """A Python value as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return str(value)


def sweep_overrides(sweep: dict) -> list[list[str]]:
    """The cartesian product of `sweep` as one override list per SAE."""
    keys = list(sweep)
    return [
        [f"{k}={override_value(v)}" for k, v in zip(keys, combo)]
        for combo in itertools.product(*(sweep[k] for k in keys))
    ]


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def print_help(conf_dir: pathlib.Path) -> None:
    """`python train.py --help`."""
    from saev import cli

    cli.print_help(
        """
usage: python train.py data.shard_root=<shard dir> data.layer=<layer> [sae=<kind>] [key=value ...]
       python train.py -m key=a,b ...   a sweep: SAEs that can share a data stream share a job
       (docs/sweeps.md); the last line printed is the run (or sweep) directory""",
        {
            "sae": cli.group_choices(conf_dir, "sae"),
            "+experiment": cli.group_choices(conf_dir, "experiment"),
            "hydra/launcher": "basic (default: in this process), "
            + cli.group_choices(conf_dir, "hydra/launcher"),
        },
        [
            ("Options", cli.options(TrainConfig, skip=("sae", "sweep", "members"))),
            (
                "SAE options (sae.*; each kind uses some, see conf/sae/)",
                cli.options(SAEConfig, "sae."),
            ),
        ],
    )
