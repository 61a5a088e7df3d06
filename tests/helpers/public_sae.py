"""Checkpoint files in the public saev's layout, built as each version of its `dump` built them
(a JSON header line, then `torch.save` of the state dict into the same file), and a reference of
what its SAE computed, written from the facts in saev/nn/public.py's docstring."""

import json

import torch

GEN = torch.Generator().manual_seed(0)


def weights(d_model: int, d_sae: int, threshold: float | None = None) -> dict:
    state = {
        "W_enc": torch.randn(d_model, d_sae, generator=GEN) / d_model**0.5,
        "b_enc": torch.randn(d_sae, generator=GEN) * 0.1,
        "W_dec": torch.randn(d_sae, d_model, generator=GEN),
        "b_dec": torch.randn(d_model, generator=GEN),
    }
    state["W_dec"] /= state["W_dec"].norm(dim=-1, keepdim=True)
    if threshold is not None:
        state["activation.threshold"] = torch.tensor(threshold)
    return state


def header(version: str, kind: str, d_model: int, exp_factor: int, k: int = 4) -> dict:
    """The header `version` wrote for an SAE of `kind` (Relu, TopK, BatchTopK)."""
    old = {  # the d_vit era's config fields
        "d_vit": d_model,
        "exp_factor": exp_factor,
        "n_reinit_samples": 524288,
        "remove_parallel_grads": True,
        "normalize_w_dec": True,
        "seed": 0,
    }
    new = {
        "d_model": d_model,
        "d_sae": d_model * exp_factor,
        "reinit_blend": 0.8,
        "reinit_enc_dec_tranpose": True,
        "remove_parallel_grads": True,
        "normalize_w_dec": True,
    }
    tag = {"commit": "abc1234", "lib": "0.1.0"}
    params = {} if kind == "Relu" else {"top_k": k}
    if version == "v0":
        assert kind == "Relu"
        return {**old, "sparsity_coeff": 4e-4, "ghost_grads": False}
    if version == "1a":
        return {"schema": 1, "cfg": {**old, **params}, "cls": kind, **tag}
    if version == "1b":
        act = {"cls": kind, "params": params}
        return {
            "schema": 1,
            "cfg": {**old, "activation": act},
            "cls": "SparseAutoencoderConfig",
            **tag,
        }
    if version == "2":
        return {"schema": 2, "cfg": {**old, "activation": {"cls": kind, "params": params}}, **tag}
    if version in ("3", "4"):
        if kind == "BatchTopK":
            params = {**params, "momentum": 0.1}
        act = {"cls": kind, "params": params}
        return {"schema": int(version), "cfg": {**new, "activation": act}, **tag}
    assert version == "5"
    sparsity = (
        {"cls": "L1Sparsity", "params": {"key": "l1-sparsity", "coeff": 4e-4}}
        if kind == "Relu"
        else {"cls": "NoSparsity", "params": {"key": "no-sparsity"}}
    )
    key = {"Relu": "relu", "TopK": "top-k", "BatchTopK": "batch-top-k"}[kind]
    aux = {"cls": "AuxK", "params": {"key": "auxk", "k_aux": 512, "alpha": 1 / 32}}
    params = {"key": key, **params, "sparsity": sparsity, "aux": aux}
    if kind == "BatchTopK":
        params["momentum"] = 0.1
    return {"schema": 5, "cfg": {**new, "activation": {"cls": kind, "params": params}}, **tag}


def dump(path, head: dict, state) -> None:
    """As the public dump: the header line (json.dumps, orjson's compact form from schema 3),
    then torch.save into the same open file."""
    compact = head.get("schema", 0) >= 3
    text = json.dumps(head, separators=(",", ":") if compact else None)
    with open(path, "wb") as fd:
        fd.write((text + "\n").encode())
        torch.save(state, fd)


def reference(state: dict, kind: str, k: int, centered: bool, x_BD, batch_topk_per_example: bool):
    """What the public SAE's encode and decode gave for x (its eval mode)."""
    h_BS = (x_BD - state["b_dec"] if centered else x_BD) @ state["W_enc"] + state["b_enc"]
    if kind == "Relu":
        f_BS = h_BS.relu()
    elif kind == "TopK" or (kind == "BatchTopK" and batch_topk_per_example):
        idx = h_BS.topk(k, dim=-1).indices
        f_BS = torch.zeros_like(h_BS).scatter(-1, idx, 1.0) * h_BS
    else:  # BatchTopK with an inference threshold
        thr = float(state["activation.threshold"])
        f_BS = torch.where(h_BS > max(thr, 0.0), h_BS, torch.zeros_like(h_BS))
    return f_BS, f_BS @ state["W_dec"] + state["b_dec"]
