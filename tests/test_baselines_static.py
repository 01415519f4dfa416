"""Static layer-pruning baselines: ShortGPT (Block Influence) and LaCo (RDSC layer collapse), on tiny models."""

import copy

import pytest
import torch
import torch.nn.functional as F

from src.methods.base import calibration_texts, text_batches
from src.methods.laco import identity_layers, laco_prune, rdsc_merge_
from src.methods.shortgpt import block_influence, shortgpt_layers
from tests.conftest import tiny_model


def make_batch(lengths, width=None, seed=0, vocab=1000):
    """Right-padded random batch: row i has lengths[i] real tokens; pads are id 0."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def make_identity(layer):
    """Zero the attention and MLP output projections: the residual layer then returns its input exactly."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def randomize_norms(model, seed=1):
    """Norm weights start at 1 in every layer; make them differ so merges of norm weights are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def params_of(layer):
    return {name: p.detach().clone() for name, p in layer.named_parameters()}


# ------------------------------------------------------------------------------------------------ ShortGPT
def test_identity_layer_has_zero_block_influence(family):
    model = tiny_model(family, layers=6)
    make_identity(model.model.layers[3])
    bi = block_influence(model, [make_batch([12, 7]), make_batch([9], seed=1)])
    assert len(bi) == 6
    assert abs(bi[3]) < 1e-6
    assert all(-1e-6 <= b <= 2.0 for b in bi)
    assert min(b for i, b in enumerate(bi) if i != 3) > 1e-3  # the random layers do change their input
    assert shortgpt_layers(bi, 1) == [3]


def test_block_influence_uses_layer_outputs_not_normed_hidden_states():
    model = tiny_model("llama", layers=5)
    randomize_norms(model)
    ids, mask = make_batch([10, 10])
    bi = block_influence(model, [(ids, mask)])
    with torch.inference_mode():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ref = [
        1.0 - F.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1).mean().item() for i in range(5)
    ]
    # inputs/outputs of layers 0..3 are the unnormed hidden states: same BI
    assert bi[:4] == pytest.approx(ref[:4], abs=1e-5)
    # the last entry of hidden_states has the final norm applied; the hook sees the true layer output
    assert abs(bi[4] - ref[4]) > 1e-3


def test_block_influence_excludes_pads():
    model = tiny_model("llama", layers=4)
    ids, mask = make_batch([11, 6, 3], seed=2)
    garbage = ids.clone()
    garbage[mask == 0] = torch.randint(
        1, 1000, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(5)
    )
    bi_pad = block_influence(model, [(ids, mask)])
    bi_garbage = block_influence(model, [(garbage, mask)])
    assert bi_garbage == pytest.approx(bi_pad, abs=1e-6)
    # the same rows unpadded, one batch each: the token-weighted mean is the same
    separate = [(ids[i : i + 1, :n], mask[i : i + 1, :n]) for i, n in enumerate([11, 6, 3])]
    assert block_influence(model, separate) == pytest.approx(bi_pad, abs=1e-5)
    # counting the pad positions would change BI (so the check above is not vacuous)
    bi_all = block_influence(model, [(garbage, torch.ones_like(mask))])
    assert max(abs(a - b) for a, b in zip(bi_all, bi_pad, strict=True)) > 1e-4


def test_shortgpt_layers_ranking_ties_and_candidates():
    bi = [0.5, 0.1, 0.1, 0.3, 0.2]
    assert shortgpt_layers(bi, 0) == []
    assert shortgpt_layers(bi, 1) == [2]  # tie between 1 and 2: the higher index goes first
    assert shortgpt_layers(bi, 2) == [1, 2]
    assert shortgpt_layers(bi, 3) == [1, 2, 4]
    assert shortgpt_layers(bi, 5) == [0, 1, 2, 3, 4]
    assert shortgpt_layers(bi, 2, candidates=[0, 3, 4]) == [3, 4]
    assert shortgpt_layers(bi, 1, candidates=[4, 3]) == [4]
    with pytest.raises(ValueError):
        shortgpt_layers(bi, 6)
    with pytest.raises(ValueError):
        shortgpt_layers(bi, 3, candidates=[0, 1])
    with pytest.raises(ValueError):
        shortgpt_layers(bi, 1, candidates=[7])


class CharTokenizer:
    """Stub: one id per character (ord % 997 + 2), a BOS id 1, HF-style call signature."""

    pad_token_id = None
    eos_token_id = 1

    def __call__(self, text, truncation=False, max_length=None):
        ids = [1] + [ord(c) % 997 + 2 for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_calibration_batches_right_pad_truncate_and_group():
    tok = CharTokenizer()
    texts = ["abc", "", "hello world", "x", "   ", "longer text here", "z"]
    batches = list(text_batches(tok, texts, max_length=8, batch_size=2))
    # empty/blank texts dropped: abc, hello world, x, longer text here, z -> batches of 2, 2, 1
    assert [tuple(ids.shape) for ids, _ in batches] == [(2, 8), (2, 8), (1, 2)]
    ids, mask = batches[0]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert ids[0, :4].tolist() == tok("abc")["input_ids"]
    assert ids[0, 4:].tolist() == [1] * 4  # pad id falls back to eos
    assert ids[1].tolist() == tok("hello world")["input_ids"][:8]
    assert ids.dtype == torch.long and mask.dtype == torch.long
    limited = list(text_batches(tok, texts, max_length=8, batch_size=4, max_texts=3))
    assert [int(m.sum()) for _, m in limited] == [4 + 8 + 2]


def test_calibration_texts_are_training_side_and_tokenise(smollm2_dir):
    from transformers import AutoTokenizer

    from src.data.corpora import lee_articles, lee_heldout_articles

    texts = calibration_texts(max_texts=5)
    assert texts == lee_articles()[:5]
    assert not set(texts) & set(lee_heldout_articles())
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    batches = list(text_batches(tok, texts, max_length=32, batch_size=2))
    assert [ids.shape[0] for ids, _ in batches] == [2, 2, 1]
    for ids, mask in batches:
        assert ids.shape[1] <= 32
        lengths = mask.sum(1)
        # right padding: every row is a run of ones then zeros
        assert torch.equal(mask, (torch.arange(ids.shape[1]) < lengths[:, None]).long())


# ------------------------------------------------------------------------------------------------- LaCo
def test_rdsc_merge_of_identical_layers_keeps_weights(family):
    model = tiny_model(family, layers=5)
    randomize_norms(model)
    layers = model.model.layers
    layers[3].load_state_dict(layers[2].state_dict())
    before = params_of(layers[2])
    rdsc_merge_(layers, 2, 2)
    after = params_of(layers[2])
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("count", [2, 3])
def test_rdsc_merge_formula(family, count):
    model = tiny_model(family, layers=6)
    randomize_norms(model)
    layers = model.model.layers
    original = [params_of(layer) for layer in layers]
    rdsc_merge_(layers, 1, count)
    merged = params_of(layers[1])
    names = [
        "self_attn.q_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
    ]
    names += {"qwen2": ["self_attn.k_proj.bias"], "qwen3": ["self_attn.q_norm.weight"]}.get(family, [])
    assert set(names) <= set(merged)
    for name in merged:  # every parameter, the named ones included
        a = original[1][name]
        expected = a.clone()
        for j in range(2, 1 + count):
            expected += original[j][name] - a
        assert torch.equal(merged[name], expected), name
    for name in names:
        a, b = original[1][name], original[2][name]
        if count == 2:
            torch.testing.assert_close(merged[name], b, rtol=0, atol=1e-6)  # θ_a + (θ_b - θ_a) = θ_b
        else:
            c = original[3][name]
            torch.testing.assert_close(merged[name], b + c - a, rtol=0, atol=1e-5)
        assert not torch.equal(merged[name], a)
    for i in [0] + list(range(2, 6)):  # only the target layer changes
        assert all(torch.equal(p, original[i][n]) for n, p in params_of(layers[i]).items())


def test_identity_layers_skip_and_restore(family):
    model = tiny_model(family, layers=4)
    ids, mask = make_batch([9, 5])
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
        with identity_layers(model, [1, 2]):
            skipped = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert (skipped - before).abs().max() > 1e-3
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)
    # identity_layers == a layer whose output projections are zero (it returns its input exactly)
    reference = copy.deepcopy(model)
    make_identity(reference.model.layers[1])
    make_identity(reference.model.layers[2])
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(skipped, expected, rtol=0, atol=1e-5)
    # restored on error too
    with pytest.raises(RuntimeError), identity_layers(model, [0]):
        raise RuntimeError("boom")
    assert "forward" not in model.model.layers[0].__dict__
    with pytest.raises(ValueError):
        with identity_layers(model, [4]):
            pass


def calib():
    return [make_batch([10, 7], seed=3), make_batch([8, 8], seed=4)]


def expected_rdsc(original, target, sources):
    out = {}
    for name, a in original[target].items():
        merged = a.clone()
        for s in sources:
            merged += original[s][name] - a
        out[name] = merged
    return out


def test_laco_accept_all_schedule_and_weights():
    model = tiny_model("llama", layers=8)
    randomize_norms(model)
    original = [params_of(layer) for layer in model.model.layers]
    result = laco_prune(model, 3, calib(), threshold=-1.0)  # C=4, I=2, L=4: one merge of the top four
    assert result["removed"] == [5, 6, 7]
    assert result["merged_into"] == {4: [5, 6, 7]}
    assert [m["phase"] for m in result["merges"]] == ["sweep"]
    assert result["settings"]["lowest_layer"] == 4 and result["settings"]["merge_size"] == 4
    layers = model.model.layers
    merged = params_of(layers[4])
    for name, value in expected_rdsc(original, 4, [5, 6, 7]).items():
        assert torch.equal(merged[name], value), name
    for i in [0, 1, 2, 3, 5, 6, 7]:
        assert all(torch.equal(p, original[i][n]) for n, p in params_of(layers[i]).items())
    assert -1.0 <= result["final_similarity"] <= 1.0
    assert result["final_similarity"] == pytest.approx(result["merges"][0]["similarity"], abs=1e-6)


@pytest.mark.parametrize(
    "interval, removed, merged_into",
    [(2, [3, 5, 7], {2: [3], 4: [5], 6: [7]}), (1, [5, 6, 7], {4: [5, 6, 7]})],
)
def test_laco_interval_in_collapsed_positions(interval, removed, merged_into):
    model = tiny_model("llama", layers=8)
    result = laco_prune(model, 3, calib(), merge_size=2, interval=interval, threshold=-1.0, lowest_layer=1)
    assert result["removed"] == removed
    assert result["merged_into"] == merged_into
    assert len(result["similarities"]) == 3 and all(s["accepted"] for s in result["similarities"])


def test_laco_last_merge_smaller_when_k_not_divisible():
    model = tiny_model("llama", layers=10)
    result = laco_prune(model, 3, calib(), merge_size=3, interval=1, threshold=-1.0, lowest_layer=2)
    assert [len(m["layers"]) for m in result["merges"]] == [2, 1]
    assert len(result["removed"]) == 3
    # pos 7 merges 7,8,9; then pos 6 merges 6 and the collapsed 7
    assert result["removed"] == [7, 8, 9] and result["merged_into"] == {6: [7, 8, 9]}


def test_laco_fallback_when_threshold_rejects_everything():
    model = tiny_model("llama", layers=8)
    randomize_norms(model)
    original = [params_of(layer) for layer in model.model.layers]
    result = laco_prune(model, 2, calib(), merge_size=3, interval=1, threshold=2.0, lowest_layer=2)
    assert len(result["removed"]) == 2
    assert all(r > 2 for r in result["removed"])
    sweep = [s for s in result["similarities"] if s["phase"] == "sweep"]
    fallback = [s for s in result["similarities"] if s["phase"] == "fallback"]
    # the sweep tried positions 5, 4, 3, 2 (all rejected); the fallback evaluates the same four again
    assert [s["into"] for s in sweep] == [5, 4, 3, 2] and not any(s["accepted"] for s in sweep)
    assert [s["into"] for s in fallback] == [2, 3, 4, 5]
    assert [s["similarity"] for s in fallback] == pytest.approx(
        [s["similarity"] for s in sweep[::-1]], abs=1e-6
    )
    (merge,) = result["merges"]
    best = max(fallback, key=lambda s: s["similarity"])
    assert merge["phase"] == "fallback" and merge["similarity"] == best["similarity"]
    assert [s["accepted"] for s in fallback] == [s is best for s in fallback]
    assert result["merged_into"] == {best["into"]: best["layers"]}
    # the chosen merge was applied; every other layer kept its weights exactly (rejected merges undone)
    layers = model.model.layers
    merged = params_of(layers[best["into"]])
    for name, value in expected_rdsc(original, best["into"], best["layers"]).items():
        assert torch.equal(merged[name], value), name
    for i in range(8):
        if i != best["into"]:
            assert all(torch.equal(p, original[i][n]) for n, p in params_of(layers[i]).items()), i
    assert result["final_similarity"] == pytest.approx(best["similarity"], abs=1e-6)


def test_laco_fallback_runs_several_rounds_until_k():
    model = tiny_model("llama", layers=8)
    result = laco_prune(model, 4, calib(), merge_size=3, interval=1, threshold=2.0, lowest_layer=2)
    assert len(result["removed"]) == 4 and all(r > 2 for r in result["removed"])
    assert [m["phase"] for m in result["merges"]] == ["fallback", "fallback"]
    assert sum(len(m["layers"]) for m in result["merges"]) == 4
    with torch.inference_mode(), identity_layers(model, result["removed"]):
        logits = model(input_ids=calib()[0][0], attention_mask=calib()[0][1]).logits
    assert torch.isfinite(logits).all()


def test_laco_respects_lowest_layer_and_never_removes_layer_zero(family):
    model = tiny_model(family, layers=8)
    result = laco_prune(model, 2, calib(), lowest_layer=5)
    assert result["removed"] == [6, 7] and result["merged_into"] == {5: [6, 7]}
    with pytest.raises(ValueError):
        laco_prune(tiny_model(family, layers=8), 3, calib(), lowest_layer=5)
    everything = laco_prune(tiny_model(family, layers=6), 5, calib(), merge_size=2, lowest_layer=0)
    assert everything["removed"] == [1, 2, 3, 4, 5]
    assert everything["merged_into"] == {0: [1, 2, 3, 4, 5]}


def replay_merges(original, merges):
    """The weights `laco_prune` must leave, replayed from its accepted merges in order: a merge into layer t
    adds Σ_s (θ_s - θ_t^orig) to t's current weights (sources at their current weights, differences taken
    against t's *original* weights), so merging A and then B into t equals merging A ∪ B at once."""
    current = [{n: p.double() for n, p in layer.items()} for layer in original]
    for merge in merges:
        t = merge["into"]
        for name in current[t]:
            for s in merge["layers"]:
                current[t][name] = current[t][name] + current[s][name] - original[t][name].double()
    return current


def test_laco_second_merge_into_a_merged_layer_extends_it_instead_of_erasing_it():
    # The SmolLM2 k = 4 case (issue 22): C = 4 merges 3 layers into a target, and the exact-k remainder (one
    # layer) is merged into the *same* target. With differences against the target's current weights, that
    # last merge gives θ_t' + (θ_s - θ_t') = θ_s: the first merge is erased and "LaCo" becomes a plain removal.
    model = tiny_model("qwen2", seed=3, layers=6)
    randomize_norms(model)
    original = [params_of(layer) for layer in model.model.layers]
    result = laco_prune(model, 4, calib(), merge_size=4, threshold=2.0, lowest_layer=1)
    # round 1 (four candidates' similarities) picks target 1; round 2 then has a single candidate: 1 <- 5
    assert [(m["into"], m["layers"]) for m in result["merges"]] == [(1, [2, 3, 4]), (1, [5])]
    assert result["merged_into"] == {1: [2, 3, 4, 5]} and result["removed"] == [2, 3, 4, 5]
    merged = params_of(model.model.layers[1])
    for name, value in expected_rdsc(original, 1, [2, 3, 4, 5]).items():  # = one merge of all five layers
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-5)
        assert (merged[name] - original[5][name]).abs().max() > 1e-3, name  # not layer 5's weights
    for i in [0, 2, 3, 4, 5]:
        assert all(torch.equal(p, original[i][n]) for n, p in params_of(model.model.layers[i]).items())


@pytest.mark.parametrize(
    "k, merge_size, threshold, lowest_layer",
    [(4, 4, 2.0, 1), (4, 3, 2.0, 1), (3, 2, -1.0, 0), (5, 4, 2.0, 0), (4, 2, 2.0, 1)],
)
def test_laco_weights_equal_the_replayed_merges(family, k, merge_size, threshold, lowest_layer):
    model = tiny_model(family, layers=6)
    randomize_norms(model)
    original = [params_of(layer) for layer in model.model.layers]
    result = laco_prune(
        model, k, calib(), merge_size=merge_size, threshold=threshold, lowest_layer=lowest_layer
    )
    assert len(result["removed"]) == k
    assert sum(len(m["layers"]) for m in result["merges"]) == k
    expected = replay_merges(original, result["merges"])
    for i, layer in enumerate(model.model.layers):
        for name, p in layer.named_parameters():
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p.double(), expected[i][name], rtol=0, atol=1e-5)
    # the pruned model's similarity is the one recorded for the last accepted merge
    assert result["final_similarity"] == pytest.approx(result["merges"][-1]["similarity"], abs=1e-5)
