"""docs/guide.md stays true: every command composes as written (each option exists, with the right
type), runs for real in its tiny variant (the `<!-- tiny: ... -->` comment under its block, with
the same options), and the Python snippet runs on a trained SAE."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from conftest import require_slurm
from helpers.public_sae import dump, header, weights
from helpers.shards import write_public_saev

import saev.record.config  # noqa: F401  (registers record's schemas, as record.py does)
from saev import cli
from saev.train import config as train_config
from saev.visualize import config as visualize_config

train_config.register()
visualize_config.register()

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
BLOCK = re.compile(r"```sh\n(.*?)```\n<!-- tiny:\n(.*?)-->", re.S)


def pairs() -> list[tuple[str, str]]:
    text = GUIDE.read_text()
    found = [(real.strip(), tiny.strip()) for real, tiny in BLOCK.findall(text)]
    assert len(found) == text.count("```sh"), "every sh block needs a <!-- tiny: --> variant"
    return found


def keys(command: str) -> set[str]:
    """The option keys (and config groups) a command sets."""
    return {a.split("=", 1)[0] for a in shlex.split(command)[2:] if not a.startswith("-")}


def test_every_guide_command_composes_as_written():
    for real, tiny in pairs():
        real_args, tiny_args = shlex.split(real), shlex.split(tiny)
        assert real_args[:2] == tiny_args[:2], (real, tiny)  # python <same entry point>
        assert keys(real) <= keys(tiny), (real, sorted(keys(real) - keys(tiny)))
        script = real_args[1]
        if script == "-m":  # python -m saev.export: its own key=value parser
            from saev import export

            export.parse([re.sub(r"<[^>]+>", "placeholder", a) for a in real_args[3:]])
            continue
        # Placeholders such as <shards> (strings to fill in) become a plain word; only the
        # composition is checked here (the tiny variant runs below).
        filled = [re.sub(r"<[^>]+>", "placeholder", a) for a in real_args[2:]]
        name = script.removesuffix(".py")
        try:  # as the entry points do: switches (probe=true) first
            cli.check_command_line(cli.expand_switches(filled, name), ROOT / "conf", name)
        except SystemExit as err:
            pytest.fail(f"{real}: exit {err.code}")


def run(command: str, variables: dict[str, str]) -> str:
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
        command = command.replace(f"${name}", value)
    args = shlex.split(command)
    assert args[0] == "python"
    res = subprocess.run(
        [sys.executable, *args[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, f"{command}\n{res.stderr[-3000:]}"
    return res.stdout.strip().splitlines()[-1]


def first_sae(run_dir: pathlib.Path) -> pathlib.Path:
    return sorted(p.parent for p in run_dir.rglob("sae.safetensors"))[0]


@pytest.mark.slow
def test_every_guide_command_runs_on_tiny_settings(tmp_path):
    from PIL import Image
    from skimage import data as samples

    photos = tmp_path / "photos"
    for i, name in enumerate(["astronaut", "coffee", "chelsea", "rocket"]):
        (photos / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(samples, name)()).save(photos / f"c{i % 2}" / f"{name}.png")
    public, _ = write_public_saev(tmp_path / "public")
    try:
        require_slurm()
        have_slurm = True
    except pytest.skip.Exception:
        have_slurm = False
    public_sae = tmp_path / "public-sae.pt"  # a public saev checkpoint on $PUBLIC's d_model 8
    dump(public_sae, header("5", "TopK", 8, 4), weights(8, 32))
    variables = {
        "PHOTOS": str(photos),
        "OUT": str(tmp_path / "out"),
        "PUBLIC": str(public),
        "PUBLIC_SAE": str(public_sae),
    }
    for _, tiny in pairs():
        if "hydra/launcher=slurm" in tiny and not have_slurm:
            continue  # require_slurm() fails under CI instead
        last = run(tiny, variables)
        script, multirun = shlex.split(tiny)[1], " -m " in f" {tiny} "
        if script == "record.py":
            variables["SHARDS"] = last
        elif script == "train.py" and multirun:
            variables["SWEEP"] = last
        elif script == "train.py" and "RUN_ID" not in variables:
            variables["RUN_ID"] = pathlib.Path(last).name
            variables["SAE"] = str(first_sae(pathlib.Path(last)))
        if script == "-m":  # python -m saev.export
            written = "cfg.json" if "format=saelens" in tiny else "config.json"
            assert (pathlib.Path(last) / written).is_file(), tiny
        if script == "visualize.py" and "sweep=" in tiny:
            assert (pathlib.Path(last) / "pareto.png").is_file()
    assert (pathlib.Path(variables["SAE"]) / "visuals" / "index.html").is_file()
    assert (tmp_path / "out" / "eval" / "metrics.json").is_file()
    assert (tmp_path / "out" / "probe" / "probe.csv").is_file()
    metrics = pathlib.Path(variables["SAE"]) / "visuals" / "metrics.json"
    assert "splice" in json.loads(metrics.read_text())
    for snippet in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S):
        code = snippet.replace("<sae>", variables["SAE"]).replace("<shards>", variables["SHARDS"])
        res = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        if "torch.randn(4," in code:
            assert "torch.Size([4," in res.stdout
