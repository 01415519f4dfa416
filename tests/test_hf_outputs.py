"""Hugging Face output contracts on injected models: `output_hidden_states` / `output_attentions` give the
same number and order of entries as the base model, for every family, masked and fast path, routing on/off."""

import copy

import pytest
import torch

from src.flexidepth import FlexiDepthConfig, forced_gates, inject, set_routing
from src.flexidepth.generation import set_fast_path
from src.methods.mindskip import inject_mindskip
from tests.conftest import tiny_model

LAYERS = 4
ROUTED = [2, 3]  # "last_half" of 4


def _alternating(z, layer_index):
    """g in {0, 1}: position t runs layer l when t + l is even (both branches at every routed layer)."""
    t = torch.arange(z.shape[1], device=z.device)
    return ((t + layer_index) % 2 == 0).float().expand(z.shape[0], -1)


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 1000, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    return ids, mask


def _outputs(model, ids, mask, fast, attentions=True):
    set_fast_path(model, fast)
    try:
        with torch.no_grad():
            return model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=attentions)
    finally:
        set_fast_path(model, None)


def _layer_outputs(model, ids, mask):
    """Each decoder layer's output, read with our own forward hooks (the ground truth for the order)."""
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out)) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("fast", [False, True])
def test_hidden_states_and_attentions_match_base_contract(family, fast):
    base = tiny_model(family, layers=LAYERS, attn="eager")
    model = inject(copy.deepcopy(base), FlexiDepthConfig(layers="last_half"))
    ids, mask = _inputs()
    ref = _outputs(base, ids, mask, None)
    assert len(ref.hidden_states) == LAYERS + 1 and len(ref.attentions) == LAYERS

    # routing off, and routing on with every gate 1 (released: FFN scaled by 1): every entry equals the base's
    set_routing(model, False)
    off = _outputs(model, ids, mask, fast)
    set_routing(model, True)
    with forced_gates(model, 1.0):
        on_all = _outputs(model, ids, mask, fast)
    for out in (off, on_all):
        assert len(out.hidden_states) == LAYERS + 1 and len(out.attentions) == LAYERS
        for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(out.attentions, ref.attentions, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # mixed routing: entry i + 1 is layer i's output; skipped tokens have all-zero attention rows
    with forced_gates(model, _alternating):
        mixed = _outputs(model, ids, mask, fast)
        truth = _layer_outputs(model, ids, mask)
        hidden_only = _outputs(model, ids, mask, fast, attentions=False)
    assert len(mixed.hidden_states) == LAYERS + 1 and len(mixed.attentions) == LAYERS
    torch.testing.assert_close(mixed.hidden_states[0], base.model.embed_tokens(ids), rtol=0, atol=0)
    for i in range(LAYERS - 1):  # the last entry is HF's final-normed state
        torch.testing.assert_close(mixed.hidden_states[i + 1], truth[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden_only.hidden_states[i + 1], truth[i], rtol=1e-5, atol=1e-5)
    for i in range(ROUTED[0]):  # unrouted prefix: identical to the base model
        torch.testing.assert_close(mixed.attentions[i], ref.attentions[i], rtol=1e-5, atol=1e-6)
    for i in ROUTED:
        skipped = ~_alternating(ids[..., None].float(), i).bool()  # [B, T]
        attn = mixed.attentions[i]  # [B, H, T, S]
        assert torch.count_nonzero(attn.permute(0, 2, 1, 3)[skipped]) == 0
        rows = attn.permute(0, 2, 1, 3)[~skipped & mask.bool()]  # running real tokens: probabilities
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]), rtol=1e-5, atol=1e-5)


def test_hidden_states_when_capture_hooks_predate_injection():
    """transformers installs its capture hooks once per model; injecting afterwards must still record."""
    base = tiny_model("llama", layers=LAYERS, attn="eager")
    ids, mask = _inputs()
    model = copy.deepcopy(base)
    with torch.no_grad():
        model(ids, attention_mask=mask, output_hidden_states=True)  # installs the hooks on the base layers
    inject(model, FlexiDepthConfig(layers="last_half"))
    with forced_gates(model, 1.0):
        out = _outputs(model, ids, mask, None)
    ref = _outputs(base, ids, mask, None)
    assert len(out.hidden_states) == LAYERS + 1
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mindskip_hidden_states_and_attentions(family):
    base = tiny_model(family, layers=LAYERS, attn="eager")
    model = inject_mindskip(copy.deepcopy(base), FlexiDepthConfig(layers="last_half", adapter="none"))
    ids, mask = _inputs()
    ref = _outputs(base, ids, mask, None)
    with forced_gates(model, 1.0):
        on = _outputs(model, ids, mask, None)
    for a, b in zip(on.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(on.attentions) == LAYERS
    with forced_gates(model, 0.0):  # every sequence skips attention at the routed layers: zero maps
        off = _outputs(model, ids, mask, None)
    assert len(off.hidden_states) == LAYERS + 1 and len(off.attentions) == LAYERS
    for i in ROUTED:
        assert torch.count_nonzero(off.attentions[i]) == 0
    torch.testing.assert_close(off.attentions[0], ref.attentions[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_removed_layers_keep_the_contract(fast):
    """Static removal (ShortGPT / LaCo / early exit) goes through the same injection: L + 1 hidden states,
    L attention maps, the removed layer's entry equals its input and its attention map is all zeros."""
    from src.methods.removal import remove_layers

    base = tiny_model("qwen2", layers=LAYERS, attn="eager")
    model = remove_layers(copy.deepcopy(base), [1])
    ids, mask = _inputs()
    ref = _outputs(base, ids, mask, None)
    out = _outputs(model, ids, mask, fast)
    assert len(out.hidden_states) == LAYERS + 1 and len(out.attentions) == LAYERS
    torch.testing.assert_close(out.hidden_states[1], ref.hidden_states[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.hidden_states[2], out.hidden_states[1], rtol=0, atol=0)  # layer 1: y = x
    assert torch.count_nonzero(out.attentions[1]) == 0
    torch.testing.assert_close(out.attentions[0], ref.attentions[0], rtol=1e-5, atol=1e-6)


def test_injected_model_stays_picklable_until_outputs_are_requested():
    """The hidden-state recorders are installed on first use, as transformers does for the base layers."""
    import pickle

    model = inject(tiny_model("llama", layers=LAYERS), FlexiDepthConfig(layers="last_half"))
    clone = pickle.loads(pickle.dumps(model))
    ids, mask = _inputs()
    with forced_gates(clone, 1.0):
        out = _outputs(clone, ids, mask, None, attentions=False)
    assert len(out.hidden_states) == LAYERS + 1
