"""The no-K/V ablation (skip.kv_for_skipped=false) with a sliding window: cached generation equals the
masked full forward for prompts shorter and longer than the window, batched with left padding."""

import pytest
import torch

from src.flexidepth import flexi_layers
from src.flexidepth.generation import generate
from tests.test_generation import _mixed_model, _teacher_forced

WINDOW, N_NEW = 8, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _no_kv_model(attn, kv_for_skipped=False):
    model = _mixed_model("mistral", attn=attn)
    model.config.sliding_window = WINDOW
    model.flexidepth.config.kv_for_skipped = kv_for_skipped
    for layer in flexi_layers(model):
        layer.kv_for_skipped = kv_for_skipped
    return model


def _left_padded(lengths, seed=4):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = torch.randint(1, 1000, (n,), generator=g)
        mask[b, width - n :] = 1
    return ids, mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [(30,), (5,), (30, 5, 18)])
def test_no_kv_generation_with_sliding_window_equals_full_forward(attn, lengths):
    model = _no_kv_model(attn)
    ids, mask = _left_padded(lengths)
    out = generate(model, None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
    ref = _teacher_forced(model, out, mask)  # one masked forward over prompt + new tokens, no cache
    plen = ids.shape[1]
    steps = slice(plen - 1, plen + N_NEW - 1)
    torch.testing.assert_close(out.logits, ref.logits[:, steps].float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.run, ref.routes.run[:, steps])
    decisions = out.run.reshape(-1)
    assert decisions.any() and not decisions.all()  # skipped keys exist, so the ablation is exercised
    # and it matters: hiding skipped keys changes the numbers compared with keeping them
    keep = generate(_no_kv_model(attn, True), None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
    assert not torch.allclose(keep.logits[:, 0], out.logits[:, 0], atol=1e-4)


def test_no_kv_batched_equals_one_at_a_time():
    model = _no_kv_model("sdpa")
    lengths = (30, 5, 18)
    ids, mask = _left_padded(lengths)
    batched = generate(model, None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
    for b in range(len(lengths)):
        real = mask[b].bool()
        one = generate(model, None, ids[b : b + 1, real], None, max_new_tokens=N_NEW, return_logits=True)
        assert torch.equal(one.new_tokens[0], batched.new_tokens[b])
        assert torch.equal(one.run[0], batched.run[b])
        torch.testing.assert_close(one.logits[0], batched.logits[b], rtol=1e-4, atol=1e-4)


def test_no_kv_hf_generate_equals_ours():
    model = _no_kv_model("sdpa")
    ids, mask = _left_padded((30, 5, 18))
    ours = generate(model, None, ids, mask, max_new_tokens=N_NEW, pad_token_id=0)
    with torch.no_grad():
        hf = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0
        )
    assert torch.equal(hf, ours.sequences)
