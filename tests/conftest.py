"""Shared test setup: never touch the network, and skip GPU tests cleanly without CUDA."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny matmuls in two test processes on a shared 2-core machine: OpenMP threads only contend.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402


def require_slurm() -> None:
    """Skip unless a SLURM controller answers (fail instead under CI, which starts one)."""
    import shutil
    import subprocess

    ok = shutil.which("sinfo") is not None and (
        subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    )
    if not ok:
        reason = "no SLURM controller answers; start one with bash ../shared/slurm/up.sh"
        if os.environ.get("CI"):
            pytest.fail(reason + " (.ci/run does)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory) -> pathlib.Path:
    """Tiny synthetic shards with a known dictionary (16-d, 160 examples x 16 patches), shared by
    the training, sweep, resume and DDP tests of a module."""
    from saev import synthetic

    cfg = synthetic.SyntheticConfig(
        d_model=16, n_features=32, active=3, noise=0.01, offset=3.0, n_examples=160, n_patches=16,
        examples_per_shard=64,
    )  # fmt: skip
    return synthetic.write(tmp_path_factory.mktemp("shards"), cfg)


def pytest_collection_modifyitems(config, items):
    import torch

    # SLURM tests first, then the other slow ones: they start at once, and the work-stealing
    # workers (pyproject's --dist worksteal) end on short tests together, instead of one idling
    # while the other finishes a minutes-long test collected last (test_sweep.py's time-limit
    # test waits on SLURM for 1.5-2.5 minutes). A stable sort: each worker collects the same
    # order, as xdist requires.
    items.sort(
        key=lambda item: 0 if "slurm" in item.keywords else 1 if "slow" in item.keywords else 2
    )
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The recorded dataset, crafted SAE and rendered browser that visualize's and the browser's tests
# share (module-scoped: each module that asks builds its own).
from helpers.visualize import crafted_ckpt, recorded_shards, rendered  # noqa: E402, F401
