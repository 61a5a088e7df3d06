"""ViT wrappers and the hook mechanism, in process on tiny random timm models."""

import pytest
import timm
import torch

from saev.record import vit as vitlib
from saev.record.config import ModelConfig


@pytest.fixture(scope="module")
def tiny():
    return vitlib.load(ModelConfig(ckpt="img32-patch8-dim64-depth4-heads4-reg2", seed=7))


def test_tiny_facts_come_from_the_model(tiny):
    assert (tiny.d_model, tiny.grid, tiny.patch_size, tiny.img_size) == (
        64,
        (4, 4),
        (8, 8),
        (32, 32),
    )
    assert (tiny.n_patches, tiny.n_prefix_tokens, tiny.has_cls, len(tiny.blocks)) == (
        16,
        3,
        True,
        4,
    )
    assert tiny.transform.transforms[1].size == (32, 32)  # center crop to the model's input
    assert tiny.description == {
        "family": "tiny",
        "ckpt": "img32-patch8-dim64-depth4-heads4-reg2",
        "weights": "random(seed=7)",
    }
    again = vitlib.load(ModelConfig(ckpt="img32-patch8-dim64-depth4-heads4-reg2", seed=7))
    for a, b in zip(tiny.module.parameters(), again.module.parameters()):
        assert torch.equal(a, b)  # the seed decides the random weights


def test_layers_resolve_from_the_end_and_out_of_range_names_the_range(tiny):
    assert tiny.resolve_layers([1, -1, -4]) == [1, 3, 0]
    with pytest.raises(ValueError, match=r"layer -5 is out of range.*4 blocks.*-4\.\.3"):
        tiny.resolve_layers([-5])
    with pytest.raises(ValueError, match="same block twice"):
        tiny.resolve_layers([3, -1])


def test_recorder_captures_block_outputs_and_stops_after_the_last(tiny):
    x = torch.randn(3, 3, 32, 32)
    calls = []
    handle = tiny.blocks[3].register_forward_hook(lambda *a: calls.append(1))
    recorder = vitlib.Recorder(tiny, [2, 0], cls_token=True)
    acts = recorder(x)
    handle.remove()
    recorder.close()
    assert acts.shape == (3, 2, 17, 64) and calls == []  # block 3 never ran
    m = tiny.module
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        outs = []
        for block in m.blocks:
            h = block(h)
            outs.append(h)
    for j, block in enumerate([2, 0]):
        expected = torch.cat([outs[block][:, :1], outs[block][:, 3:]], dim=1)  # drop 2 registers
        torch.testing.assert_close(acts[:, j], expected)

    no_cls = vitlib.Recorder(tiny, [1], cls_token=False)
    assert no_cls(x).shape == (3, 1, 16, 64)
    no_cls.close()


def test_cls_token_on_a_model_without_one_is_an_error(tiny):
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        class_token=False,
        global_pool="avg",
    )
    cfg = ModelConfig(family="timm", ckpt="no-cls", pretrained=False)
    headless = vitlib._timm_trunk(model, tiny.transform, cfg)
    assert headless.n_prefix_tokens == 0 and not headless.has_cls
    with pytest.raises(ValueError, match="has no CLS token; set cls_token=false"):
        vitlib.Recorder(headless, [0], cls_token=True)


def test_load_weights_checks_every_key(tmp_path, tiny):
    path = tmp_path / "w.pt"
    state = {f"module.{k}": v for k, v in tiny.module.state_dict().items()}  # DDP-style names
    torch.save({"state_dict": state}, path)
    cfg = ModelConfig(ckpt="img32-patch8-dim64-depth4-heads4-reg2", weights=str(path), seed=99)
    loaded = vitlib.load(cfg)
    assert loaded.description["weights"] == str(path)
    for a, b in zip(tiny.module.parameters(), loaded.module.parameters()):
        assert torch.equal(a, b)

    del state["module.blocks.0.attn.qkv.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"does not fit.*blocks\.0\.attn\.qkv\.weight"):
        vitlib.load(cfg)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="neither safetensors nor a torch state dict"):
        vitlib.load(cfg)


def test_model_config_validation():
    with pytest.raises(ValueError, match="not one of clip, siglip"):
        ModelConfig(family="resnet")
    with pytest.raises(ValueError, match="not a tiny architecture"):
        ModelConfig(ckpt="vit_base_patch16_224")
    with pytest.raises(ValueError, match="tiny has no published weights"):
        ModelConfig(pretrained=True)
    with pytest.raises(ValueError, match="not a timm model"):
        vitlib.load(ModelConfig(family="timm", ckpt="not_a_model", pretrained=False))
