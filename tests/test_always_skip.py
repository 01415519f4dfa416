"""`skip.always_skip`: routed layers every token skips, with no router call, attention or K/V.

Such a layer must give exactly what the same layer gives when its gate is forced to 0 (the skip path, which
still writes K/V that nobody reads), on the masked path, the fast path, our generation loop and HF
`generate`, for every family; it must train only its adapter, survive a checkpoint round trip and count as
skipped in the routes and in the FLOPs."""

from __future__ import annotations

import pytest
import torch

from src.flexidepth import (
    FlexiDepthConfig,
    FlexiDepthConfigError,
    flexi_layers,
    forced_gates,
    inject,
    load_flexidepth,
    save_flexidepth,
)
from src.flexidepth.flops import layer_macs, model_macs_per_token
from src.flexidepth.generation import generate
from tests.conftest import tiny_config, tiny_model
from tests.test_generation import _forward, _mixed_model, _prompt, hf_greedy

ROUTED, STATIC = "3:6", [4]


pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(family):
    """(model with layer 4 always skipped, the same weights routing layer 4 with its gate forced to 0)."""
    static = _mixed_model(family, layers=6, routed=ROUTED, always_skip=STATIC)
    forced = inject(tiny_model(family, layers=6), FlexiDepthConfig(layers=ROUTED))
    forced.load_state_dict(static.state_dict())
    layers = {layer.layer_index: layer for layer in flexi_layers(forced)}

    def gate(z, i):
        if i in STATIC:
            return torch.zeros(z.shape[:2])
        return torch.sigmoid(layers[i].router(z, folded=True))

    return static, forced, gate


@pytest.mark.parametrize("batch", [1, 3])
def test_always_skip_equals_gate_forced_to_zero(family, batch):
    static, forced, gate = _pair(family)
    ids, mask = _prompt(batch, plen=12)
    valid = mask.bool()
    with forced_gates(forced, gate):
        ref = _forward(forced, ids, mask, False)
    for fast in (False, True):
        out = _forward(static, ids, mask, fast)
        torch.testing.assert_close(out.logits[valid], ref.logits[valid], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.routes.run[valid], ref.routes.run[valid])
    run = out.routes.run[valid]  # [N, 3]: layers 3, 4, 5
    assert not run[:, 1].any() and run[:, [0, 2]].any() and not run[:, [0, 2]].all()
    assert torch.equal(out.routes.gates[valid][:, 1], torch.zeros(int(valid.sum())))


def test_always_skip_generation_equals_forced_and_hf_generate(family):
    static, forced, gate = _pair(family)
    ids, mask = _prompt(3)
    ours = generate(static, None, ids, mask, max_new_tokens=6, return_logits=True)
    with forced_gates(forced, gate):
        ref = generate(forced, None, ids, mask, max_new_tokens=6, return_logits=True)
    assert torch.equal(ours.sequences, ref.sequences) and torch.equal(ours.run, ref.run)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert not ours.run[..., 1].any()
    assert torch.equal(ours.layers_used, 3 + ours.run.sum(-1))  # 3 unrouted layers + those run
    hf = hf_greedy(static, ids, mask, 6)
    assert torch.equal(hf, ours.sequences)


def test_always_skip_layer_writes_no_kv_and_trains_only_its_adapter():
    static = _mixed_model("llama", layers=6, routed=ROUTED, always_skip=STATIC)
    ids, mask = _prompt(2)
    out = generate(static, None, ids, mask, max_new_tokens=2)
    assert out.sequences.shape == (2, 9)
    layer = next(m for m in flexi_layers(static) if m.layer_index == 4)
    calls = []
    hooks = [
        mod.register_forward_hook(lambda *a, name=name: calls.append(name))
        for name, mod in (("router", layer.router), ("attn", layer.self_attn), ("mlp", layer.mlp))
    ]
    static.train()
    loss = static(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    for h in hooks:
        h.remove()
    assert calls == []  # neither the router, the attention nor the FFN ran
    assert not any(p.requires_grad for p in layer.router.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.adapter.parameters())
    other = next(m for m in flexi_layers(static) if m.layer_index == 5)
    assert all(p.requires_grad for p in other.router.parameters())


def test_always_skip_checkpoint_round_trip(tmp_path):
    static = _mixed_model("qwen3", layers=6, routed=ROUTED, always_skip=STATIC)
    save_flexidepth(static, tmp_path / "ckpt")
    loaded = tiny_model("qwen3", layers=6)
    load_flexidepth(loaded, tmp_path / "ckpt")
    assert loaded.flexidepth.config.always_skip == STATIC
    ids, mask = _prompt(2)
    a, b = _forward(static, ids, mask, True), _forward(loaded, ids, mask, True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.routes.run, b.routes.run)


@pytest.mark.parametrize(
    ("always_skip", "message"),
    [
        ([2], "not routed layers"),
        ([4, 4], "duplicates"),
        ("4", "list of layer indices"),
        ([True], "list of layer indices"),
    ],
)
def test_always_skip_bad_values_name_the_key(always_skip, message):
    with pytest.raises(
        FlexiDepthConfigError, match=rf"skip\.always_skip.*{message}|{message}.*skip\.always_skip"
    ):
        FlexiDepthConfig(layers=ROUTED, always_skip=always_skip).validate_for(6, 64, 128)


def test_always_skip_refuses_the_layer_the_cache_length_is_read_from():
    model = tiny_model("llama", layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FlexiDepthConfigError, match=r"skip\.always_skip cannot hold layer\(s\) \[0\]"):
        inject(model, FlexiDepthConfig(layers="0:4", always_skip=[0, 2]))
    assert not hasattr(model, "flexidepth")  # refused before any module was touched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    cfg = FlexiDepthConfig(layers="0:4", always_skip=[3])
    cfg.check_always_skip(["sliding_attention", "sliding_attention", "full_attention", "full_attention"], 4)
    with pytest.raises(FlexiDepthConfigError, match=r"\[3\].*3: full_attention"):
        cfg.check_always_skip(
            ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"], 4
        )


def test_always_skip_flops_count_the_adapter_only():
    config = tiny_config("llama", 6, "sdpa")
    cfg = FlexiDepthConfig(layers=ROUTED, always_skip=STATIC)
    lay = layer_macs(config, cfg)
    lm = config.vocab_size * config.hidden_size
    # 3 unrouted layers; of the routed, layer 4 (adapter only), one routed skip, one run
    expected = 3 * lay.full + lay.adapter + lay.skipped + lay.routed_run + lm
    assert model_macs_per_token(config, cfg, 2.0) == expected
    assert model_macs_per_token(config, cfg, 1.0 - 1e-9) == model_macs_per_token(config, cfg, 1.0)
    with pytest.raises(ValueError, match=r"skipped_layers must be in \[1, 3\]"):
        model_macs_per_token(config, cfg, 0.5)


def test_mindskip_refuses_always_skip():
    from src.methods.mindskip import inject_mindskip

    with pytest.raises(ValueError, match="skip.always_skip"):
        inject_mindskip(
            tiny_model("llama", layers=6), FlexiDepthConfig(layers=ROUTED, adapter="none", always_skip=STATIC)
        )
