"""FlexiDepth on the real embedded SmolLM2-135M-Instruct, and parameter counts for Llama-3-8B."""

import copy

import pytest
import torch

from src.flexidepth import FlexiDepthConfig, inject, parameter_counts, routed_forward, set_routing


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def lee_batch(smollm2):
    from src.data.corpora import lee_heldout_articles

    _, tok = smollm2
    enc = tok(lee_heldout_articles()[:4], return_tensors="pt", padding=True, truncation=True, max_length=96)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.slow
def test_embedded_inject_counts_parity_and_init(smollm2, lee_batch):
    base, _ = smollm2
    model = inject(copy.deepcopy(base), FlexiDepthConfig())
    assert model.flexidepth.layer_indices == list(range(15, 30))
    counts = parameter_counts(model)
    # docs/method.md §7: 3,119,580 without biases; our router adds one logit bias per routed layer
    assert counts["trainable"] == 3_119_580 + 15
    assert counts["total"] - counts["trainable"] == 134_515_008
    ids, mask = lee_batch
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        base_out = base(ids, attention_mask=mask, labels=labels)
        set_routing(model, False)
        off = model(ids, attention_mask=mask)
        set_routing(model, True)
        fresh = routed_forward(model, ids, mask, labels=labels)
    valid = mask.bool()
    torch.testing.assert_close(off.logits[valid], base_out.logits[valid], rtol=0, atol=1e-4)
    # init: nothing skipped at tau = 0.5, and the LM loss stays close to the base model's
    skip_rate = 1 - fresh.routes.layer_run_fraction.mean().item()
    gap = fresh.lm_loss.item() - base_out.loss.item()
    print(
        f"\nembedded init: skip rate {skip_rate:.3f}, base loss {base_out.loss.item():.4f}, "
        f"fresh FlexiDepth loss {fresh.lm_loss.item():.4f} (gap {gap:+.4f})"
    )
    assert skip_rate == 0.0
    assert 1.5 < base_out.loss.item() < 4.5
    assert abs(gap) < 0.25


def test_llama3_8b_trainable_count_from_config():
    """Counted on the meta device from the architecture alone (docs/method.md §7: 209,784,832 without biases)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import llama3_8b_config

    cfg = llama3_8b_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    inject(model, FlexiDepthConfig())
    counts = parameter_counts(model)
    assert model.flexidepth.layer_indices == list(range(16, 32))
    assert counts["router"] == 16 * (2_101_504 + 1)
    assert counts["adapter"] == 16 * 11_010_048
    assert counts["trainable"] == 209_784_832 + 16
    assert counts["total"] - counts["trainable"] == 8_030_261_248
