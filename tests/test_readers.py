"""Reader threads (issue 22): loaders started many times in a row beside busy threads, closed at
any point, or failing, never hang and leave no reader behind.

Readers used to be processes, started by a forkserver: a fork copies only the calling thread, so
a lock that another thread held at that moment stayed held in a forked child forever, and the
tests here started loaders while other threads held such locks and showed that forked readers
hang. Readers are now threads of the main process (so that the shuffle buffer can be private
memory, in huge pages): nothing forks, and those tests went. What still matters is checked here,
each script in a subprocess so that a hang is a timeout rather than a stuck test run.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers.shards import make_shards

PRELUDE = """
import os, sys, threading, time
import numpy as np
from saev import shards
from saev.cli import one_line
from saev.data import loaders, pipeline
from saev.data.loaders import ShuffledLoader

root = sys.argv[1]
loaders._usable_cpus = lambda: 64  # start the two readers asked for, whatever the machine
KW = dict(n_workers=2, buffer_mb=0.002)
ALL = [(e, t) for e in range(23) for t in range(6)]

def readers():
    return [t for t in threading.enumerate() if t.name.startswith("saev-reader")]

def pairs(batches):
    return [p for b in batches for p in zip(b["example_idx"].tolist(), b["token_idx"].tolist())]
"""

BUSY = """
# Every fill by a reader (the main thread would otherwise fill the slots of stuck ones).
pipeline.Pipeline._help = lambda self, gen, ready: False
# A lock held for the whole run by another thread, which a forked child would need (its fork
# handler takes it, as logging's does): readers started by fork would hang on it.
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

others = [threading.Thread(target=hold, daemon=True)]
others += [threading.Thread(target=allocate, daemon=True) for _ in range(2)]
for t in others:
    t.start()
holding.wait()
for i in range(int(sys.argv[2])):
    with ShuffledLoader(root, 3, 16, "all", seed=i, **KW) as loader:
        for epoch in range(2):
            assert sorted(pairs(loader)) == ALL, (i, epoch)
            assert len(readers()) == 2
    assert readers() == [], readers()
stop.set()
print("started", sys.argv[2], "times", flush=True)
"""

CLOSE = """
before = set(threading.enumerate())
loader = ShuffledLoader(root, 3, 4, "all", seed=0, **KW)
loader.start()
assert len(readers()) == 2
loader.close()  # before any epoch
assert set(threading.enumerate()) == before
it = iter(loader)
next(it), next(it)  # mid-epoch: readers are filling slots
assert len(readers()) == 2
loader.close()
assert set(threading.enumerate()) == before
try:
    for _ in it:  # the batches left in the slot being cut, then an error
        pass
    raise AssertionError("an epoch went on after close()")
except RuntimeError as err:
    assert "abandoned iterator" in str(err), err
assert sorted(pairs(loader)) == ALL  # a later epoch starts new readers, every row once
it = iter(loader)
next(it)
del it  # abandoned: its fills in flight end before a new epoch reuses their slots
assert sorted(pairs(loader)) == ALL
it = iter(loader)
next(it)  # abandoned, and not even closed: close() still joins the readers
loader.close()
assert set(threading.enumerate()) == before
del it
print("closed", flush=True)
"""

RAISE = """
pipeline.Pipeline._help = lambda self, gen, ready: False  # every fill by a reader
real, calls = pipeline.Source.fill, []

def fill(self, units, dst_RD, perm_R=None):
    calls.append(threading.current_thread().name)
    if len(calls) == 3:  # mid-epoch, in a reader
        raise shards.ShardError("acts000001.bin is shorter than shards.json says; re-record it.")
    return real(self, units, dst_RD, perm_R)

pipeline.Source.fill = fill
before = set(threading.enumerate())
start = time.monotonic()
with ShuffledLoader(root, 3, 4, "all", seed=0, **KW) as loader:
    try:
        pairs(loader)
        raise AssertionError("no error")
    except shards.ShardError as err:
        assert calls[2].startswith("saev-reader"), calls
        print("error:", one_line(err), flush=True)
assert set(threading.enumerate()) == before
assert time.monotonic() - start < 30
"""


def _run(root, script: str, *args, timeout: float):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code, str(root), *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_loaders_started_many_times_beside_busy_threads_read_every_epoch(tmp_path):
    """40 loaders in a row, two epochs each, while other threads hold a lock and hammer the
    allocator: every epoch is exact, and no reader outlives its loader."""
    root, _ = make_shards(tmp_path)
    proc = _run(root, BUSY, 40, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "started 40 times" in proc.stdout


def test_close_joins_the_readers_before_mid_and_after_an_epoch(tmp_path):
    root, _ = make_shards(tmp_path)
    proc = _run(root, CLOSE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "closed" in proc.stdout


def test_a_reader_that_raises_is_one_error_in_the_main_thread(tmp_path):
    """The reader's own exception, raised where the batches are taken (so one line names the
    file), and the loader closes at once."""
    root, _ = make_shards(tmp_path)
    proc = _run(root, RAISE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = "error: acts000001.bin is shorter than shards.json says; re-record it\n"
    assert proc.stdout == line
