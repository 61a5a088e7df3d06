"""Same-kind, same-shape SAEs of a job run as batched products (saev.nn.batched) and still end where
each would end alone: the step's values and every gradient, whole `python train.py` runs against
each SAE trained on its own, resume, torch.compile and DDP."""

import copy
import dataclasses
import json

import pytest
import safetensors.torch
import torch
from helpers.train import DDP, common, configs, run_api, train_cli, weights

from saev.nn import SAEConfig, batched
from saev.train import job as training
from saev.train.module import Member, SAEModule

D, S, B = 16, 64, 96


def kind_settings(kind: str, n: int) -> dict:
    """SAE n of a group of `kind`: its own k, coefficients, bandwidth, momentum."""
    aux = dict(aux_k=8 + n, aux_coeff=1 / 32 * (n + 1), dead_after_tokens=1000)
    return {
        "relu": dict(
            activation="relu", sparsity_coeff=1e-2 * (n + 1), sparsity_warmup_steps=10,
            l1_decoder_norm=n == 1, normalize_decoder=n != 1,
        ),
        "topk": dict(activation="topk", k=3 + n, **aux),
        "batchtopk": dict(activation="batchtopk", k=3 + n, threshold_momentum=0.1 * (n + 1), **aux),
        "jumprelu": dict(
            activation="jumprelu", sparsity_coeff=1e-3 * (n + 1), sparsity_warmup_steps=10,
            bandwidth=0.05 * (n + 1), init_threshold=0.05,
        ),
        "matryoshka-batchtopk": dict(
            activation="batchtopk", k=3 + n, threshold_momentum=0.1, matryoshka=[0.25, 0.5], **aux
        ),
        "matryoshka-relu": dict(
            activation="relu", sparsity_coeff=1e-2, sparsity_warmup_steps=0,
            l1_decoder_norm=False, matryoshka=[0.125],
        ),
    }[kind]  # fmt: skip


def module(kind: str, n_saes: int, batched_: bool, dtype) -> SAEModule:
    members = [
        Member(f"{n}", SAEConfig(d_sae=S, **kind_settings(kind, n)).resolve(D), 1e-3, 0, 1.0, n)
        for n in range(n_saes)
    ]
    m = SAEModule(members, torch.full((D,), 0.5), 0.8, batched=batched_).to(dtype).train()
    gen = torch.Generator().manual_seed(1)
    for sae in m.saes:
        sae.b_enc.data.normal_(0, 0.1, generator=gen)  # some pre-activations near thresholds
        sae.b_dec.data.normal_(0, 0.1, generator=gen)
        sae.tokens_since_fired[: S // 3] = 10**6  # a third of the latents are dead: AuxK runs
    return m


def count_calls(monkeypatch, cls) -> list:
    calls = []
    real = cls.apply

    def apply(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(cls, "apply", apply)
    return calls


KINDS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka-batchtopk", "matryoshka-relu"]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_forward_and_gradients_equal_separate_saes(kind, monkeypatch):
    # float64, except JumpReLU whose pre-activations are float32 by design (SAE.pre_acts).
    dtype = torch.float32 if kind == "jumprelu" else torch.float64
    together = module(kind, 3, True, dtype)
    alone = module(kind, 3, False, dtype)
    alone.load_state_dict(copy.deepcopy(together.state_dict()))
    assert together.groups == [[0, 1, 2]] and alone.groups == [[0], [1], [2]]
    gen = torch.Generator().manual_seed(2)
    x_BD = (torch.randn(B, D, generator=gen) + 1.0).to(dtype)
    scales_N = torch.tensor([0.3, 1.0, 0.6], dtype=dtype)
    fn = batched._SparseEncodeN if "topk" in kind else batched._CenteredBmm
    calls = count_calls(monkeypatch, fn)
    outs = together.forward_all(x_BD, scales_N, (True, True, False))
    assert len(calls) == 1  # one batched encoder for the whole group
    refs = alone.forward_all(x_BD, scales_N, (True, True, False))
    assert len(calls) == 1  # the separate SAEs took their own path
    for o, r in zip(outs, refs):
        for field in ("x_hat", "loss", "mse", "sparsity", "aux", "f_x"):
            torch.testing.assert_close(getattr(o, field), getattr(r, field), msg=field)
    if kind in ("topk", "batchtopk"):
        assert outs[0].aux > 0 and outs[1].aux > 0 and outs[2].aux == 0  # dead_N says no
    torch.stack([o.loss for o in outs]).sum().backward()
    torch.stack([r.loss for r in refs]).sum().backward()
    n_grads = 0
    for (name, p), q in zip(together.named_parameters(), alone.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, msg=name)
        n_grads += bool(p.grad.abs().sum() > 0)
    assert n_grads == sum(1 for _ in together.parameters())  # every gradient is nonzero
    for (name, a), b in zip(together.named_buffers(), alone.buffers()):
        torch.testing.assert_close(a, b, equal_nan=True, msg=name)  # AuxK state, thresholds


def test_groups_follow_kind_and_shape():
    def cfg(kind, d_sae=S, **kw):
        return SAEConfig(d_sae=d_sae, **{**kind_settings(kind, 0), **kw}).resolve(D)

    cfgs = [
        cfg("relu"), cfg("topk"), cfg("relu", sparsity_coeff=0.5), cfg("relu", d_sae=32),
        cfg("topk", k=7), cfg("matryoshka-batchtopk"), cfg("batchtopk"), cfg("jumprelu"),
    ]  # fmt: skip
    assert batched.groups(cfgs) == [[0, 2], [1, 4], [3], [5], [6], [7]]
    mixed = [module(k, 1, True, torch.float32).saes[0] for k in ("relu", "topk")]
    with pytest.raises(ValueError, match="one kind and shape"):
        batched.forward_group(mixed, torch.zeros(2, D), [1.0, 1.0], [False, False])


@pytest.mark.parametrize("kind", ["relu", "topk"])
def test_empty_batch_runs_as_separate_saes_do(kind):
    """A DDP rank can get no rows of a global batch; the batched step must still run."""
    together, alone = module(kind, 2, True, torch.float32), module(kind, 2, False, torch.float32)
    alone.load_state_dict(together.state_dict())
    x_BD = torch.zeros(0, D)
    scales_N = torch.ones(2)
    outs = together.forward_all(x_BD, scales_N, (True, True))
    refs = alone.forward_all(x_BD, scales_N, (True, True))
    for o, r in zip(outs, refs):
        assert o.x_hat.shape == r.x_hat.shape == (0, D)
        torch.testing.assert_close(o.loss, r.loss, equal_nan=True)


# -- whole training runs -------------------------------------------------------------------------
# Two groups of three (ReLU, TopK) that differ in lr, seed, sparsity and grad_clip, with AuxK
# active (dead after 10 steps), and a singleton of another width.
RELU = ["sae=relu", "sae.exp_factor=2", "sae.sparsity_warmup_steps=10"]
TOPK = ["sae=topk", "sae.exp_factor=2", "sae.aux_k=8", "sae.dead_after_tokens=1280"]
MEMBERS = {
    "relu-a": RELU + ["lr=0.003", "seed=0", "sae.sparsity_coeff=0.3", "grad_clip=1.0"],
    "relu-b": RELU + ["lr=0.001", "seed=1", "sae.sparsity_coeff=1.0", "grad_clip=0.01"],
    "relu-c": RELU + ["lr=0.01", "seed=2", "sae.sparsity_coeff=0.1", "grad_clip=0"],
    "topk-a": TOPK + ["lr=0.003", "seed=0", "sae.k=3", "grad_clip=1.0"],
    "topk-b": TOPK + ["lr=0.001", "seed=1", "sae.k=5", "grad_clip=0.01"],
    "topk-c": TOPK + ["lr=0.01", "seed=2", "sae.k=2", "grad_clip=0", "lr_warmup_steps=0"],
    "wide": ["sae=topk", "sae.exp_factor=4", "sae.k=3"],
}


def members_override(members: dict) -> str:
    quoted = (
        "[" + ",".join(f"'{o}'" for o in [f"name={n}", *ov]) + "]" for n, ov in members.items()
    )
    return "members=[" + ",".join(quoted) + "]"


def assert_same_weights(a: dict, b: dict, name: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.slow
def test_train_py_groups_end_where_each_sae_ends_alone(shard_root, tmp_path):
    base = common(shard_root, tmp_path / "joint") + ["wandb.enabled=false", "run_id=joint"]
    base += ["batched=true"]  # the default batches on a GPU only
    joint = train_cli(base + [members_override(MEMBERS)])
    job = json.loads((joint / "job.json").read_text())
    assert [c["name"] for c in job] == list(MEMBERS)
    for name, overrides in MEMBERS.items():
        cfg = configs(common(shard_root, tmp_path / "alone") + overrides + ["wandb.enabled=false"])
        alone = training.train([dataclasses.replace(cfg, name=name, run_id=name)])
        assert_same_weights(weights(joint / name), weights(alone / name), name)
        got, want = (json.loads((d / name / "metrics.json").read_text()) for d in (joint, alone))
        assert got["val"]["nmse"] == pytest.approx(want["val"]["nmse"], rel=1e-4)
        assert got["train"]["lr"] == pytest.approx(want["train"]["lr"])
    # The per-SAE settings did matter: the group's members ended apart.
    a, b = weights(joint / "topk-a"), weights(joint / "topk-b")
    assert not torch.allclose(a["W_dec"], b["W_dec"])


def group_configs(shard_root, tmp_path, extra=()) -> list:
    cfg = configs(
        common(shard_root, tmp_path) + TOPK + ["wandb.enabled=false", "batched=true", *extra]
    )
    return [
        dataclasses.replace(cfg, name="a"),
        dataclasses.replace(cfg, name="b", lr=1e-3, seed=1, sae=dataclasses.replace(cfg.sae, k=5)),
    ]


def test_batched_group_resumes_exactly(shard_root, tmp_path):
    def run(run_id: str, *extra):
        cfgs = group_configs(shard_root, tmp_path, ["ckpt_every=5", f"run_id={run_id}", *extra])
        return training.train(cfgs)

    full = run("full")
    run("cut", "n_train=3200")  # stops at step 25 of 60
    state = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    keys = {"saes.0.W_enc", "saes.1.W_dec", "saes.1.tokens_since_fired"}
    assert keys <= state["state_dict"].keys()  # the checkpoint format is unchanged
    resumed = run("cut", "ckpt_path=last")
    for name in ("a", "b"):
        a, b = weights(full / name), weights(resumed / name)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.slow
def test_compiled_batched_step_matches_eager(shard_root, tmp_path):
    # AuxK off (nothing dead within 10M tokens): a changing number of dead latents recompiles
    # the step each time, with or without groups.
    short = ["n_train=640", "sae.dead_after_tokens=10000000"]
    cfgs = {
        run_id: group_configs(shard_root, tmp_path, [f"run_id={run_id}", *short, *extra])
        for run_id, extra in (("eager", []), ("compiled", ["compile=true"]))
    }
    relu = configs(common(shard_root, tmp_path) + RELU).sae
    for group in cfgs.values():  # and a ReLU group of two
        group += [dataclasses.replace(c, name=f"relu-{c.name}", sae=relu) for c in group]
    runs = {k: training.train(v) for k, v in cfgs.items()}
    for name in ("a", "b", "relu-a", "relu-b"):
        eager, compiled = weights(runs["eager"] / name), weights(runs["compiled"] / name)
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_ddp_with_a_batched_group_ends_where_one_process_ends(shard_root, tmp_path):
    members = {k: MEMBERS[k] for k in ("topk-a", "topk-b", "relu-a", "relu-b")}
    args = ["wandb.enabled=false", "batched=true", members_override(members)]
    one = train_cli(common(shard_root, tmp_path / "one") + args)
    ddp = train_cli(common(shard_root, tmp_path / "ddp") + args + DDP)
    for name in members:
        a, b = weights(one / name), weights(ddp / name)
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            diff = (a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-12)
            assert float(diff) < 1e-5, (name, key)


def test_run_api_names_and_safetensors_are_unchanged(shard_root, tmp_path):
    """A group writes each SAE's own sae.safetensors, loadable on its own."""
    run = run_api(
        common(shard_root, tmp_path)
        + ["sae=relu", "sae.exp_factor=2", "n_train=640", "batched=true"],
        names=["x", "y"],
    )
    for name in ("x", "y"):
        state = safetensors.torch.load_file(run / name / "sae.safetensors")
        assert state["W_enc"].shape == (16, 32) and state["W_dec"].shape == (32, 16)


@pytest.mark.parametrize("setting,expected", [(None, torch.cuda.is_available()), ("true", True)])
def test_groups_batch_on_a_gpu_unless_asked(shard_root, tmp_path, monkeypatch, setting, expected):
    """batched=null (the default) batches on a GPU only, where per-SAE products cost launches; on
    the CPU a group was slower than its SAEs one by one. batched=true forces it."""
    calls = []
    real = batched._sparse_group
    monkeypatch.setattr(batched, "_sparse_group", lambda *a: (calls.append(1), real(*a))[1])
    extra = [] if setting is None else [f"batched={setting}"]
    run_api(
        common(shard_root, tmp_path) + ["sae=topk", "sae.exp_factor=2", "n_train=640", *extra],
        names=["x", "y"],
    )
    assert bool(calls) == expected
