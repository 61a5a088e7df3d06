"""One job of a `python train.py -m` sweep (saev.train.sweep): its SAEs side by side, in a run
directory fixed by the plan, `<sweep dir>/job-<n>/`, so that an attempt after a SLURM requeue
finds and resumes the last checkpoint; its rows of `<sweep dir>/summary.csv` when it ends.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import sys
import threading
import time

from saev.cli import one_line
from saev.train import job as training
from saev.train import summary
from saev.train.config import TrainConfig
from saev.train.sweep import PLAN_NAME, load_plan

SWEEPER_TARGET = "hydra_plugins.saev_sweeper.grouping_sweeper.GroupingSweeper"


class JobFailed(RuntimeError):
    """A sweep job ended with an error (its SAEs' rows say why); picklable for submitit."""


def is_job() -> bool:
    """Whether this process runs one job of a multirun under the grouping sweeper."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN and hc.sweeper.get("_target_") == SWEEPER_TARGET


def group_name(sweep_dir: pathlib.Path) -> str:
    """The sweep's W&B group (also the prefix of its W&B run ids, so it is id-safe)."""
    return "sweep-" + re.sub(r"[^\w.-]+", "-", sweep_dir.name)


def run_job(cfg) -> pathlib.Path:
    """Train one job's SAEs in `<sweep dir>/job-<n>` (the job's Hydra output directory) and write
    their summary rows; errors become `failed` rows and a `JobFailed` for the sweeper."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    run_dir = pathlib.Path(hc.runtime.output_dir)
    sweep_dir = pathlib.Path(hc.sweep.dir).absolute()
    p = load_plan(sweep_dir)
    job = p.jobs[hc.job.num]
    columns = summary.columns(p.swept)
    signals = SignalWatch()
    write = summary.update if is_rank_zero() else lambda *a: None  # one writer per job under DDP
    try:
        configs = [for_sweep(c, run_dir, sweep_dir) for c in training.expand(cfg)]
        if [c.name for c in configs] != [s.name for s in job.saes]:
            raise RuntimeError(f"{run_dir} does not match the plan in {sweep_dir / PLAN_NAME}.")
        print(f"{run_dir.name}: {len(configs)} SAEs in {run_dir}", file=sys.stderr, flush=True)
        ckpt_path = resume(run_dir)
        configs = [dataclasses.replace(c, ckpt_path=ckpt_path) for c in configs]
        training.train(configs)
        write(sweep_dir, columns, summary.rows(job, run_dir, "done"))
    except Exception as err:
        if signals.caught(grace_s=5.0 if "SLURM_JOB_ID" in os.environ else 0.0):
            # SLURM is requeueing, preempting or cancelling the job and the error came from that
            # (a killed W&B service, say). Die without a result, so the next attempt
            # resumes from the last checkpoint and the sweeper keeps waiting for it.
            print(f"{run_dir.name}: stopped by a signal ({one_line(err)})", file=sys.stderr)
            sys.stderr.flush()
            os._exit(143)
        reason = one_line(err)
        write(sweep_dir, columns, summary.rows(job, run_dir, f"failed: {reason}"))
        print(f"error: {run_dir.name}: {reason}", file=sys.stderr, flush=True)
        raise JobFailed(reason) from None
    finally:
        signals.restore()
        if not signals.caught(grace_s=0.0):  # a signal's exit (submitit's requeue) passes untouched
            end_wandb()
    return run_dir


def end_wandb() -> None:
    """End W&B's service threads with the job, so that the next job of an in-process multirun
    starts without them. Best effort: a service that is already gone (SLURM ended the job's
    processes) raises here."""
    if "wandb" not in sys.modules:
        return
    try:
        sys.modules["wandb"].teardown()
    except Exception as err:  # the job's own result stands
        print(f"note: W&B teardown failed ({one_line(err)})", file=sys.stderr)


class SignalWatch:
    """Notes SIGTERM (SLURM ends the job: requeue, preemption, cancel) and SIGUSR2 (submitit's
    signal before the time limit, on which it requeues the job) and passes each on to the handler
    before it (submitit's); without one, the signal ends the process as it would have."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self):
        self.flag = threading.Event()
        self.pid = os.getpid()
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}

    def handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            # A forked child inherits the handlers; submitit's would checkpoint and requeue the
            # job a second time from there. SIGTERM ends the child, SIGUSR2 is ignored.
            if signum == signal.SIGTERM:
                os._exit(143)
            return
        self.flag.set()
        previous = self.previous[signum]
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def caught(self, grace_s: float) -> bool:
        """Whether one came, waiting up to `grace_s` for it: the job's other processes (the W&B
        service) may receive theirs and fail first."""
        end = time.monotonic() + grace_s
        while not self.flag.is_set() and time.monotonic() < end:
            time.sleep(0.1)  # sleep, unlike a lock wait, lets the handler run
        return self.flag.is_set()

    def restore(self) -> None:
        for s, previous in self.previous.items():
            signal.signal(s, previous)


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (Lightning reads RANK, SLURM_PROCID, ...)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def for_sweep(c: TrainConfig, run_dir: pathlib.Path, sweep_dir: pathlib.Path) -> TrainConfig:
    """A member's config placed in the job's deterministic run directory, W&B grouped by the
    sweep and tagged with the job."""
    wandb = dataclasses.replace(
        c.wandb, group=group_name(sweep_dir), tags=[*c.wandb.tags, run_dir.name]
    )
    return dataclasses.replace(c, runs_root=str(run_dir.parent), run_id=run_dir.name, wandb=wandb)


def resume(run_dir: pathlib.Path) -> str | None:
    """ "last" when an earlier attempt of this job (a requeue) left a checkpoint; else clear the
    run record of an attempt that died before its first checkpoint, so training starts over."""
    last = run_dir / training.CKPT_DIR / "last.ckpt"
    if last.is_file():
        import torch

        step = torch.load(last, map_location="cpu", weights_only=False, mmap=True)["global_step"]
        print(f"{run_dir.name}: resuming from {last} at step {step}", file=sys.stderr, flush=True)
        return "last"
    (run_dir / "job.json").unlink(missing_ok=True)
    return None
