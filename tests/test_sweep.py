"""`python train.py -m`: the grouping sweeper's plan (fast, configs composed from the real conf/),
and multiruns end to end in-process, with submitit's local launcher and on a real SLURM cluster.
"""

import csv
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import safetensors.torch
from conftest import require_slurm
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from saev import cli
from saev.train import config as train_config
from saev.train import summary, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
}
SHARDS = ["data.shard_root=/shards", "data.layer=0"]
train_config.register()


@pytest.fixture(scope="module")
def composer():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        yield lambda overrides: OmegaConf.to_object(compose("train", overrides=overrides))


def plan(composer, args, **kw) -> sweep.Plan:
    return sweep.plan(SHARDS + args, composer, **kw)


def member_values(job: sweep.JobPlan, key: str) -> list[str]:
    return [s.settings[key] for s in job.saes]


def test_issue_example_is_two_jobs_of_four(composer):
    p = plan(
        composer, ["sae=relu", "sae.sparsity_coeff=4e-4,8e-4", "lr=3e-4,1e-3", "data.layer=13,23"]
    )
    assert [len(j.saes) for j in p.jobs] == [4, 4]
    assert p.swept == ["data.layer", "sae.sparsity_coeff", "lr"]
    for job, layer in zip(p.jobs, ["13", "23"]):
        assert f"data.layer={layer}" in job.overrides and "data.shard_root=/shards" in job.overrides
        assert set(member_values(job, "data.layer")) == {layer}
        pairs = {(s.settings["sae.sparsity_coeff"], s.settings["lr"]) for s in job.saes}
        assert pairs == {(c, lr) for c in ("0.0004", "0.0008") for lr in ("0.0003", "0.001")}
        # Per-SAE settings travel with each SAE, never as the job's own overrides.
        assert not any(o.startswith(("sae", "lr")) for o in job.overrides)
    assert p.jobs[0].saes[1].name == "01-relu-sparsity_coeff=0.0004-lr=0.001"


def test_union_of_kind_grids_shares_jobs_by_data(composer):
    grids = [
        {"sae": "relu", "sae.sparsity_coeff": "1e-3,3e-3"},
        {"sae": "topk", "sae.k": "2,3"},
        {"sae": "matryoshka", "sae.k": 4, "lr": 3e-4},
    ]
    p = plan(composer, ["data.seed=0,1", "sae.exp_factor=2"], grids=grids)
    assert [len(j.saes) for j in p.jobs] == [5, 5]
    assert p.swept == ["data.seed", "sae", "sae.sparsity_coeff", "sae.k", "lr"]
    for job, seed in zip(p.jobs, "01"):
        assert f"data.seed={seed}" in job.overrides
        kinds = [
            (s.settings["sae"], s.settings["sae.sparsity_coeff"], s.settings["sae.k"])
            for s in job.saes
        ]
        assert kinds == [
            ("relu", "0.001", ""), ("relu", "0.003", ""), ("topk", "", "2"), ("topk", "", "3"),
            ("matryoshka", "", "4"),
        ]  # fmt: skip
        # Each member composes to its own kind with only its own kind's settings.
        for s in job.saes:
            cfg = composer(SHARDS + job.overrides + s.overrides)
            assert cfg.sae.kind.split("-")[0] == s.settings["sae"]
            assert cfg.sae.exp_factor == 2 and cfg.data.seed == int(seed)
    assert [s.name for s in p.jobs[0].saes][2:] == [
        "02-topk-k=2", "03-topk-k=3", "04-matryoshka-batchtopk-k=4-lr=0.0003",
    ]  # fmt: skip


def test_worked_example_of_the_docs(composer):
    grids = [{"sae": "relu", "sae.sparsity_coeff": "4e-4,8e-4"}, {"sae": "topk", "sae.k": "32,64"}]
    p = plan(composer, ["data.layer=13,23", "lr=3e-4,1e-3"], grids=grids)
    assert [len(j.saes) for j in p.jobs] == [8, 8]
    assert p.swept == ["data.layer", "lr", "sae", "sae.sparsity_coeff", "sae.k"]
    names = [s.name for s in p.jobs[0].saes]
    assert names[0] == "00-relu-lr=0.0003-sparsity_coeff=0.0004"
    assert names[7] == "07-topk-lr=0.001-k=64"
    # The experiment file holds the same sweep in hydra.sweeper.params and grids.
    hc = compose("train", SHARDS + ["+experiment=relu_vs_topk"], return_hydra_config=True).hydra
    params, grids = (OmegaConf.to_container(hc.sweeper[k]) for k in ("params", "grids"))
    q = sweep.plan(SHARDS + ["data.layer=13,23"], composer, params=params, grids=grids)
    assert [len(j.saes) for j in q.jobs] == [8, 8]
    assert {s.name.split("-", 1)[1] for s in q.jobs[1].saes} == {n.split("-", 1)[1] for n in names}


def test_cap_splits_a_group_evenly(composer):
    p = plan(composer, ["seed=range(0,10)", "n_train=1000,2000"], max_saes_per_job=4)
    assert [len(j.saes) for j in p.jobs] == [4, 3, 3, 4, 3, 3]
    assert [j.num for j in p.jobs] == list(range(6))
    assert [member_values(j, "seed") for j in p.jobs[:3]] == [
        ["0", "1", "2", "3"], ["4", "5", "6"], ["7", "8", "9"],
    ]  # fmt: skip
    assert all("n_train=1000" in j.overrides for j in p.jobs[:3])


def test_job_settings_split_jobs_and_reach_them(composer):
    args = ["precision=32,bf16-mixed", "trainer.devices=1,2", "lr=1e-3,3e-4", "grad_clip=0,1"]
    p = plan(composer, args)
    assert [len(j.saes) for j in p.jobs] == [4, 4, 4, 4]
    got = [(o for o in j.overrides if o.startswith(("precision", "trainer"))) for j in p.jobs]
    assert [sorted(g) for g in got][1] == ["precision=32", "trainer.devices=2"]
    for job in p.jobs:
        cfgs = [composer(SHARDS + job.overrides + s.overrides) for s in job.saes]
        assert len({c.precision for c in cfgs}) == 1 and len({c.trainer.devices for c in cfgs}) == 1
        assert {(c.lr, c.grad_clip) for c in cfgs} == {(a, b) for a in (1e-3, 3e-4) for b in (0, 1)}


def test_equal_composed_job_settings_share_a_job(composer):
    # An explicit batch size equal to the default reads the same stream, so it shares the job.
    grids = [{"data.batch_size": 16384, "lr": 1e-3}, {"lr": 3e-4}]
    p = plan(composer, [], grids=grids)
    assert [len(j.saes) for j in p.jobs] == [2]
    assert "data.batch_size=16384" in p.jobs[0].saes[0].overrides


def test_params_and_the_in_job_sweep_fold_into_the_grid(composer):
    p = plan(composer, ["sweep={sae: [relu, topk]}"], params={"lr": "1e-3,3e-4"})
    assert [len(j.saes) for j in p.jobs] == [4]
    assert [(s.settings["lr"], s.settings["sae"]) for s in p.jobs[0].saes] == [
        ("0.001", "relu"), ("0.001", "topk"), ("0.0003", "relu"), ("0.0003", "topk"),
    ]  # fmt: skip
    # A repeated combination is trained once; a grid's value replaces one set outside.
    assert plan(composer, [], grids=[{"lr": "1,2"}, {"lr": "2,3"}]).n_saes == 3
    p = plan(composer, ["lr=5", "seed=1"], grids=[{"lr": "1,2"}, {"seed": 2}])
    assert [(s.settings["lr"], s.settings["seed"]) for s in p.jobs[0].saes] == [
        ("1", "1"), ("2", "1"), ("5", "2"),
    ]  # fmt: skip


def test_glob_over_kinds_like_the_basic_sweeper(composer):
    from hydra.core.global_hydra import GlobalHydra

    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    p = plan(composer, ["sae=glob(*topk*)", "sae.k=2"], parser=parser)
    assert [s.name for s in p.jobs[0].saes] == ["00-batchtopk", "01-topk"]
    # train.py's early check of kind names leaves sweep functions to Hydra.
    cli.check_sae_choices(["sae=glob(*topk*)", "sae=choice(relu,topk)"], ROOT / "conf")


def test_members_override_round_trips_through_hydra(composer):
    # Quotes, a trailing backslash and an interpolation reach each member's composition intact.
    p = plan(composer, ["name='a b','c=\\'d\\'\\\\'", "lr=1e-3", "lr_warmup_steps=${seed}"])
    job = p.jobs[0]
    assert [s.name for s in job.saes] == ["a b", "c='d'\\"]
    assert job.saes[0].overrides == ["name='a b'", "lr=1e-3", "lr_warmup_steps=${seed}"]
    cfg = composer(job.launch_overrides())
    assert cfg.members == [s.overrides for s in job.saes]
    assert composer(SHARDS + cfg.members[1]).name == "c='d'\\"


@pytest.mark.parametrize(
    "args, kw, message",
    [
        (
            ["sae=relu,topk", "sae.k=32,64"],
            {},
            "sae.k is swept with sae=relu,topk, but sae=relu has no k (only ['topk', 'batchtopk'] "
            "do) and a plain product crosses every kind with every value; sweep a union of grids "
            "instead: 'hydra.sweeper.grids=[{sae: relu}, {sae: topk, sae.k: \"32,64\"}]'",
        ),
        (["lr=range(1,1)"], {}, "lr=range(1,1) sweeps no values (an empty grid)"),
        ([], {"grids": []}, "hydra.sweeper.grids is an empty list"),
        ([], {"grids": [{"lr": "range(3,3)"}]}, "range(3,3) sweeps no values (an empty grid) in"),
        (["foo=1,2"], {}, "Could not override 'foo': Key 'foo' not in 'TrainConfig'"),
        (["lr=abc,1e-3"], {}, "Error merging override lr=abc: Value 'abc' of type 'str' could"),
        (["lr=1,2"], {"grids": [{"lr": 3}]}, "lr is swept outside the grids and set in hydra"),
        (["members=[[a]]"], {}, "members is set by the sweeper"),
        (["sae=relu", "sae.k=2,3"], {}, "sae.k applies only to ['topk', 'batchtopk'], not 'relu'"),
        (["lr=1,2"], {"max_saes_per_job": 0}, "max_saes_per_job must be a positive integer"),
        ([], {"grids": [{"name": "a", "lr": 1}, {"name": "a"}]}, "names must be unique in a job"),
    ],
)
def test_bad_sweeps_name_the_key(composer, args, kw, message):
    with pytest.raises(Exception) as exc:
        plan(composer, args, **kw)
    assert message in cli.one_line(exc.value), cli.one_line(exc.value)


def test_summary_rows_of_a_job_are_replaced_not_repeated(tmp_path):
    cols = summary.columns(["lr"])
    job = sweep.JobPlan(num=0, overrides=[], saes=[sweep.SAEPlan("a", [], {"lr": "1"})])
    summary.update(tmp_path, cols, summary.rows(job, tmp_path / "job-0", "failed: killed"))
    other = sweep.JobPlan(num=1, overrides=[], saes=[sweep.SAEPlan("a", [], {"lr": "2"})])
    summary.update(tmp_path, cols, summary.rows(other, tmp_path / "job-1", "done"))
    summary.update(tmp_path, cols, summary.rows(job, tmp_path / "job-0", "done"))
    rows = summary.read(tmp_path)
    assert [(r["job"], r["lr"], r["status"]) for r in rows] == [
        ("job-1", "2", "done"),
        ("job-0", "1", "done"),
    ]


def test_sweeper_fills_rows_of_jobs_that_wrote_none(composer, tmp_path):
    p = plan(composer, ["data.seed=0,1,2", "lr=1,2"])
    cols = summary.columns(p.swept)
    summary.update(tmp_path, cols, summary.rows(p.jobs[2], tmp_path / "job-2", "failed: nan"))
    summary.update(tmp_path, cols, summary.rows(p.jobs[0], tmp_path / "job-0", "done"))
    # Job 1 was killed before writing; job 2 failed and wrote its rows.
    failed = sweep.finish(p, tmp_path, [None, "job 7 (task: 0) has not produced any output", "x"])
    rows = summary.read(tmp_path)
    assert [(r["job"], r["lr"]) for r in rows] == [(f"job-{j}", v) for j in range(3) for v in "12"]
    assert [r["status"] for r in rows] == ["done"] * 2 + [
        "failed: job 7 (task: 0) has not produced any output"
    ] * 2 + ["failed: nan"] * 2
    assert failed == rows[2:]
    assert [r["data.seed"] for r in rows] == ["0", "0", "1", "1", "2", "2"]


# ----------------------------------------------------------------------------- end to end


def common(shard_root, runs_root, n_train=2560) -> list[str]:
    return [
        f"data.shard_root={shard_root}", "data.layer=0", "data.batch_size=128",
        "data.val_fraction=0.125", "data.buffer_mb=4", "data.n_workers=1", f"n_train={n_train}",
        f"runs_root={runs_root}", "lr=3e-3", "lr_warmup_steps=5", "log_every=10",
        "sae.exp_factor=2",
    ]  # fmt: skip


def multirun(args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "-m", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def sweep_dir_of(res) -> pathlib.Path:
    return pathlib.Path(res.stdout.strip().splitlines()[-1])


def read_summary(sweep_dir: pathlib.Path) -> list[dict]:
    with open(sweep_dir / "summary.csv", newline="") as fd:
        return list(csv.DictReader(fd))


def trained(sweep_dir: pathlib.Path, row: dict) -> dict:
    return json.loads((sweep_dir / row["job"] / row["name"] / "config.json").read_text())["train"]


KIND_GRIDS = (
    'hydra.sweeper.grids=[{sae: relu, sae.sparsity_coeff: "1e-3,3e-3"}, {sae: topk, sae.k: "2,3"}]'
)


@pytest.mark.slow
def test_multirun_in_process_trains_each_group_in_one_job(shard_root, tmp_path):
    res = multirun([*common(shard_root, tmp_path), "data.seed=0,1", KIND_GRIDS])
    assert res.returncode == 0, res.stderr[-3000:]
    sweep_dir = sweep_dir_of(res)
    assert sweep_dir.parent == tmp_path / "multirun"
    assert sorted(p.name for p in sweep_dir.glob("job-*")) == ["job-0", "job-1"]
    rows = read_summary(sweep_dir)
    assert [r["job"] for r in rows] == ["job-0"] * 4 + ["job-1"] * 4
    assert list(rows[0]) == [
        "name", "job", "data.seed", "sae", "sae.sparsity_coeff", "sae.k", "status", "step",
        *summary.METRICS,
    ]  # fmt: skip
    for row in rows:
        assert row["status"] == "done" and row["step"] == "20"
        assert 0 < float(row["nmse"]) < 2 and float(row["l0"]) > 0
        # Each checkpoint was trained with exactly its combination.
        cfg = trained(sweep_dir, row)
        assert cfg["data"]["seed"] == int(row["data.seed"]) and cfg["sae"]["d_sae"] == 32
        assert cfg["sae"]["activation"] == row["sae"]
        if row["sae"] == "relu":
            assert cfg["sae"]["sparsity_coeff"] == float(row["sae.sparsity_coeff"])
            assert cfg["sae"]["k"] is None and row["sae.k"] == ""
        else:
            assert cfg["sae"]["k"] == int(row["sae.k"]) and cfg["sae"]["sparsity_coeff"] is None
        assert cfg["runs_root"] == str(sweep_dir) and cfg["run_id"] == row["job"]
        assert cfg["wandb"]["group"] == f"sweep-{sweep_dir.name}"
        assert cfg["wandb"]["tags"] == [row["job"]]
        metrics = json.loads((sweep_dir / row["job"] / row["name"] / "metrics.json").read_text())
        assert float(row["nmse"]) == pytest.approx(metrics["val"]["nmse"], rel=1e-5)
    # One W&B run per SAE, its id prefixed by the sweep's group and the job.
    runs = sorted(p.name for p in (sweep_dir / "job-1" / "wandb").glob("offline-run-*"))
    assert len(runs) == 4 and all(f"sweep-{sweep_dir.name}-job-1-0" in r for r in runs)
    plan_json = json.loads((sweep_dir / "sweep.json").read_text())
    assert [len(j["saes"]) for j in plan_json["jobs"]] == [4, 4]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["in-process", "local"])
def test_failing_job_keeps_the_others(shard_root, tmp_path, launcher):
    # Job 1 holds an SAE whose loss overflows (lr 1e5 without unit-norm decoder rows).
    grids = (
        'hydra.sweeper.grids=[{data.seed: 0, lr: "1e-3,3e-3"}, '
        '{data.seed: 1, lr: "1e-3,1e5", sae.normalize_decoder: false}]'
    )
    args = [*common(shard_root, tmp_path), "sae=relu", "lr_warmup_steps=0", grids]
    res = multirun(args + (["hydra/launcher=local"] if launcher == "local" else []))
    assert res.returncode == 1, res.stderr[-3000:]
    sweep_dir = sweep_dir_of(res)
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: 2 of 4 SAEs failed (in job-1); see {sweep_dir / 'summary.csv'}"
    )
    rows = read_summary(sweep_dir)
    assert [(r["job"], r["lr"]) for r in rows] == [
        ("job-0", "0.001"), ("job-0", "0.003"), ("job-1", "0.001"), ("job-1", "100000.0"),
    ]  # fmt: skip
    assert [r["status"] for r in rows[:2]] == ["done", "done"]
    for row in rows[2:]:
        assert row["status"].startswith("failed: non-finite loss for SAE 01-relu-"), row
        assert row["nmse"] == ""
    for row in rows[:2]:
        assert (sweep_dir / "job-0" / row["name"] / "sae.safetensors").is_file()
        assert trained(sweep_dir, row)["lr"] == float(row["lr"])
    # With the local launcher each job ran in its own process (submitit logs per job).
    assert len(list(sweep_dir.glob(".submitit/*/*_log.err"))) == (2 if launcher == "local" else 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["sae=relu,topk", "sae.k=32,64"], "error: sae.k is swept with sae=relu,topk, but"),
        (["foo=1"], "error: Could not override 'foo': Key 'foo' not in 'TrainConfig'"),
    ],
)
def test_bad_multirun_is_one_line_before_anything_runs(shard_root, tmp_path, args, message):
    res = multirun([*common(shard_root, tmp_path), *args], timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- real SLURM


def weights(path: pathlib.Path) -> dict:
    return safetensors.torch.load_file(path / "sae.safetensors")


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout} s for {what}")


def squeue_state(job_id: str) -> str:
    res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return res.stdout.strip()


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sweep_and_a_requeued_job_resumes_exactly(shard_root, tmp_path):
    """Two SLURM jobs that train the same SAEs (`ckpt_every` changes when checkpoints are
    written, not the weights); job 0 is requeued mid-training, resumes from its checkpoint and
    ends with job 1's weights."""
    require_slurm()
    args = [
        *common(shard_root, tmp_path, n_train=128 * 3000), "sae=relu", "lr=1e-3,3e-3",
        "ckpt_every=20,21", "log_every=20", "hydra/launcher=slurm",
        "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=4", "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.timeout_min=20",
    ]  # fmt: skip
    cmd = [sys.executable, "train.py", "-m", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        sweep_dir = wait_for(
            lambda: next(tmp_path.glob("multirun/*/sweep.json"), None), 60, "the plan"
        ).parent
        last = sweep_dir / "job-0" / "checkpoints" / "last.ckpt"
        wait_for(last.is_file, 240, "job 0's first checkpoint")
        job_id = wait_for(lambda: job_id_of(sweep_dir, 0), 10, "job 0's SLURM id")
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        wait_for(lambda: squeue_state(job_id) == "PENDING", 60, "the requeued job to be pending")

        def restarted() -> bool:  # started at once, it could meet a revoked credential (below)
            release_held({job_id})
            return squeue_state(job_id) != "PENDING"

        wait_for(restarted, 60, "the requeued job to start again")
        out, err = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert pathlib.Path(out.strip().splitlines()[-1]) == sweep_dir
    rows = read_summary(sweep_dir)
    assert [(r["job"], r["lr"], r["ckpt_every"], r["status"]) for r in rows] == [
        ("job-0", "0.001", "20", "done"), ("job-0", "0.003", "20", "done"),
        ("job-1", "0.001", "21", "done"), ("job-1", "0.003", "21", "done"),
    ]  # fmt: skip
    for row in rows:
        assert row["step"] == "3000" and float(row["nmse"]) < 1
        assert trained(sweep_dir, row)["lr"] == float(row["lr"])
    # The second attempt resumed from a checkpoint, not from step 0.
    logs = "".join(p.read_text() for p in sweep_dir.glob(f".submitit/{job_id}/*_log.err"))
    resumed = [
        int(line.rsplit(" ", 1)[1]) for line in logs.splitlines() if "job-0: resuming from" in line
    ]
    assert len(resumed) == 1 and resumed[0] > 0, logs[-2000:]
    csv_rows = (sweep_dir / "job-0" / rows[0]["name"] / "metrics.csv").read_text().splitlines()
    assert sum(r.startswith("20,train/nmse,") for r in csv_rows) == 1  # step 20 was not redone
    for a, b in ((rows[0], rows[2]), (rows[1], rows[3])):
        wa, wb = weights(sweep_dir / "job-0" / a["name"]), weights(sweep_dir / "job-1" / b["name"])
        assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def job_id_of(sweep_dir: pathlib.Path, job: int) -> str | None:
    """The SLURM id of sweep job `job`, from submitit's folder (one per SLURM job)."""
    for folder in sweep_dir.glob(".submitit/*"):
        for log in folder.glob("*_log.err"):
            if f"job-{job}" in log.read_text():
                return folder.name
    return None


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_time_limit_resubmits_and_resumes(shard_root, tmp_path):
    """A job longer than its time limit: submitit's signal 60 s before the 2-minute limit
    requeues it (max_num_timeout), and each attempt resumes the last checkpoint until done.

    An attempt trains for about a minute, so the number of attempts follows the machine's speed:
    beside another CPU-heavy process an attempt reached only ~6000 steps, and 60k steps ran out of
    5 resubmissions. So the job is shorter and may be resubmitted up to 20 times."""
    require_slurm()
    args = [
        *common(shard_root, tmp_path, n_train=128 * 40000), "sae=relu", "ckpt_every=200",
        "log_every=1000", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=4",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=60", "hydra.launcher.max_num_timeout=20",
    ]  # fmt: skip
    cmd = [sys.executable, "train.py", "-m", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        end = time.monotonic() + 1800
        while proc.poll() is None and time.monotonic() < end:
            release_held(job_ids(tmp_path))
            time.sleep(1)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    sweep_dir = pathlib.Path(out.strip().splitlines()[-1])
    [row] = read_summary(sweep_dir)
    assert row["status"] == "done" and row["step"] == "40000"
    logs = "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in logs  # submitit's timeout handling resubmitted it
    steps = [int(m) for m in re.findall(r"job-0: resuming from \S+ at step (\d+)", logs)]
    assert steps and all(s > 0 for s in steps) and steps == sorted(steps), logs[-2000:]


def job_ids(tmp_path: pathlib.Path) -> set[str]:
    """SLURM ids of this test's jobs (submitit's folders)."""
    return {p.name for p in tmp_path.glob("multirun/*/.submitit/*")}


HELD_SINCE: dict[str, float] = {}


def release_held(ids: set[str], settle_s: float = 3.0) -> None:
    """Start those of `ids` that SLURM holds after a requeue (~120 s), once they have been held
    for `settle_s`: a job started within milliseconds of its requeue can find the previous
    attempt's credential still revoked, and SLURM fails it ("Job credential revoked")."""
    pending = ["squeue", "-h", "-t", "PD", "-o", "%i %r"]
    held = set()
    for line in subprocess.run(pending, capture_output=True, text=True).stdout.splitlines():
        job_id, reason = line.split(maxsplit=1)
        if reason == "BeginTime" and job_id in ids:
            held.add(job_id)
            since = HELD_SINCE.setdefault(job_id, time.monotonic())
            if time.monotonic() - since >= settle_s:
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
                del HELD_SINCE[job_id]
    for job_id in set(HELD_SINCE) - held:
        del HELD_SINCE[job_id]
