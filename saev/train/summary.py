"""`<sweep dir>/summary.csv`: one row per SAE of a sweep, written as its job finishes.

Columns: name, job, every swept setting, status (`done` or `failed: <reason>`), the step reached
and the final validation metrics. Jobs run in parallel processes or on other nodes, so each
rewrites the file under a lock, replacing its own earlier rows (a requeued job's second attempt
replaces the first's); the sweeper fills rows for jobs that died without writing.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import pathlib
import typing

if typing.TYPE_CHECKING:
    from saev.train.sweep import JobPlan

NAME = "summary.csv"
METRICS = ("nmse", "l0", "dead", "dense", "explained_variance")
"""Final validation metrics copied from each SAE's metrics.json (saev.train.metrics.SAEMetrics)."""


def columns(swept: list[str]) -> list[str]:
    return ["name", "job", *swept, "status", "step", *METRICS]


def rows(job: JobPlan, run_dir: pathlib.Path, status: str) -> list[dict[str, str]]:
    """The job's rows; a `done` job's metrics come from each SAE's metrics.json."""
    out = []
    for sae in job.saes:
        row = {"name": sae.name, "job": job.run_id, **sae.settings, "status": status}
        metrics_path = run_dir / sae.name / "metrics.json"
        if status == "done" and metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
            row["step"] = str(metrics["step"])
            val = metrics.get("val", {})  # absent when data.val_fraction=0
            row.update({k: f"{val[k]:.6g}" for k in METRICS if k in val})
        out.append(row)
    return out


def read(sweep_dir: pathlib.Path) -> list[dict[str, str]]:
    path = sweep_dir / NAME
    if not path.is_file():
        return []
    with open(path, newline="") as fd:
        return list(csv.DictReader(fd))


def update(
    sweep_dir: pathlib.Path,
    cols: list[str],
    new: list[dict[str, str]],
    order: list[tuple[str, str]] | None = None,
) -> None:
    """Add `new` rows, replacing rows of the same (job, name); `order` ((job, name) pairs)
    sorts the file, others last. Atomic under an exclusive lock (POSIX locks work on NFS)."""
    with open(sweep_dir / f"{NAME}.lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        keys = {(r["job"], r["name"]) for r in new}
        kept = [r for r in read(sweep_dir) if (r["job"], r["name"]) not in keys]
        table = kept + new
        if order is not None:
            rank = {key: i for i, key in enumerate(order)}
            table.sort(key=lambda r: rank.get((r["job"], r["name"]), len(rank)))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(table)
        tmp = sweep_dir / f".{NAME}.tmp"
        tmp.write_text(buf.getvalue())
        os.replace(tmp, sweep_dir / NAME)
