"""ShuffledLoader / OrderedLoader: exactly-once epochs, file contents, dtypes, shuffling, NaN."""

import math
import os
import threading

import numpy as np
import pytest
import torch
from helpers.shards import collect, make_shards

from saev import shards
from saev.data import loaders, pipeline
from saev.data.loaders import OrderedLoader, ShuffledLoader
from saev.data.pipeline import Layout, NonFiniteError, Source, select


@pytest.fixture(autouse=True)
def many_cpus(monkeypatch):
    """Start the n_workers reader threads the tests ask for, however few CPUs this machine has."""
    monkeypatch.setattr(loaders, "_usable_cpus", lambda: 64)


def expected_tokens(tokens, cls_token, n_tokens):
    return {
        "cls": [0],
        "patches": list(range(int(cls_token), n_tokens)),
        "all": list(range(n_tokens)),
    }[tokens]


@pytest.mark.parametrize("tokens", ["patches", "cls", "all"])
@pytest.mark.parametrize(
    "batch_size,seed,n_workers", [(7, 0, 0), (64, 1, 2), (1000, 2, 1), (5, 3, 2)]
)
def test_shuffled_exactly_once(tmp_path, tokens, batch_size, seed, n_workers):
    root, stored = make_shards(tmp_path)
    # A small buffer forces many fills, so batches span slot boundaries.
    loader = ShuffledLoader(
        root, -1, batch_size, tokens, seed=seed, n_workers=n_workers, buffer_mb=0.002
    )
    batches, act, ex, tok = collect(loader)
    toks = expected_tokens(tokens, True, 6)
    assert len(batches) == len(loader)
    assert (
        all(len(b["act"]) == batch_size for b in batches[:-1])
        and 0 < len(batches[-1]["act"]) <= batch_size
    )
    assert all(
        b["act"].dtype == torch.float32 and b["example_idx"].dtype == torch.int64 for b in batches
    )
    pairs = sorted(zip(ex.tolist(), tok.tolist()))
    assert pairs == [(e, t) for e in range(23) for t in toks]
    np.testing.assert_array_equal(act, stored[ex, 1, tok])
    loader.close()


def test_seeds_and_epochs_change_the_order(tmp_path):
    root, _ = make_shards(tmp_path, n_examples=40)
    orders = {}
    for seed in (0, 1):
        with ShuffledLoader(root, 3, 16, seed=seed, n_workers=2, buffer_mb=0.004) as loader:
            first, second = collect(loader)[2], collect(loader)[2]
        assert sorted(first.tolist()) == sorted(second.tolist()) and not np.array_equal(
            first, second
        )
        orders[seed] = first
    assert not np.array_equal(orders[0], orders[1])
    # Same seed, epoch and buffer layout: same order, whichever worker finishes first.
    with ShuffledLoader(root, 3, 16, seed=0, n_workers=2, buffer_mb=0.004) as loader:
        np.testing.assert_array_equal(collect(loader)[2], orders[0])
    # The epoch is shuffled across the whole dataset, not just within a buffer's reach.
    assert orders[0][: len(orders[0]) // 4].max() > 20


@pytest.mark.parametrize("tokens", ["patches", "cls", "all"])
def test_ordered_equals_file_contents(tmp_path, tokens):
    root, _ = make_shards(tmp_path, cls_token=tokens == "cls" or tokens == "patches")
    shard_set = shards.open_shards(root)
    md = shard_set.metadata
    # Read the .bin files directly, bypassing every reader we wrote.
    raw = np.concatenate([np.fromfile(f.path, dtype=np.float32) for f in shard_set.files])
    raw_NLTD = raw.reshape(23, 2, md.n_tokens_per_example, 8)
    sel = select(md, 3, tokens)
    want = raw_NLTD[:, 0, sel.t0 : sel.t1].reshape(-1, 8)
    for n_workers in (0, 2):
        with OrderedLoader(root, 3, 9, tokens, n_workers=n_workers, buffer_mb=0.002) as loader:
            batches, act, ex, tok = collect(loader)
        assert len(batches) == len(loader)
        np.testing.assert_array_equal(act, want)
        np.testing.assert_array_equal(ex, np.repeat(np.arange(23), sel.n_tokens))
        np.testing.assert_array_equal(tok, np.tile(np.arange(sel.t0, sel.t1), 23))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_upcast(tmp_path, dtype):
    root, stored = make_shards(
        tmp_path, dtype=dtype, d_model=64, n_patches=300
    )  # runs > 64 KiB too
    for n_workers in (0, 2):
        with ShuffledLoader(root, 3, 500, "all", n_workers=n_workers, buffer_mb=1) as loader:
            _, act, ex, tok = collect(loader)
        np.testing.assert_array_equal(act, stored[ex, 0, tok])
        assert len(set(zip(ex.tolist(), tok.tolist()))) == 23 * 301
    # Up-casting is exact and the values really are narrowed (not float32 in disguise).
    assert not np.array_equal(stored, make_shards(tmp_path / "f32", d_model=64, n_patches=300)[1])


def expected_distinct_units(loader):
    """U * (1 - (1 - B/S)^r): units of r rows hit by a random B-row subset of an S-row slot."""
    B, S, r = loader.batch_size, loader.slot_rows, loader.layout.run
    return loader.units_per_fill * (1 - (1 - B / S) ** r)


def mixing(tmp_path, run_kb):
    """Mean distinct examples per batch for two buffer sizes; checks the formula on the way."""
    root, _ = make_shards(
        tmp_path, n_examples=400, layers=(0,), cls_token=False, n_patches=16, d_model=32
    )
    means = []
    for buffer_mb in (0.125, 0.5):  # 4 slots of 256 or 1024 rows of 128 bytes
        with ShuffledLoader(
            root, 0, 128, n_workers=2, buffer_mb=buffer_mb, run_kb=run_kb
        ) as loader:
            assert loader.layout.run == (16 if run_kb == 128 else 4)
            batches, _, ex, tok = collect(loader)
            expected = expected_distinct_units(loader)
        assert len(set(zip(ex.tolist(), tok.tolist()))) == len(ex) == 400 * 16
        distinct = [len(np.unique(b["example_idx"])) for b in batches[:-1]]
        # Within 10% of the formula (boundary batches draw from two slots, so a bit above).
        assert 0.9 * expected <= np.mean(distinct) <= 1.25 * expected
        means.append(np.mean(distinct))
    return means


def test_shuffle_quality_matches_the_documented_formula(tmp_path):
    whole = mixing(tmp_path / "a", 128)  # whole 16-token examples
    runs = mixing(tmp_path / "b", 0.5)  # runs of 4 tokens
    assert whole[1] > 2 * whole[0] and runs[1] > runs[0]  # a bigger buffer mixes more
    assert runs[0] > 2.5 * whole[0]  # and so do shorter runs


@pytest.mark.parametrize("g0,batch_size", [(0, 7), (5, 7), (3, 1), (2, 1000)])
def test_batch_grouped_keeps_each_row_s_batch_and_puts_a_batch_in_fill_order(g0, batch_size):
    perm_R = np.random.default_rng(g0).permutation(100)
    grouped_R = loaders.batch_grouped(perm_R, g0, batch_size)
    np.testing.assert_array_equal(np.sort(grouped_R), np.arange(100))  # still a permutation
    np.testing.assert_array_equal((grouped_R + g0) // batch_size, (perm_R + g0) // batch_size)
    rows_in_position_order = np.argsort(grouped_R)
    for b in np.unique((perm_R + g0) // batch_size):
        rows = rows_in_position_order[(np.sort(grouped_R) + g0) // batch_size == b]
        assert np.all(np.diff(rows) > 0)  # the batch's rows in the order the fill read them


def test_a_batch_is_its_fills_rows_in_file_order(tmp_path):
    """Workers scatter rows to few sequential streams (one per batch), not to random rows; a
    batch is still a random subset of its slot (test_shuffle_quality_...)."""
    root, _ = make_shards(tmp_path, n_examples=40)
    with ShuffledLoader(root, 3, 16, seed=0, n_workers=2, buffer_mb=0.004) as loader:
        batches = collect(loader)[0]
        n_slots_rows = loader.slot_rows
    assert n_slots_rows > 16  # a fill spans batches
    for b in batches:
        file_pos = (b["example_idx"] * 6 + b["token_idx"]).numpy()
        # One ascending run per fill the batch reaches: at most two for a batch below a slot.
        assert np.sum(np.diff(file_pos) < 0) <= 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_each_global_batch_of_the_one_process_run(tmp_path, world_size):
    """Under DDP the ranks' batch b together holds exactly the one-process batch b (so the
    averaged gradient is the one-process gradient), each rank reads a disjoint part of the
    files, and every rank takes the same number of steps."""
    root, _ = make_shards(tmp_path, n_examples=23)
    kw = dict(seed=4, n_workers=1, buffer_mb=0.002)
    with ShuffledLoader(root, 3, 8, **kw) as loader:
        whole = collect(loader)[0]
    per_rank = []
    for rank in range(world_size):
        with ShuffledLoader(root, 3, 8, **kw, rank=rank, world_size=world_size) as loader:
            batches = collect(loader)[0]
            assert len(batches) == len(loader) == len(whole)
            per_rank.append(batches)
    key = lambda b: sorted(zip(b["example_idx"].tolist(), b["token_idx"].tolist()))
    for i, want in enumerate(whole):
        parts = [batches[i] for batches in per_rank]
        assert sorted(sum((key(p) for p in parts), [])) == key(want), i
        rows = lambda bs: {
            (e, t): a.tolist()
            for b in bs
            for e, t, a in zip(b["example_idx"].tolist(), b["token_idx"].tolist(), b["act"])
        }
        assert rows(parts) == rows([want])
    tokens = [{pair for b in batches for pair in key(b)} for batches in per_rank]
    assert sum(len(t) for t in tokens) == len(set().union(*tokens)) == 23 * 5
    assert all(len(b["act"]) > 0 for batches in per_rank for b in batches[:-1])


@pytest.mark.parametrize("n_examples", [1, 3])
def test_ordered_ranks_take_equal_steps_when_parts_are_small_or_empty(tmp_path, n_examples):
    """A validation split of fewer examples than ranks, or of parts that need different numbers
    of batches: every rank yields as many batches (its last ones empty), and together they hold
    every token once. (Lightning stops on a rank whose loader has zero length.)"""
    root, stored = make_shards(tmp_path, n_examples=n_examples)
    per_rank = []
    for rank in range(2):
        with OrderedLoader(root, -1, 7, n_workers=1, rank=rank, world_size=2) as loader:
            batches = collect(loader)[0]
            assert len(batches) == len(loader) == math.ceil(math.ceil(n_examples / 2) * 5 / 7)
            per_rank.append(batches)
    sizes = [[len(b["act"]) for b in batches] for batches in per_rank]
    assert sum(map(sum, sizes)) == n_examples * 5 and 0 in sizes[1]
    for b in (b for batches in per_rank for b in batches):
        assert b["act"].shape[1:] == (8,) and b["act"].dtype == torch.float32
        np.testing.assert_array_equal(b["act"], stored[b["example_idx"], 1, b["token_idx"]])


def test_skip_nonfinite_keeps_ranks_in_step(tmp_path):
    """Dropped rows leave their batch smaller on the rank that read them; no rank gets a batch
    more or fewer (a DDP run would hang at the end)."""
    root, _ = make_shards(tmp_path)
    _poison(root, 0, 1, 3)
    _poison(root, 0, 2, 3)
    counts = []
    for rank in range(2):
        with ShuffledLoader(
            root, -1, 10, n_workers=1, buffer_mb=0.002, skip_nonfinite=True, rank=rank,
            world_size=2,
        ) as loader:  # fmt: skip
            counts.append((len(collect(loader)[0]), loader.n_nonfinite))
    assert counts[0][0] == counts[1][0] == math.ceil(23 * 5 / 10)
    assert counts[0][1] + counts[1][1] == 2


def _poison(root, file_i, example_in_file, token, value=np.nan):
    shard_set = shards.open_shards(root)
    mm = np.memmap(
        shard_set.files[file_i].path,
        dtype=np.float32,
        mode="r+",
        shape=shard_set.memmap(file_i).shape,
    )
    mm[example_in_file, 1, token, 3] = value
    mm.flush()


@pytest.mark.parametrize("n_workers", [0, 2])
def test_nonfinite_stops_naming_shard_and_example(tmp_path, n_workers):
    root, _ = make_shards(tmp_path)
    _poison(root, 2, 4, 2, np.inf)  # file acts000002.bin, global example 7 * 2 + 4 = 18
    with ShuffledLoader(root, -1, 16, n_workers=n_workers, buffer_mb=0.002) as loader:
        with pytest.raises(
            NonFiniteError, match=r"acts000002\.bin \(example 18, #4 in that file; token 2"
        ) as err:
            list(loader)
        assert "\n" not in str(err.value)
        # The loader is still usable afterwards (in-flight fills were drained).
        with pytest.raises(NonFiniteError):
            list(loader)


def test_skip_nonfinite_drops_and_counts(tmp_path):
    root, stored = make_shards(tmp_path)
    _poison(root, 0, 1, 3)
    _poison(root, 3, 0, 5)  # the last, short file
    with ShuffledLoader(root, -1, 10, n_workers=2, buffer_mb=0.002, skip_nonfinite=True) as loader:
        _, act, ex, tok = collect(loader)
        assert loader.n_nonfinite == 2
    pairs = set(zip(ex.tolist(), tok.tolist()))
    assert len(pairs) == len(ex) == 23 * 5 - 2 and (1, 3) not in pairs and (21, 5) not in pairs
    assert np.isfinite(act).all()
    np.testing.assert_array_equal(act, stored[ex, 1, tok])


def test_units_are_checked_once_and_poisoned_ones_every_epoch(tmp_path, monkeypatch):
    """The NaN/inf check reads every byte: once a fill found its units finite, later epochs do
    not check them again, but units with non-finite rows are checked, and dropped, each epoch."""
    root, stored = make_shards(tmp_path)
    _poison(root, 0, 1, 3)
    sums = []
    finite_sum = Source._finite_sum
    monkeypatch.setattr(
        Source, "_finite_sum", lambda self, x: sums.append(len(x)) or finite_sum(self, x)
    )
    # Fills of 3 examples (15 rows): one of them holds the poisoned unit.
    kw = dict(n_workers=0, buffer_mb=0.0005, skip_nonfinite=True)
    with ShuffledLoader(root, -1, 10, **kw) as loader:
        rows_checked = []
        for epoch in range(3):
            sums.clear()
            _, act, ex, tok = collect(loader)
            rows_checked.append(sum(sums))
            assert loader.n_nonfinite == epoch + 1
            assert len(ex) == 23 * 5 - 1 and (1, 3) not in set(zip(ex.tolist(), tok.tolist()))
            np.testing.assert_array_equal(act, stored[ex, 1, tok])
    assert rows_checked[0] >= 23 * 5  # every row, the first epoch
    assert 0 < rows_checked[1] <= 15 and 0 < rows_checked[2] <= 15  # the poisoned unit's fill


def test_abandoned_epoch_then_full_epoch(tmp_path):
    root, _ = make_shards(tmp_path, n_examples=60)
    with ShuffledLoader(root, 3, 4, n_workers=2, buffer_mb=0.002) as loader:
        it = iter(loader)
        next(it), next(it)
        del it  # closing the generator drains the fills still in flight
        _, _, ex, tok = collect(loader)
    assert len(set(zip(ex.tolist(), tok.tolist()))) == len(ex) == 60 * 5


def test_bad_selection_errors(tmp_path):
    root, _ = make_shards(tmp_path, cls_token=False)
    with pytest.raises(
        shards.ShardError, match=r"layer 5 was not recorded; these shards hold layers \[3, -1\]"
    ):
        ShuffledLoader(root, 5, 8)
    with pytest.raises(shards.ShardError, match="no CLS token"):
        OrderedLoader(root, 3, 8, "cls")
    with pytest.raises(ValueError, match="tokens='patch'"):
        OrderedLoader(root, 3, 8, "patch")
    with pytest.raises(
        ValueError,
        match=r"buffer_mb=1e-05 cannot hold one run per slot \(4 slots\); use buffer_mb >= 1",
    ):
        ShuffledLoader(root, 3, 8, buffer_mb=1e-5)


def test_shard_files_are_mapped_read_only(tmp_path):
    root, _ = make_shards(tmp_path)
    shard_set = shards.open_shards(root)
    source = Source(shard_set, Layout.make(select(shard_set.metadata, 3, "all"), 32, 128))
    dst = np.empty((3 * 6, 8), dtype=np.float32)
    source.fill(np.array([0, 8, 22]), dst)
    assert source._flat and all(not mm.flags.writeable for mm in source._flat.values())


@pytest.mark.parametrize("dtype,bits", [("float16", 0x7C00), ("bfloat16", 0xFFC0)])  # +inf, NaN
def test_nonfinite_half_precision(tmp_path, dtype, bits):
    root, stored = make_shards(tmp_path, dtype=dtype)
    shard_set = shards.open_shards(root)
    mm = np.memmap(
        shard_set.files[1].path, dtype=np.uint16, mode="r+", shape=shard_set.memmap(1).shape
    )
    mm[2, 1, 4, 0] = bits  # global example 9
    mm.flush()
    with ShuffledLoader(root, -1, 16, n_workers=1, buffer_mb=0.002) as loader:
        with pytest.raises(
            NonFiniteError, match=r"acts000001\.bin \(example 9, #2 in that file; token 4"
        ):
            list(loader)
    with ShuffledLoader(root, -1, 16, n_workers=1, buffer_mb=0.002, skip_nonfinite=True) as loader:
        _, act, ex, tok = collect(loader)
        assert loader.n_nonfinite == 1 and (9, 4) not in set(zip(ex.tolist(), tok.tolist()))
    np.testing.assert_array_equal(act, stored[ex, 1, tok])


@pytest.mark.gpu
def test_batches_are_pinned_and_copy_to_the_gpu_asynchronously(tmp_path):
    root, stored = make_shards(tmp_path)
    with ShuffledLoader(root, -1, 16, n_workers=1, buffer_mb=0.002) as loader:
        assert loader.pin_memory
        on_gpu = []
        for batch in loader:
            assert batch["act"].is_pinned()
            on_gpu.append({k: v.to("cuda", non_blocking=True) for k, v in batch.items()})
        torch.cuda.synchronize()
    ex, tok = (
        torch.cat([b[k] for b in on_gpu]).cpu().numpy() for k in ("example_idx", "token_idx")
    )
    np.testing.assert_array_equal(
        torch.cat([b["act"] for b in on_gpu]).cpu().numpy(), stored[ex, 1, tok]
    )


def test_reader_cap_keeps_the_order(tmp_path, monkeypatch):
    """Fewer readers than n_workers (few CPUs) read the same batches in the same order."""
    root, _ = make_shards(tmp_path)
    runs = []
    for cpus in (64, 2, 1):
        monkeypatch.setattr(loaders, "_usable_cpus", lambda cpus=cpus: cpus)
        with ShuffledLoader(root, 3, 16, seed=1, n_workers=3, buffer_mb=0.004) as loader:
            assert loader.n_readers == min(3, max(1, cpus - 1))
            runs.append(collect(loader)[1:])
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a, b)


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (Linux /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_the_buffer_is_private_memory_in_huge_pages(tmp_path):
    """Issue 22: shared memory (which reader processes needed) gets 4 KiB pages, slow to fault in;
    the readers' buffer is a private array, for which numpy asks huge pages where it can."""
    root, _ = make_shards(tmp_path, d_model=64)
    with ShuffledLoader(root, 3, 16, seed=0, n_workers=1, buffer_mb=8) as loader:
        loader.start()
        slots = loader._pipeline.slots
        assert slots.nbytes >= 4 * 2**20 and slots.flags.writeable and slots.base is None
        flags = _vm_flags(slots.__array_interface__["data"][0] + slots.nbytes // 2)
        assert "sh" not in flags  # not shared
        if np._core.multiarray._get_madvise_hugepage():
            assert "hg" in flags  # MADV_HUGEPAGE


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_batch_arrays_are_reused_small_page_arrays(tmp_path):
    """Batch arrays come from a pool of writable arrays in small pages (no huge pages asked
    for), reused once released."""
    root, stored = make_shards(tmp_path)
    with ShuffledLoader(root, 3, 16, seed=0, n_workers=0, buffer_mb=0.002) as loader:
        seen, n_batches = set(), 0
        for batch in loader:
            address = batch["act"].numpy().__array_interface__["data"][0]
            assert "nh" in _vm_flags(address)  # MADV_NOHUGEPAGE
            seen.add(address)
            n_batches += 1
        assert n_batches > 3 and 1 <= len(seen) <= 3  # one held while the next one is cut
    arr = loaders.small_page_array((5, 7), np.float32)
    assert arr.shape == (5, 7) and arr.dtype == np.float32 and arr.flags.writeable
    arr[:] = 1.5
    assert arr.sum() == 52.5


class _IdleReader:
    """Stands in for a reader thread that never takes a task."""

    def is_alive(self):
        return True

    def join(self, timeout=None):
        pass


def test_main_thread_fills_queued_slots_when_readers_lag(tmp_path, monkeypatch):
    """Readers that never take a task: the main thread fills every slot itself (Pipeline._help)."""

    def start(self):
        self._threads = self._threads or [_IdleReader()]

    monkeypatch.setattr(pipeline.Pipeline, "start", start)
    root, stored = make_shards(tmp_path)
    with ShuffledLoader(root, -1, 16, "all", seed=3, n_workers=2, buffer_mb=0.002) as loader:
        for _ in range(2):
            _, act, ex, tok = collect(loader)
            assert sorted(zip(ex.tolist(), tok.tolist())) == [
                (e, t) for e in range(23) for t in range(6)
            ]
            np.testing.assert_array_equal(act, stored[ex, 1, tok])
        assert loader._pipeline._outstanding == 0


@pytest.mark.parametrize("n_workers", [0, 2])
def test_iter_from_is_the_epoch_s_tail_without_reading_what_comes_before(
    tmp_path, monkeypatch, n_workers
):
    """Resuming mid-epoch: batches from k on equal an uninterrupted epoch's, and the fills that
    end before batch k are never read."""
    root, _ = make_shards(tmp_path, n_examples=60)
    kw = dict(n_workers=n_workers, buffer_mb=0.002, seed=4)
    with ShuffledLoader(root, 3, 7, **kw) as loader:
        loader.epoch = 1
        full = collect(loader)[0]
    assert len(full) == len(loader) > 10
    rows_read = []
    real_fill = Source.fill

    def counting_fill(self, units, dst_RD, perm_R=None):
        rows_read.append(int(self.layout.decode(units)[2].sum()))
        return real_fill(self, units, dst_RD, perm_R)

    monkeypatch.setattr(Source, "fill", counting_fill)  # seen in-process with n_workers=0
    for k in (0, 1, 9, len(full) - 1, len(full)):
        rows_read.clear()
        with ShuffledLoader(root, 3, 7, **kw) as loader:
            loader.epoch = 1
            tail = list(loader.iter_from(k))
            assert loader.epoch == 2
        assert len(tail) == len(full) - k
        for got, want in zip(tail, full[k:]):
            for key in want:
                assert torch.equal(got[key], want[key]), (k, key)
        if n_workers == 0:
            # Every row read is served, except those of the one fill the resume point falls in.
            served = sum(len(b["act"]) for b in tail)
            assert served <= sum(rows_read) < served + loader.slot_rows


@pytest.fixture
def ranges_path(monkeypatch):
    """Send every unit through the range copy of `Source.fill` (the read path's), which tiny test
    examples would otherwise skip for the small-run gather."""
    monkeypatch.setattr(pipeline, "SMALL_RUN_BYTES", 0)


def test_closed_loaders_leave_no_thread_and_no_open_shard(tmp_path, ranges_path):
    """A closed loader's readers are joined and its shard files closed, so that the jobs of an
    in-process multirun do not pile them up (more in tests/test_readers.py)."""
    root, stored = make_shards(tmp_path)
    before = set(threading.enumerate())
    for read in ("mmap", "pread"):
        with ShuffledLoader(root, 3, 16, seed=0, n_workers=2, buffer_mb=0.002, read=read) as loader:
            _, act, ex, tok = collect(loader)
            np.testing.assert_array_equal(act, stored[ex, 0, tok])  # layer 3 is stored first
            assert {t.name for t in set(threading.enumerate()) - before} == {
                "saev-reader-0",
                "saev-reader-1",
            }
            source = loader._pipeline.source
            assert source._maps if read == "mmap" else source._fds
            fds = list(source._fds.values())
        assert set(threading.enumerate()) == before
        assert not source._fds and not source._maps and not source._flat
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)


@pytest.mark.parametrize(
    "read,memory,resolved", [("mmap", None, "mmap"), ("pread", None, "pread"), ("auto", 1, "pread")]
)
@pytest.mark.parametrize("n_workers", [0, 2])
def test_read_paths_serve_the_files_exactly_once(
    tmp_path, ranges_path, monkeypatch, read, memory, resolved, n_workers
):
    """Each read path, chosen by name or by "auto" (here for a set larger than the memory)."""
    if memory is not None:
        monkeypatch.setattr(pipeline, "memory_bytes", lambda: memory)
    # A scratch buffer of 3 rows: pread ranges go through it in several pieces.
    monkeypatch.setattr(pipeline, "SCRATCH_BYTES", 3 * 8 * 4)
    root, stored = make_shards(tmp_path, n_examples=40)
    kw = dict(n_workers=n_workers, buffer_mb=0.004, read=read)
    with ShuffledLoader(root, 3, 16, "all", seed=5, **kw) as loader:
        assert loader.read == resolved
        epochs = []
        for _ in range(2):
            _, act, ex, tok = collect(loader)
            assert sorted(zip(ex.tolist(), tok.tolist())) == [
                (e, t) for e in range(40) for t in range(6)
            ]
            np.testing.assert_array_equal(act, stored[ex, 0, tok])
            epochs.append(act)
    with ShuffledLoader(root, 3, 16, "all", seed=5, **{**kw, "read": "mmap"}) as loader:
        np.testing.assert_array_equal(collect(loader)[1], epochs[0])  # the same order either way
    with OrderedLoader(root, -1, 9, "patches", **kw) as loader:  # pread straight into the slot
        _, act, ex, tok = collect(loader)
    np.testing.assert_array_equal(act, stored[:, 1, 1:].reshape(-1, 8))


def test_pread_maps_nothing_and_prefetches_every_range(tmp_path, ranges_path, monkeypatch):
    root, stored = make_shards(tmp_path, layers=(3,))
    shard_set = shards.open_shards(root)
    asked, read_rows = [], []
    real, real_pread = Source.prefetch, Source._pread
    monkeypatch.setattr(
        Source, "prefetch", lambda self, *a: (asked.append([x.tolist() for x in a]), real(self, *a))
    )
    monkeypatch.setattr(
        Source,
        "_pread",
        lambda self, i, r0, dst: (read_rows.append(len(dst)), real_pread(self, i, r0, dst)),
    )
    layout = Layout.make(select(shard_set.metadata, 3, "all"), 32, 128)
    source = Source(shard_set, layout, "pread")
    dst = np.empty((4 * 6, 8), dtype=np.float32)
    # Examples 0, 1 (adjacent in file 0: one range), 8 (file 1, #1) and 22 (file 3, #1).
    assert source.fill(np.array([0, 1, 8, 22]), dst)[0] == 0
    np.testing.assert_array_equal(dst.reshape(4, 6, 8), stored[[0, 1, 8, 22], 0])
    assert not source._flat  # no file was mapped
    assert sum(read_rows) == 4 * 6  # each row read once, straight into the slot
    # One request per contiguous range: files, first rows, numbers of rows.
    assert asked == [[[0, 1, 3], [0, 6, 6], [12, 6, 6]]]


def test_auto_read_maps_sets_that_fit_in_half_the_memory(tmp_path, monkeypatch):
    root, _ = make_shards(tmp_path)
    n_bytes = sum(f.path.stat().st_size for f in shards.open_shards(root).files)
    monkeypatch.setattr(pipeline, "memory_bytes", lambda: 2 * n_bytes)
    assert ShuffledLoader(root, 3, 16).read == "mmap"
    monkeypatch.setattr(pipeline, "memory_bytes", lambda: 2 * n_bytes - 2)
    assert ShuffledLoader(root, 3, 16).read == "pread"
    assert ShuffledLoader(root, 3, 16, read="mmap").read == "mmap"
    assert 0 < pipeline.memory_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with pytest.raises(
        ValueError, match=r"read='direct' is not one of \('auto', 'mmap', 'pread'\)"
    ):
        ShuffledLoader(root, 3, 16, read="direct")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_batches_can_keep_the_storage_dtype(tmp_path, dtype, skip_nonfinite):
    """upcast=False (a GPU up-casts): 16-bit batches holding exactly the stored bits, through the
    plain slices and (with a dropped NaN) the gathered rows."""
    root, stored = make_shards(tmp_path, dtype=dtype)
    if skip_nonfinite:
        f = shards.open_shards(root).files[1]
        mm = np.memmap(f.path, dtype=np.uint16, mode="r+", shape=(f.n_examples, 2, 6, 8))
        mm[2, 1, 4, 0] = 0xFFC0 if dtype == "bfloat16" else 0x7E00  # a NaN in example 9
        mm.flush()
        del mm
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    kw = dict(n_workers=1, buffer_mb=0.002, skip_nonfinite=skip_nonfinite)
    with ShuffledLoader(root, -1, 16, "all", seed=2, upcast=False, **kw) as loader:
        batches, act, ex, tok = collect(loader)
    assert all(b["act"].dtype == torch_dtype for b in batches)
    np.testing.assert_array_equal(act, stored[ex, 1, tok])
    assert len(ex) == 23 * 6 - skip_nonfinite
    with ShuffledLoader(root, -1, 16, "all", seed=2, **kw) as loader:  # the same batches
        np.testing.assert_array_equal(collect(loader)[1], act)


def test_workers_may_open_a_descriptor_per_shard():
    """Large recordings have more shards than the usual soft limit of 1024 open files."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
        pipeline.allow_open_files(1000)
        got = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == (1256 if hard == resource.RLIM_INFINITY else min(1256, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
