"""What a training job reports while it runs: a CSV of every logged value and a W&B run per SAE
(`MetricsLog`), the rewind of a resumed run's logs (`RewindLog`), and a progress bar (`Progress`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib

import lightning as L

from saev import cli
from saev.train.config import TrainConfig


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
