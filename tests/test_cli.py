"""The three entry points as a newcomer meets them: `--help` lists only what that entry uses, one
line per option; a misspelled option names the nearest right one; every user error is one line
with the same exit code."""

import os
import pathlib
import subprocess
import sys

import pytest

from saev import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script: str, *args: str):
    cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "script, groups, absent, options",
    [
        ("train.py", ["sae:", "+experiment:", "hydra/launcher:"], ["model:", "data:"],
         ["data.shard_root=(required)", "lr=None", "sae.k=None", "trainer.devices=1"]),
        ("record.py", ["model:", "data:", "hydra/launcher:"], ["sae:", "+experiment:"],
         ["model.family='tiny'", "layers=[-1]", "data.root=(required)"]),
        ("visualize.py", [], ["sae:", "model:", "data:"],
         ["ckpt=None", "top_k=128", "heatmap.opacity=0.6", "include_latents=[]"]),
    ],
)  # fmt: skip
def test_help_lists_only_what_the_entry_uses(script, groups, absent, options):
    res = run(script, "--help")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"usage: python {script}")
    stripped = [line.strip() for line in lines]
    for group in groups:
        assert any(s.startswith(group) for s in stripped), group
    for group in absent:
        assert not any(s.startswith(group) for s in stripped), group
    for option in options:
        assert any(s.startswith(option) for s in stripped), option
    assert all(len(line) <= cli.HELP_WIDTH for line in lines)
    assert res.stderr == ""


@pytest.mark.parametrize(
    "script, args, fragment",
    [
        ("train.py", ["data.shard_rot=x", "data.layer=0"], "(did you mean data.shard_root?)"),
        ("train.py", ["-m", "data.shard_root=x", "data.layer=0", "lrr=1,2"], "(did you mean lr?)"),
        ("record.py", ["model=tinyy"], "(did you mean model=tiny?)"),
        ("record.py", ["batchsize=8"], "(did you mean batch_size?)"),
        ("visualize.py", ["ckpt=x", "top_kk=3"], "(did you mean top_k?)"),
        ("visualize.py", ["ckpt=/nowhere"], "lacks config.json"),
        ("train.py", ["data.shard_root=/nowhere", "data.layer=0"], "does not exist"),
        ("visualize.py", ["ckpt=x", "dump_to=/tmp/v"], "dump_to= was renamed: write out=<dir>"),
        ("visualize.py", ["ckpt=x", "images.root=/d"], "images.root= was renamed: write data.root"),
    ],
)
def test_user_errors_are_one_line_with_one_exit_code(script, args, fragment):
    res = run(script, *args)
    assert res.returncode == cli.USER_ERROR
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], res.stderr


def test_progress_bars_draw_on_a_terminal_only(tmp_path):
    """A log file gets no carriage-return spam; a terminal gets the bar."""
    import fcntl
    import pty
    import struct
    import termios

    args = ["record.py", "data.n_images=16", f"dump_to={tmp_path / 'a'}", "n_workers=0"]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real size
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=follower)  # fmt: skip
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0
    os.close(leader)
    assert b"img/s" in seen
    res = run(args[0], *args[1:-2], f"dump_to={tmp_path / 'b'}", "n_workers=0")
    assert res.returncode == 0 and "img/s" not in res.stderr


# `-X importtime` lists every module a run imported, with the time each took, on stderr.
HEAVY = ("torch", "lightning", "timm", "open_clip", "wandb")


@pytest.mark.parametrize(
    "script, args, fragment",
    [
        ("record.py", ["model=nosuch"], "Could not find 'model/nosuch'"),
        ("train.py", ["sae=nosuch"], "unknown SAE kind sae=nosuch"),
        ("visualize.py", ["ckpt=/nonexistent"], "/nonexistent lacks config.json"),
    ],
)
def test_a_user_error_is_reported_before_anything_heavy_is_imported(script, args, fragment):
    """The config schemas, the checks and the entry points import no torch, Lightning, timm,
    open_clip or W&B, so the one line comes in about a second, not the 5+ s those take."""
    res = run("-X", "importtime", script, *args)
    assert res.returncode == cli.USER_ERROR
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], res.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert "saev.cli" in imported  # the listing is there: the check below can fail
    assert not [m for m in imported if m.split(".")[0] in HEAVY], sorted(imported)


def test_a_switch_is_short_for_its_enabled_field():
    argv = ["ckpt=x", "splice=true", "splice.n_images=8", "probe=False", "render=false"]
    assert cli.expand_switches(argv, "visualize") == [
        "ckpt=x", "splice.enabled=true", "splice.n_images=8", "probe.enabled=false",
        "render=false",
    ]  # fmt: skip
    assert cli.expand_switches(["splice=true"], "train") == ["splice=true"]
    with pytest.raises(SystemExit) as err:
        cli.expand_switches(["probe=yes"], "visualize")
    assert err.value.code == cli.USER_ERROR
