"""A training job: many SAEs, one data stream, one Lightning `Trainer` (DESIGN.md, "Training").

`train(configs)` is the central entry: a list of per-SAE `TrainConfig`s that agree on the job
settings. `main(cfg)` (called by `train.py`) expands the config's `sweep` into such a list by
composing one Hydra config per combination, trains, and prints the run directory last.

A run directory `<runs_root>/<run_id>/` holds `job.json`, `checkpoints/` (Lightning, for
`ckpt_path=last`), `wandb/`, and per SAE `<name>/` with `sae.safetensors`, `config.json`,
`metrics.json` (final metrics) and `metrics.csv` (every logged value).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import pathlib
import re
import secrets
import sys
import time

import lightning as L
import torch

from saev import cli, shards
from saev.data import ShardDataModule
from saev.module import Member, NonFiniteLossError, SAEModule
from saev.train_config import PER_SAE_KEYS, TrainConfig, sweep_overrides

CKPT_DIR = "checkpoints"


class Progress(L.Callback):
    """A progress bar over the whole run (not Lightning's per-epoch one: an epoch of a small shard
    set can be a single step): activations trained on, activations/s and ETA, on stderr."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.bar = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.bar = cli.progress(
            total=trainer.max_steps * self.batch_size,
            initial=trainer.global_step * self.batch_size,
            unit="act",
            unit_scale=True,
            disable=not trainer.is_global_zero,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.bar.update(trainer.global_step * self.batch_size - self.bar.n)

    def on_train_end(self, trainer, pl_module) -> None:
        self.bar.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        # Close the bar so that the one-line error that follows starts on a line of its own.
        if self.bar is not None:
            self.bar.close()


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


class MetricsLog:
    """Per SAE: a CSV of every logged value (always) and a W&B run grouped by the job.

    W&B runs plot against `STEP_KEY` (the trainer's step) rather than W&B's own step: after a
    resume, the steps between the last checkpoint and the kill are logged again, and W&B drops
    any record whose own step is not larger than the last one it holds.
    """

    STEP_KEY = "trainer/step"

    def __init__(self, run_dir: pathlib.Path, configs: list[TrainConfig], run_id: str):
        self.files, self.writers, self.runs = {}, {}, {}
        for c in configs:
            path = run_dir / c.name / "metrics.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists()
            self.files[c.name] = open(path, "a", newline="")
            self.writers[c.name] = csv.writer(self.files[c.name])
            if new:
                self.writers[c.name].writerow(["step", "metric", "value"])
        wb = configs[0].wandb
        if wb.enabled:
            import wandb

            mode = wb.mode or os.environ.get("WANDB_MODE") or "offline"
            # W&B ids are unique per project: a group (a sweep) prefixes the job's run id.
            prefix = f"{wb.group}-" if wb.group else ""
            for i, c in enumerate(configs):
                self.runs[c.name] = wandb.init(
                    project=wb.project, entity=wb.entity, mode=mode, group=wb.group or run_id,
                    name=f"{run_id}/{c.name}", id=f"{prefix}{run_id}-{i:02d}", job_type="train",
                    tags=list(wb.tags) or None, config=dataclasses.asdict(c), dir=str(run_dir),
                    reinit="create_new", resume="allow",
                )  # fmt: skip
                self.runs[c.name].define_metric(self.STEP_KEY)
                self.runs[c.name].define_metric("*", step_metric=self.STEP_KEY)

    def log(self, name: str, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writers[name].writerow([step, key, repr(value)])
        self.files[name].flush()
        if name in self.runs:
            self.runs[name].log({self.STEP_KEY: step, **metrics})

    def rewind(self, step: int) -> None:
        """Forget CSV rows logged after `step` (by an attempt killed after its last checkpoint),
        so a resumed run's metrics.csv holds each step once."""
        for name, fd in self.files.items():
            fd.close()
            path = pathlib.Path(fd.name)
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
            if len(kept) != len(rows):
                tmp = path.with_name(f".{path.name}.tmp")
                with open(tmp, "w", newline="") as f:
                    csv.writer(f).writerows(kept)
                os.replace(tmp, path)
            self.files[name] = open(path, "a", newline="")
            self.writers[name] = csv.writer(self.files[name])

    def close(self) -> None:
        for fd in self.files.values():
            fd.close()
        for run in self.runs.values():
            run.finish()


class RewindLog(L.Callback):
    """Once the checkpoint is restored (the trainer knows its step), drop what the killed
    attempt logged past it."""

    def __init__(self, log: MetricsLog):
        self.metrics_log = log

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0:
            self.metrics_log.rewind(trainer.global_step)


def named(configs: list[TrainConfig]) -> list[TrainConfig]:
    """Fill in default names '<index>-<kind>'; names must be unique and path-safe."""
    out = []
    for i, c in enumerate(configs):
        name = c.name if c.name is not None else f"{i:02d}-{c.sae.kind}"
        if not re.fullmatch(r"[\w.,=+\-\[\]]+", name):
            raise ValueError(f"SAE name {name!r} must be a plain directory name.")
        out.append(dataclasses.replace(c, name=name))
    if len({c.name for c in out}) != len(out):
        raise ValueError(f"SAE names must be unique in a job, got {[c.name for c in out]}.")
    return out


def check_one_job(configs: list[TrainConfig]) -> None:
    job = configs[0].job_fields()
    for c in configs[1:]:
        diff = sorted(k for k, v in c.job_fields().items() if job[k] != v)
        if diff:
            raise ValueError(
                f"SAEs of one job must share {diff}; only {list(PER_SAE_KEYS)} may differ."
            )


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def make_trainer(
    job: TrainConfig, run_dir: pathlib.Path, n_steps: int, callbacks: list[L.Callback]
) -> L.Trainer:
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / CKPT_DIR, every_n_train_steps=job.ckpt_every, save_top_k=0, save_last=True
    )
    return L.Trainer(
        accelerator=job.trainer.accelerator,
        devices=job.trainer.devices,
        strategy=job.trainer.strategy,
        precision="32-true" if job.precision == "32" else job.precision,
        max_steps=n_steps,
        max_epochs=-1,
        use_distributed_sampler=False,  # the loaders split the stream across ranks themselves
        # val_every=0: no validation during fit; the final one runs after it.
        val_check_interval=job.val_every or n_steps + 1,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=[ckpt, Progress(job.data.batch_size), *callbacks],
        enable_progress_bar=False,  # Progress above covers the run, not one epoch
        enable_model_summary=False,
        default_root_dir=run_dir,
    )


def on_gpu(job: TrainConfig) -> bool:
    """Whether the job's trainer will run on a CUDA GPU (Lightning's "auto" picks one if any)."""
    accelerator = str(job.trainer.accelerator)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def train(configs: list[TrainConfig]) -> pathlib.Path:
    """Train one SAE per config, side by side, and return the run directory."""
    if not configs:
        raise ValueError("no SAEs to train.")
    check_one_job(configs)
    configs = named(configs)
    job = configs[0]
    dm = ShardDataModule(job.data)
    dm.setup("fit")
    members = [
        Member(c.name, c.sae.resolve(dm.d_model), c.lr, c.lr_warmup_steps, c.grad_clip, c.seed)
        for c in configs
    ]
    n_steps = job.n_train // job.data.batch_size
    if n_steps < 1:
        raise ValueError(f"n_train={job.n_train} is less than one batch ({job.data.batch_size}).")
    rank = global_rank()
    run_dir = job_run_dir(job, rank)
    run_id = run_dir.name
    ckpt_path = resolve_ckpt(job, run_dir)
    configs = [dataclasses.replace(c, sae=m.sae) for c, m in zip(configs, members)]
    log = None
    if rank == 0:  # other DDP ranks write nothing: one run directory, one W&B run per SAE
        if ckpt_path is None and (run_dir / "job.json").exists():
            raise ValueError(
                f"{run_dir} already holds a run; resume it with ckpt_path=last or pick a new "
                "run_id."
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        shards.write_json_atomic(run_dir / "job.json", [dataclasses.asdict(c) for c in configs])
    dm.upcast = not on_gpu(job)  # a GPU up-casts 16-bit shards itself, after the transfer
    dm.start_readers()  # forked before any thread of W&B or of DDP's process group exists
    if rank == 0:
        log = MetricsLog(run_dir, configs, run_id)
    stats = dm.norm_stats
    batched = on_gpu(job) if job.batched is None else job.batched
    module = SAEModule(
        members, stats.mean_D, stats.scale, job.log_every, job.compile, log and log.log, batched
    )
    trainer = make_trainer(job, run_dir, n_steps, [RewindLog(log)] if log else [])
    val = LazyLoader(dm.val_dataloader) if len(dm.val_examples) else None
    try:
        with ranks_started_here(run_dir):
            trainer.fit(module, SeekableLoader(dm, module), val, ckpt_path=ckpt_path)
        if val is not None:
            trainer.validate(module, val, verbose=False)
    except NonFiniteLossError as err:
        last = run_dir / CKPT_DIR / "last.ckpt"
        kept = f"last good checkpoint: {last}" if last.exists() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"{err} ({kept})") from None
    finally:
        if log is not None:
            log.close()
        dm.teardown()
    if trainer.is_global_zero:
        export(module, configs, run_dir, dm, run_id)
    return run_dir


RUN_DIR_ENV = "SAEV_RUN_DIR"
"""Set for the DDP ranks that Lightning starts by re-running the entry point: rank 0's run
directory, so they join its run instead of making their own."""


def global_rank() -> int:
    """This process's DDP rank, from the variables launchers set (Lightning, torchrun, SLURM)."""
    from lightning.fabric.utilities.rank_zero import _get_rank

    return _get_rank() or 0


def job_run_dir(job: TrainConfig, rank: int) -> pathlib.Path:
    if rank > 0 and os.environ.get(RUN_DIR_ENV):
        return pathlib.Path(os.environ[RUN_DIR_ENV])
    if job.run_id is None and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # One SLURM task per GPU: every task runs this, and all must agree without talking.
        job = dataclasses.replace(job, run_id=f"slurm-{os.environ['SLURM_JOB_ID']}")
    return pathlib.Path(job.runs_root) / (job.run_id or new_run_id())


@contextlib.contextmanager
def ranks_started_here(run_dir: pathlib.Path):
    """While Lightning may start the other DDP ranks by re-running this program: tell them the
    run directory, and have them re-run only this job. (Lightning re-runs `sys.argv`; inside a
    multirun that would be the whole sweep, so it gets this job's own overrides instead.)"""
    saved_env, saved_argv = os.environ.get(RUN_DIR_ENV), sys.argv[:]
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    try:
        from hydra.core.hydra_config import HydraConfig

        multirun = "-m" in sys.argv or "--multirun" in sys.argv
        if HydraConfig.initialized() and multirun:
            sys.argv = [sys.argv[0], *HydraConfig.get().overrides.task]
    except ImportError:
        pass
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = saved_env


def resolve_ckpt(job: TrainConfig, run_dir: pathlib.Path) -> str | None:
    if job.ckpt_path is None:
        return None
    path = (
        run_dir / CKPT_DIR / "last.ckpt" if job.ckpt_path == "last" else pathlib.Path(job.ckpt_path)
    )
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from.")
    return str(path)


def export(module: SAEModule, configs, run_dir: pathlib.Path, dm, run_id: str) -> None:
    """Per SAE: weights, everything needed to rebuild it, and its final metrics."""
    for sae, c in zip(module.saes, configs):
        out = run_dir / c.name
        extra = {
            "train": dataclasses.asdict(c),
            "shards": dm.metadata.to_json(),
            "run_id": run_id,
            "step": module.global_step,
        }
        sae.save(out, extra)
        metrics = {"step": module.global_step, **module.last_metrics[c.name]}
        shards.write_json_atomic(out / "metrics.json", metrics)


def expand(cfg) -> list[TrainConfig]:
    """The job's per-SAE configs: `cfg` itself, or one composed config per `sweep` combination
    or per `members` entry."""
    from omegaconf import OmegaConf

    base = OmegaConf.to_object(cfg)
    if not base.sweep and not base.members:
        return [base]
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    task = [o for o in hc.overrides.task if not o.startswith(("sweep=", "members="))]
    configs = []
    for i, combo in enumerate(base.members or sweep_overrides(base.sweep)):
        c = OmegaConf.to_object(compose(config_name=hc.job.config_name, overrides=task + combo))
        if c.name is None:
            parts = [o.split("=", 1) for o in combo if "=" in o]
            suffix = "-".join(f"{k.split('.')[-1]}={v}" for k, v in parts if k != "sae")
            c = dataclasses.replace(
                c, name=f"{i:02d}-{c.sae.kind}" + (f"-{suffix}" if suffix else "")
            )
        configs.append(c)
    return configs


def main(cfg) -> pathlib.Path:
    """Entry point of `train.py`."""
    return run_or_exit(lambda: train(expand(cfg)))


def run_or_exit(fn) -> pathlib.Path:
    """Run `fn` (returning the run directory) and print the directory as the last line; errors
    in what the user gave print one line `error: ...` to stderr and exit 1, with no traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user_errors = (ValueError, FileNotFoundError, shards.ShardError, NonFiniteLossError)
    try:
        run_dir = fn()
    except (*user_errors, OmegaConfBaseException, HydraException) as err:
        _fail(err)
    if global_rank() == 0:  # DDP ranks Lightning started run this too; one line, printed last
        print(run_dir)
    return run_dir


def check_sae_choices(argv: list[str], conf_dir: pathlib.Path) -> None:
    """Fail in one line on an unknown `sae=<kind>` before Hydra composes (whose own message is
    a multi-line report); comma lists are multirun choices."""
    known = sorted(p.stem for p in (conf_dir / "sae").glob("*.yaml"))
    for arg in argv:
        if re.fullmatch(r"sae=\w+\(.*\)", arg):
            continue  # choice(...), glob(...): Hydra expands and checks them
        if arg.startswith("sae="):
            for choice in arg.removeprefix("sae=").split(","):
                if choice not in known:
                    _fail(ValueError(f"unknown SAE kind sae={choice}; choose one of {known}."))


def _fail(err: BaseException) -> None:
    cli.fail(str(err).split("\n")[0] or type(err).__name__)


def print_help(conf_dir: pathlib.Path) -> None:
    """`python train.py --help`."""
    from saev.nn import SAEConfig
    from saev.train_config import TrainConfig

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


torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+; no effect on CPU
# SeekableLoader repositions the data on resume, so Lightning's "not resumable" warning does not
# apply; and checkpoints are meant to hold the state after the step.
cli.quiet()
