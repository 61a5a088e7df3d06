"""A training job: many SAEs, one data stream, one Lightning `Trainer` (docs/architecture.md).

`train(configs)` is the central entry: a list of per-SAE `TrainConfig`s that agree on the job
settings. `main(cfg)` (called by `train.py`) expands the config's `sweep` into such a list by
composing one Hydra config per combination, trains, and prints the run directory last.

A run directory `<runs_root>/<run_id>/` holds `job.json`, `checkpoints/` (Lightning, for
`ckpt_path=last`), `wandb/`, and per SAE `<name>/` with `sae.safetensors`, `config.json`,
`metrics.json` (final metrics) and `metrics.csv` (every logged value).
"""

from __future__ import annotations

import contextlib
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
from saev.data.datamodule import LazyLoader, SeekableLoader, ShardDataModule
from saev.train.config import PER_SAE_KEYS, TrainConfig, sweep_overrides
from saev.train.logs import MetricsLog, Progress, RewindLog
from saev.train.module import Member, NonFiniteLossError, SAEModule

CKPT_DIR = "checkpoints"


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
    cli.quiet()
    # TF32 matmuls on Ampere+ GPUs (no effect on CPU); set here, not on import, so that importing
    # saev changes nothing for code that only loads an SAE.
    torch.set_float32_matmul_precision("high")
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
    rank = cli.global_rank()
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


USER_ERRORS = (shards.ShardError, NonFiniteLossError)
"""Besides `cli.run_or_exit`'s own: what a training job reports as one line `error: ...`."""


def main(cfg) -> pathlib.Path:
    """Entry point of `train.py`."""
    return cli.run_or_exit(lambda: train(expand(cfg)), USER_ERRORS)
