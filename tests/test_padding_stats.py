"""Per-sequence statistics never see padding: the MindSkip gate (one gate per sequence from a mean over its
tokens) gives the same gate, logits and tokens batched (left or right padded) as one sequence at a time,
whatever the pad id, in every entry point: `generate`, HF `generate`, `routed_forward` with autograd
(training) and without (evaluation), and a plain model call."""

import copy

import pytest
import torch

from src.flexidepth import FlexiDepthConfig, flexi_layers, routed_forward
from src.flexidepth.generation import generate
from src.methods.mindskip import inject_mindskip
from tests.conftest import tiny_model

LENGTHS = (9, 3, 6)  # real tokens per prompt; batched prompts are padded to 9
N_NEW = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _mindskip(family):
    model = inject_mindskip(
        tiny_model(family, layers=4), FlexiDepthConfig(adapter="none", router="linear", router_init_bias=0.0)
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in flexi_layers(model):
            layer.router.head.weight.copy_(torch.randn(layer.router.head.weight.shape, generator=g) * 3.0)
    return model


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, 1000, (n,), generator=g) for n in LENGTHS]


def _batch(prompts, pad_id, side="left"):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, cols], mask[b, cols] = p, 1
    return ids, mask


@pytest.mark.parametrize(
    ("family", "pad_id"), [("llama", 0), ("llama", 999), ("mistral", 0), ("qwen2", 999), ("qwen3", 0)]
)
def test_mindskip_generate_batched_equals_one_at_a_time(family, pad_id):
    model = _mindskip(family)
    prompts = _prompts()
    ids, mask = _batch(prompts, pad_id)
    batched = generate(model, None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
    gates = []
    for b, p in enumerate(prompts):
        one = generate(model, None, p[None], None, max_new_tokens=N_NEW, return_logits=True)
        real = mask[b].bool()
        torch.testing.assert_close(batched.prefill.gates[b, real], one.prefill.gates[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.gates[b], one.gates[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.logits[b], one.logits[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(batched.new_tokens[b], one.new_tokens[0])
        gates.append(one.prefill.gates[0, 0])
    spread = torch.stack(gates)  # [prompts, R]: the test is only meaningful if the gates differ per prompt
    assert float((spread.max(0).values - spread.min(0).values).max()) > 0.05


def test_mindskip_hf_generate_batched_equals_one_at_a_time(family):
    model = _mindskip(family)
    prompts = _prompts()
    ids, mask = _batch(prompts, pad_id=7)
    kw = dict(
        max_new_tokens=N_NEW,
        do_sample=False,
        pad_token_id=7,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **kw)
        for b, p in enumerate(prompts):
            one = model.generate(
                input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw
            )
            assert torch.equal(batched.sequences[b, ids.shape[1] :], one.sequences[0, len(p) :])
            for step_b, step_1 in zip(batched.logits, one.logits, strict=True):
                torch.testing.assert_close(step_b[b], step_1[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("grad", [True, False])
def test_mindskip_forward_batched_equals_one_at_a_time(side, grad):
    """routed_forward (the training/evaluation forward) and a plain model call, with and without autograd."""
    model = _mindskip("llama")
    prompts = _prompts()
    for pad_id in (0, 999):
        ids, mask = _batch(prompts, pad_id, side)
        labels = ids.masked_fill(mask == 0, -100)
        with torch.set_grad_enabled(grad):
            model.flexidepth.recorder.clear()
            plain = model(input_ids=ids, attention_mask=mask).logits  # no routed_forward set-up before it
            batched = routed_forward(model, ids, mask, labels=labels)
            for b, p in enumerate(prompts):
                one = routed_forward(model, p[None], torch.ones(1, len(p), dtype=torch.long), labels=p[None])
                real = mask[b].bool()
                torch.testing.assert_close(
                    batched.routes.gates[b, real], one.routes.gates[0], rtol=1e-5, atol=1e-6
                )
                torch.testing.assert_close(batched.logits[b, real], one.logits[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(plain[b, real], one.logits[0], rtol=1e-4, atol=1e-4)
        if side == "left":  # a left-padded row's first real token would be scored from a pad position
            continue
        # the summed LM loss of the batch is the sum over sequences
        total = sum(
            float(routed_forward(model, p[None], None, labels=p[None]).lm_loss_sum.detach()) for p in prompts
        )
        assert float(batched.lm_loss_sum.detach()) == pytest.approx(total, rel=1e-4)


def test_mindskip_copy_keeps_its_own_padding_mask():
    """The mask hook follows deepcopy: a copy writes into its own recorder, not the original's."""
    model = _mindskip("llama")
    twin = copy.deepcopy(model)
    ids, mask = _batch(_prompts(), 0)
    with torch.no_grad():
        twin(input_ids=ids, attention_mask=mask)
    assert model.flexidepth.recorder.token_mask is None
    assert torch.equal(twin.flexidepth.recorder.token_mask, mask)
