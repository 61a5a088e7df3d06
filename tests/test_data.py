"""ShardDataModule, DataConfig, normalization, the public saev's shard format, and bad input."""

import json
import pickle

import numpy as np
import pytest
import torch
from helpers.shards import cfg_for, collect, make_read_only, make_shards, write_public_saev

from saev import shards
from saev.data import datamodule, loaders, normalization
from saev.data.config import DataConfig
from saev.data.datamodule import ShardDataModule
from saev.data.loaders import OrderedLoader, ShuffledLoader
from saev.data.normalization import NormStats
from saev.shards import open_shard_set


def one_line(err):
    return "\n" not in str(err.value)


# ---------------------------------------------------------------------------- public saev format


def test_public_saev_shards_read_correctly(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("metadata must never be unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    root, acts_NLTD = write_public_saev(tmp_path / "public")
    shard_set = open_shard_set(root)
    md = shard_set.metadata
    assert (
        md.layers,
        md.n_tokens_per_example,
        md.n_patches_per_example,
        md.examples_per_shard,
    ) == ((6, 11), 4, 3, 4)
    assert [f.n_examples for f in shard_set.files] == [4, 4, 2, 0]
    with OrderedLoader(root, 11, 5, "all", n_workers=0, buffer_mb=0.001) as loader:
        np.testing.assert_array_equal(collect(loader)[1], acts_NLTD[:, 1].reshape(-1, 8))
    with ShuffledLoader(root, 6, 7, "patches", n_workers=2, buffer_mb=0.001) as loader:
        _, act, ex, tok = collect(loader)
    assert sorted(zip(ex.tolist(), tok.tolist())) == [(e, t) for e in range(10) for t in (1, 2, 3)]
    np.testing.assert_array_equal(act, acts_NLTD[ex, 0, tok])  # no NaN padding leaked in
    with ShuffledLoader(root, 6, 4, "cls", n_workers=0) as loader:
        assert sorted(collect(loader)[2].tolist()) == list(range(10))


def test_public_saev_bad_input(tmp_path):
    root, _ = write_public_saev(tmp_path / "a")
    md = json.loads((root / "metadata.json").read_text())
    (root / "metadata.json").write_text(json.dumps({**md, "protocol": "1.1"}))
    with pytest.raises(shards.ShardError, match="protocol '1.1'; only protocol '2.1'") as err:
        open_shard_set(root)
    assert one_line(err)
    root, _ = write_public_saev(tmp_path / "b")
    with open(root / "acts000001.bin", "r+b") as fd:
        fd.truncate(100)
    with pytest.raises(
        shards.ShardError, match=r"acts000001\.bin has 100 bytes but shards\.json says it holds 4"
    ):
        open_shard_set(root)
    root, _ = write_public_saev(tmp_path / "c")
    (root / "acts000002.bin").unlink()
    with pytest.raises(
        shards.ShardError, match=r"acts000002\.bin is listed in shards\.json but missing"
    ):
        open_shard_set(root)


# ---------------------------------------------------------------------------- bad input at setup


def _break(root, how):
    if how == "no metadata":
        (root / "metadata.json").unlink()
    elif how == "bad size":
        with open(root / "acts000001.bin", "ab") as fd:
            fd.write(b"\0" * 4)
    elif how == "missing bin":
        (root / "acts000002.bin").unlink()
    elif how == "version":
        md = json.loads((root / "metadata.json").read_text())
        (root / "metadata.json").write_text(json.dumps({**md, "version": 2}))


@pytest.mark.parametrize(
    "how,message",
    [
        ("no dir", r"shard directory .*nowhere does not exist"),
        ("no metadata", r"metadata\.json does not exist"),
        (
            "bad size",
            r"acts000001\.bin has 2244 bytes but shards\.json implies 2240 \(7 examples\)",
        ),
        ("missing bin", r"acts000002\.bin is listed in shards\.json but missing"),
        ("version", r"unknown shard format 'saev-shards' version 2"),
        ("layer", r"layer 4 was not recorded; these shards hold layers \[3, -1\]"),
        ("tokens", r"tokens='cls' but these shards have no CLS token"),
    ],
)
def test_bad_input_fails_at_setup(tmp_path, how, message):
    root, _ = make_shards(tmp_path, cls_token=False)
    _break(root, how)
    kw = {
        "no dir": {"shard_root": str(tmp_path / "nowhere")},
        "layer": {"layer": 4},
        "tokens": {"tokens": "cls"},
    }.get(how, {})
    dm = ShardDataModule(cfg_for(root, **kw))
    with pytest.raises(shards.ShardError, match=message) as err:
        dm.setup("fit")
    assert one_line(err)


def test_config_validation():
    with pytest.raises(ValueError, match="data.tokens='patch' must be one of"):
        DataConfig(shard_root="x", layer=1, tokens="patch")
    with pytest.raises(ValueError, match="data.val_fraction=1.0"):
        DataConfig(shard_root="x", layer=1, val_fraction=1.0)
    with pytest.raises(ValueError, match=r"data.batch_size \(0\)"):
        DataConfig(shard_root="x", layer=1, batch_size=0)


# ---------------------------------------------------------------------------- DataModule


def test_split_is_disjoint_by_example(tmp_path):
    root, _ = make_shards(tmp_path, n_examples=30)
    dm = ShardDataModule(cfg_for(root, val_fraction=0.2))
    dm.setup("fit")
    assert (dm.d_model, dm.metadata.n_examples, len(dm.val_examples)) == (8, 30, 6)
    _, _, train_ex, train_tok = collect(dm.train_dataloader())
    _, _, val_ex, _ = collect(dm.val_dataloader())
    assert set(train_ex.tolist()).isdisjoint(val_ex.tolist())
    assert set(train_ex.tolist()) | set(val_ex.tolist()) == set(range(30))
    assert len(set(zip(train_ex.tolist(), train_tok.tolist()))) == len(train_ex) == 24 * 5
    assert np.all(np.diff(val_ex) >= 0)  # ordered
    # The split does not depend on data.seed (a sweep axis of the SAEs).
    other = ShardDataModule(cfg_for(root, val_fraction=0.2, seed=5))
    other.setup("fit")
    np.testing.assert_array_equal(other.val_examples, dm.val_examples)
    dm.teardown("fit")


def test_loaders_take_the_rank_when_built_not_at_setup(tmp_path, monkeypatch):
    """setup() runs before Lightning creates the process group; the loaders must ask later."""
    root, _ = make_shards(tmp_path, n_examples=30)
    dm = ShardDataModule(cfg_for(root, batch_size=16))
    dm.setup("fit")  # rank 0 of 1 here
    monkeypatch.setattr(datamodule, "_dist", lambda: (1, 2))  # as inside trainer.fit under DDP
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert (train.rank, train.world_size, train.batch_size) == (1, 2, 16)
    assert (val.rank, val.world_size, val.batch_size) == (1, 2, 8)
    dm.teardown("fit")


def test_resumed_datamodule_continues_the_epoch_sequence(tmp_path):
    root, _ = make_shards(tmp_path, n_examples=30)
    dm = ShardDataModule(cfg_for(root))
    dm.setup("fit")
    collect(dm.train_dataloader())
    second = collect(dm.train_dataloader())[2]
    assert dm.state_dict() == {"train_epoch": 2}
    resumed = ShardDataModule(cfg_for(root))
    resumed.load_state_dict({"train_epoch": 1})  # as Lightning does from a checkpoint
    resumed.setup("fit")
    np.testing.assert_array_equal(collect(resumed.train_dataloader())[2], second)
    dm.teardown("fit")
    resumed.teardown("fit")


def _all_train_acts(dm):
    loader = OrderedLoader(
        dm.shard_set, dm.cfg.layer, 1000, dm.cfg.tokens, examples=dm.train_examples, n_workers=0
    )
    return torch.cat([b["act"] for b in loader])


def test_normalization_flags_change_what_the_model_sees(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEV_CACHE", str(tmp_path / "cache"))
    root, _ = make_shards(tmp_path, n_examples=40, d_model=16)
    # Shift and stretch the data so that centering and scaling both matter.
    for f in shards.open_shards(root).files:
        mm = np.memmap(f.path, dtype=np.float32, mode="r+")
        mm[:] = mm * 3.0 + 5.0
        mm.flush()
    stats, seen = {}, {}
    for flags in [(False, False), (True, False), (False, True), (True, True)]:
        dm = ShardDataModule(
            cfg_for(root, scale_mean=flags[0], scale_norm=flags[1], n_stats_examples=1000)
        )
        dm.setup("fit")
        stats[flags] = dm.norm_stats
        acts_ND = _all_train_acts(dm)
        seen[flags] = dm.norm_stats.apply(acts_ND)
        assert isinstance(dm.norm_stats, NormStats) and dm.norm_stats.mean_D.dtype == torch.float32
    assert torch.equal(seen[(False, False)], acts_ND) and stats[(False, False)].scale == 1.0
    assert not torch.any(stats[(False, True)].mean_D) and stats[(True, False)].scale == 1.0
    # The sample covers the whole train split here, so the targets hold to float precision.
    assert seen[(True, False)].mean(0).abs().max() < 1e-4
    for flags in [(False, True), (True, True)]:
        assert seen[flags].pow(2).sum(1).mean().item() == pytest.approx(16, rel=1e-4)
    assert seen[(True, True)].mean(0).abs().max() < 1e-4
    assert len({round(s.scale, 6) for s in stats.values()}) == 3  # 1.0 and two different scales


def test_norm_stats_are_cached_next_to_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEV_CACHE", str(tmp_path / "cache"))
    root, _ = make_shards(tmp_path)
    dm = ShardDataModule(cfg_for(root, scale_mean=True, scale_norm=True))
    dm.setup("fit")
    path = root / "norm-stats" / "layer-1-patches.json"
    assert json.loads(path.read_text())["key"]["tokens"] == "patches"

    def fail(*args, **kwargs):
        raise AssertionError("statistics should come from the cache")

    monkeypatch.setattr(normalization, "estimate_moments", fail)
    again = ShardDataModule(cfg_for(root, scale_mean=True, scale_norm=True, seed=3))
    again.setup("fit")
    assert (
        torch.equal(again.norm_stats.mean_D, dm.norm_stats.mean_D)
        and again.norm_stats.scale == dm.norm_stats.scale
    )
    with pytest.raises(
        AssertionError, match="from the cache"
    ):  # another token selection is another key
        ShardDataModule(cfg_for(root, scale_mean=True, tokens="all")).setup("fit")


def test_norm_stats_fall_back_to_cache_dir_when_read_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SAEV_CACHE", str(tmp_path / "cache"))
    root, _ = make_shards(tmp_path)
    make_read_only(root, monkeypatch)
    dm = ShardDataModule(cfg_for(root, scale_norm=True))
    dm.setup("fit")
    assert not (root / "norm-stats").exists()
    cached = list((tmp_path / "cache" / "norm-stats").glob("*/layer-1-patches.json"))
    assert len(cached) == 1 and "not writable" in caplog.text
    assert dm.norm_stats.scale != 1.0


def test_lightning_fit_runs_on_the_datamodule(tmp_path):
    import lightning as L

    root, _ = make_shards(tmp_path, n_examples=30)

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.train_examples, self.val_examples = set(), set()

        def training_step(self, batch, i):
            self.train_examples |= set(batch["example_idx"].tolist())
            return (self.lin(batch["act"]) - batch["act"]).pow(2).mean()

        def validation_step(self, batch, i):
            self.val_examples |= set(batch["example_idx"].tolist())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm, probe = ShardDataModule(cfg_for(root)), Probe()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    assert trainer.global_step == 2 * len(dm.train_dataloader())
    assert probe.train_examples == set(dm.train_examples.tolist())
    assert probe.val_examples == set(dm.val_examples.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_rows", [0, 1, 41, 43, 200])
def test_single_thread_copy_matches_torch_copy(dtype, n_rows):
    src = torch.randn(n_rows, 768).to(dtype)
    dst = torch.full((n_rows, 768), float("nan"))
    loaders._copy_1thread(dst, src)
    assert torch.equal(dst, src.float())


def test_readers_start_before_training_and_learn_their_rank_later(tmp_path, monkeypatch):
    """The reader threads start in start_readers, so that the first step does not wait for them;
    the rank comes later."""
    root, _ = make_shards(tmp_path, n_examples=30)
    dm = ShardDataModule(cfg_for(root, batch_size=16, n_workers=1))
    dm.setup("fit")
    dm.start_readers()
    train, val = dm._train_loader, dm._val_loader
    assert train._pipeline._threads and all(t.is_alive() for t in train._pipeline._threads)
    assert val._pipeline._threads
    monkeypatch.setattr(datamodule, "_dist", lambda: (1, 2))  # inside trainer.fit under DDP
    assert dm.train_dataloader() is train and (train.rank, train.world_size) == (1, 2)
    assert dm.val_dataloader() is val and (val.rank, val.batch_size) == (1, 8)
    dm.teardown("fit")
