""".ci/run, dry: the real script in a scratch checkout whose README quickstart holds stand-in
commands, so every way the first command can go wrong is seen to end the run non-zero before the
tests (which print TESTS-RAN), and the run's exit code is the tests' otherwise."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS_RAN = "TESTS-RAN"

# A stand-in demo that writes what the real one prints last (the browser and the Pareto plot)
# next to a summary.csv of four finished SAEs with the given validation nmse.
GOOD_DEMO = (
    "d=$PWD/out && mkdir -p $d && touch $d/index.html $d/pareto.png"
    " && printf 'name,status,nmse,l0\\n' > $d/summary.csv"
    " && for i in 0 1 2 3; do printf 'sae%s,done,{nmse},4\\n' $i >> $d/summary.csv; done"
    " && echo $d/index.html && echo $d/pareto.png"
)


def dry_run(tmp_path: pathlib.Path, demo: str, tests: str) -> subprocess.CompletedProcess:
    """`.ci/run` in a scratch checkout: a README with the two commands, a `.venv/bin/python` that
    is this interpreter (so nothing is installed), a stand-in `chromium` on PATH, and no
    ../shared/slurm beside it."""
    repo = tmp_path / "clone"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / "pyproject.toml").write_text("[project]\nname = 'dry'\n")
    readme = f"""\
        # dry

        ## Quickstart

        ```sh
        {demo}
        ```

        ```sh
        {tests}
        ```

        ## Other
        """
    (repo / "README.md").write_text(textwrap.dedent(readme))
    bin_dir = tmp_path / "bin"
    for exe, body in [
        (repo / ".venv" / "bin" / "python", f'exec {sys.executable} "$@"'),
        (bin_dir / "chromium", "exit 0"),
    ]:
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text(f"#!/usr/bin/env bash\n{body}\n")
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    return subprocess.run(
        ["bash", ".ci/run"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "demo, why",
    [
        ("echo recording; exit 3", "the demo exits non-zero"),
        ("false | cat; echo after", "a step of the demo fails inside a pipe"),
        ("echo /nowhere/index.html; echo /nowhere/pareto.png", "no browser where it says"),
        (GOOD_DEMO.format(nmse=0.9), "the demo's SAEs reconstruct poorly"),
    ],
)
def test_a_broken_first_command_fails_ci_before_the_tests(tmp_path, demo, why):
    res = dry_run(tmp_path, demo, f"echo {TESTS_RAN}")
    assert res.returncode != 0, why
    assert TESTS_RAN not in res.stdout, why


def test_ci_exits_with_the_tests_code_and_refuses_no_tests(tmp_path):
    demo = GOOD_DEMO.format(nmse=0.02)
    res = dry_run(tmp_path / "pass", demo, f"echo {TESTS_RAN}")
    assert res.returncode == 0, res.stderr
    assert TESTS_RAN in res.stdout and "demo: sae3: val nmse 0.020" in res.stdout
    assert "no ../shared/slurm/up.sh beside this checkout" in res.stderr
    assert dry_run(tmp_path / "fail", demo, "exit 1").returncode == 1
    empty = dry_run(tmp_path / "empty", demo, "exit 5")  # pytest: no tests collected
    assert empty.returncode == 1 and "pytest collected no tests" in empty.stderr
