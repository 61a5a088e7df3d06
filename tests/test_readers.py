"""Reader processes start safely whatever threads the main process runs (issue 22).

A fork copies only the calling thread: a lock that another thread holds at that moment stays held
in the child, and a child that needs it (a library's at-fork handler, a module lock, an allocator
lock) hangs forever. The loaders' workers are started by a forkserver, never forked from the main
process; these tests start loaders many times in a row while other threads hold such locks.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers.shards import make_shards

# Run in a subprocess: a hang is then a timeout, and the at-fork handler it registers (which
# cannot be removed) stays out of the test process.
SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, time
    import numpy as np
    from saev.data import loaders, pipeline
    from saev.data.loaders import ShuffledLoader

    root, repeats, start = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    loaders._usable_cpus = lambda: 64  # start the two workers asked for, whatever the machine
    if start == "fork":  # the control: the way the readers used to start
        import multiprocessing as mp
        pipeline._start_context = lambda: mp.get_context("fork")
    # Every fill by a worker (the main process would otherwise fill the slots of stuck ones).
    pipeline.Pipeline._help = lambda self, gen, ready: False

    # A library whose fork handler takes its lock (as logging's does), while one of its threads
    # holds that lock: a child forked now could never take it.
    held = threading.Lock()
    os.register_at_fork(after_in_child=lambda: (held.acquire(), held.release()))
    holding, stop = threading.Event(), threading.Event()

    def hold():
        with held:
            holding.set()
            stop.wait()

    def allocate():  # malloc-heavy threads: allocator locks change hands all the time
        while not stop.is_set():
            np.ones(2**18).sum()

    threads = [threading.Thread(target=hold, daemon=True)]
    threads += [threading.Thread(target=allocate, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    holding.wait()
    for i in range(repeats):
        with ShuffledLoader(root, 3, 16, "all", seed=i, n_workers=2, buffer_mb=0.002) as loader:
            seen = []
            for batch in loader:
                seen += list(zip(batch["example_idx"].tolist(), batch["token_idx"].tolist()))
            pids = [p.pid for p in loader._pipeline._procs]
            assert len(pids) == 2, pids
            assert sorted(seen) == [(e, t) for e in range(23) for t in range(6)]
            for pid in pids:  # started by the forkserver, not forked from here
                with open(f"/proc/{pid}/stat") as f:
                    assert int(f.read().rsplit(")", 1)[1].split()[1]) != os.getpid()
    stop.set()
    print("started", repeats, "times", flush=True)
    """
)


def _run(root, repeats: int, start: str, timeout: float):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root), str(repeats), start],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_readers_start_while_other_threads_hold_locks(tmp_path):
    root, _ = make_shards(tmp_path)
    proc = _run(root, 40, "default", timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "started 40 times" in proc.stdout


@pytest.mark.slow
def test_the_same_start_by_fork_hangs(tmp_path):
    """The control: the same script with forked readers hangs on its first loader, so the test
    above would catch a return to fork."""
    root, _ = make_shards(tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        _run(root, 1, "fork", timeout=20)
