"""`set_always_run`: routed layers that every token runs without a router call (an inference option).

Such a layer must give exactly what the same layer gives when its gate is forced to 1 (in every gate mode
that is the base layer), on the masked path, the fast path, our generation loop and HF `generate`, for every
family; its router must not be called; the routes record it as run with g = 1; the calibration that picks the
rarely skipped layers must agree with the routes; the FLOPs count it as a full layer."""

from __future__ import annotations

import pytest
import torch

from src.flexidepth import always_run_layers, flexi_layers, forced_gates, routed_forward, set_always_run
from src.flexidepth.calibrate import layer_skip_rates, rarely_skipped_layers
from src.flexidepth.flops import layer_macs, model_macs_per_token
from src.flexidepth.generation import generate
from tests.conftest import tiny_config
from tests.test_generation import _forward, _mixed_model, _prompt, hf_greedy

ROUTED, ALWAYS_RUN = "3:6", [3, 5]

pytestmark = pytest.mark.usefixtures("one_thread")


def _gate_forced_to_one(model):
    """callable(z, i) -> g: 1 on the ALWAYS_RUN layers, the layer's own router elsewhere."""
    layers = {layer.layer_index: layer for layer in flexi_layers(model)}

    def gate(z, i):
        if i in ALWAYS_RUN:
            return torch.ones(z.shape[:2])
        return torch.sigmoid(layers[i].router(z, folded=True))

    return gate


@pytest.mark.parametrize("gate_mode", ["released", "difference"])
@pytest.mark.parametrize("batch", [1, 3])
def test_always_run_equals_gate_forced_to_one(family, batch, gate_mode):
    model = _mixed_model(family, layers=6, routed=ROUTED, gate_mode=gate_mode)
    with torch.no_grad():  # routed, layers 3 and 5 would skip every token: always_run must override that
        for layer in flexi_layers(model):
            if layer.layer_index in ALWAYS_RUN:
                layer.router.bias.fill_(-30.0)
    ids, mask = _prompt(batch, plen=12)
    valid = mask.bool()
    with forced_gates(model, _gate_forced_to_one(model)):
        ref = _forward(model, ids, mask, False)
    plain = _forward(model, ids, mask, True)
    set_always_run(model, ALWAYS_RUN)
    assert always_run_layers(model) == ALWAYS_RUN
    calls = []
    layers = {layer.layer_index: layer for layer in flexi_layers(model)}
    hooks = [layers[i].router.register_forward_hook(lambda *a, i=i: calls.append(i)) for i in (3, 4, 5)]
    try:
        for fast in (False, True):
            out = _forward(model, ids, mask, fast)
            torch.testing.assert_close(out.logits[valid], ref.logits[valid], rtol=1e-5, atol=1e-5)
            assert torch.equal(out.routes.run[valid], ref.routes.run[valid])
    finally:
        for h in hooks:
            h.remove()
    assert set(calls) == {4}  # only the layer that still routes called its router
    run, gates = out.routes.run[valid], out.routes.gates[valid]  # [N, 3]: layers 3, 4, 5
    assert run[:, [0, 2]].all() and torch.equal(gates[:, [0, 2]], torch.ones(int(valid.sum()), 2))
    assert not plain.routes.run[valid][:, [0, 2]].any()  # routed, they skip: the checks above can fail
    set_always_run(model, [])
    again = _forward(model, ids, mask, True)
    assert always_run_layers(model) == [] and torch.equal(again.routes.run, plain.routes.run)


def test_always_run_generation_equals_forced_and_hf_generate(family):
    model = _mixed_model(family, layers=6, routed=ROUTED, gate_mode="difference")
    ids, mask = _prompt(3)
    with forced_gates(model, _gate_forced_to_one(model)):
        ref = generate(model, None, ids, mask, max_new_tokens=6, return_logits=True)
    set_always_run(model, ALWAYS_RUN)
    ours = generate(model, None, ids, mask, max_new_tokens=6, return_logits=True)
    assert torch.equal(ours.sequences, ref.sequences) and torch.equal(ours.run, ref.run)
    torch.testing.assert_close(ours.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert ours.run[..., [0, 2]].all()
    hf = hf_greedy(model, ids, mask, 6)
    assert torch.equal(hf, ours.sequences)


@pytest.mark.parametrize(
    ("layers", "message"),
    [([2], r"always_run has \[2\], which are not routed"), ([4, True], "list of layer indices"), ([4], None)],
)
def test_set_always_run_refuses_bad_layers_before_changing_any(layers, message):
    model = _mixed_model("llama", layers=6, routed=ROUTED, always_skip=[4])
    set_always_run(model, [5])
    if message is None:  # layer 4 is an always_skip layer
        message = r"always_run has \[4\], which are always_skip"
    with pytest.raises(ValueError, match=message):
        set_always_run(model, [3, *layers])
    assert always_run_layers(model) == [5]  # unchanged


def test_rarely_skipped_layers_follow_the_measured_skip_rates():
    model = _mixed_model("llama", layers=6, routed=ROUTED, gate_mode="difference")
    batches = [_prompt(3, plen=12, seed=s) for s in (1, 2)]
    set_always_run(model, [5])  # lifted during the measurement, restored after
    rates = layer_skip_rates(model, batches)
    assert always_run_layers(model) == [5]
    set_always_run(model, [])
    skipped, tokens = torch.zeros(3), 0
    with torch.no_grad():
        for ids, mask in batches:
            routes = routed_forward(model, ids, mask).routes
            skipped += (~routes.run[routes.valid]).sum(0).float()
            tokens += int(routes.valid.sum())
    expected = (skipped / tokens).tolist()
    assert list(rates) == [3, 4, 5]
    assert list(rates.values()) == pytest.approx(expected)
    assert 0 < min(expected) < max(expected) < 1
    cut = sorted(expected)[1]  # the two least skipped layers
    chosen = rarely_skipped_layers(model, batches, cut)
    assert chosen == [i for i, r in zip((3, 4, 5), expected, strict=True) if r <= cut] and len(chosen) == 2
    assert rarely_skipped_layers(model, batches, 0.0) == [i for i, r in rates.items() if r == 0]
    for bad in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="max_skip_rate"):
            rarely_skipped_layers(model, batches, bad)


def test_always_run_flops_count_a_full_layer():
    from src.flexidepth import FlexiDepthConfig

    config = tiny_config("llama", 6, "sdpa")
    cfg = FlexiDepthConfig(layers=ROUTED, always_skip=[4])
    lay = layer_macs(config, cfg)
    lm = config.vocab_size * config.hidden_size
    # 3 unrouted layers; layer 4 adapter only; of the other two routed, one always runs, one routed run
    expected = 3 * lay.full + lay.adapter + lay.full + lay.routed_run + lm
    assert model_macs_per_token(config, cfg, 1.0, always_run=1) == expected
    assert lay.routed_run > lay.full
    with pytest.raises(ValueError, match=r"skipped_layers must be in \[1, 2\]"):
        model_macs_per_token(config, cfg, 2.5, always_run=1)
    with pytest.raises(ValueError, match="always_run must be in"):
        model_macs_per_token(config, cfg, 1.0, always_run=3)
