"""Fast inference path and cached generation: equivalence with the masked (training) path, every family."""

import contextlib
import copy

import pytest
import torch

from src.flexidepth import FlexiDepthConfig, flexi_layers, forced_gates, inject, routed_forward
from src.flexidepth.flops import (
    flop_ideal_speedup,
    layer_macs,
    model_macs_per_token,
)
from src.flexidepth.generation import generate, set_fast_path
from tests.conftest import tiny_model

P, N_NEW = 7, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _mixed_model(
    family, seed=0, layers=4, attn="sdpa", routed="last_half", gate_mode="released", always_skip=()
):
    """Injected tiny model whose routers give a mix of run and skip (random heads, no bias)."""
    model = inject(
        tiny_model(family, seed=seed, layers=layers, attn=attn),
        FlexiDepthConfig(layers=routed, gate_mode=gate_mode, always_skip=list(always_skip)),
    )
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in flexi_layers(model):
            layer.router.head.weight.copy_(torch.randn(layer.router.head.weight.shape, generator=g) * 2.0)
            layer.router.bias.zero_()
            for p in layer.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    # centre each router's logits on a calibration batch (layer by layer) so that about half the tokens run
    ids = torch.randint(1, 1000, (4, 12), generator=g)
    for layer in flexi_layers(model):
        if layer.always_skip:
            continue
        logits = []
        hook = layer.router.register_forward_hook(lambda mod, args, out: logits.append(out))
        with torch.no_grad():
            model(ids)
            hook.remove()
            layer.router.bias.fill_(-float(logits[0].median()))
    return model


def _prompt(batch, plen=P, seed=1, pads=(0, 2, 4)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (batch, plen), generator=g)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : pads[b % len(pads)]] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def hf_greedy(model, ids, mask, new_tokens: int) -> torch.Tensor:
    """HF `generate`, greedy, no EOS stop: [B, P] -> [B, P + new_tokens] (the reference for our loop)."""
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )


def _forward(model, ids, mask, fast):
    set_fast_path(model, fast)
    try:
        with torch.no_grad():
            return routed_forward(model, ids, attention_mask=mask, position_ids=_positions(mask))
    finally:
        set_fast_path(model, None)


def _assert_same(fast, ref, valid):
    torch.testing.assert_close(fast.logits[valid], ref.logits[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(fast.routes.run[valid], ref.routes.run[valid])
    torch.testing.assert_close(fast.routes.gates[valid], ref.routes.gates[valid], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- fast == masked
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_path_equals_masked_path(family, batch):
    model = _mixed_model(family)
    ids, mask = _prompt(batch, plen=12)
    ref, fast = _forward(model, ids, mask, False), _forward(model, ids, mask, True)
    valid = mask.bool()
    frac = ref.routes.run[valid].float().mean()
    assert 0.1 < frac < 0.9, f"routers should mix run and skip, got run fraction {frac:.2f}"
    _assert_same(fast, ref, valid)


@pytest.mark.parametrize("gate_mode", ["ste", "difference"])
def test_unit_weight_gate_modes_fast_path_and_single_row_decode(gate_mode):
    model = _mixed_model("llama", gate_mode=gate_mode)
    ids, mask = _prompt(3, plen=10)
    _assert_same(_forward(model, ids, mask, True), _forward(model, ids, mask, False), mask.bool())
    # the training forward (autograd on: both branches for "difference") has the served value
    trained = routed_forward(model, ids, attention_mask=mask, position_ids=_positions(mask)).logits.detach()
    valid = mask.bool()
    served = _forward(model, ids, mask, True).logits
    torch.testing.assert_close(trained[valid].float(), served[valid].float(), rtol=1e-4, atol=1e-4)
    ids, mask = _prompt(1)
    out = generate(model, None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
    ref = _teacher_forced(model, out, mask)
    steps = slice(P - 1, P + N_NEW - 1)
    torch.testing.assert_close(out.logits, ref.logits[:, steps].float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.run, ref.routes.run[:, steps])


def test_fast_path_is_the_default_without_autograd():
    model = _mixed_model("llama")
    layer = flexi_layers(model)[0]
    calls = []
    orig = layer._fast_forward
    layer._fast_forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    ids, mask = _prompt(2)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls
    calls.clear()
    model(ids, attention_mask=mask)  # autograd on: the training path
    assert not calls


def test_fast_path_all_run_and_all_skip():
    model = _mixed_model("qwen3")
    ids, mask = _prompt(3, plen=9)
    for value in (1.0, 0.0):
        with forced_gates(model, value):
            _assert_same(_forward(model, ids, mask, True), _forward(model, ids, mask, False), mask.bool())


def test_fast_path_unpadded_prompt_without_mask_uses_sdpa_causal_flag(family):
    """A prompt with no padding and no attention mask (what HF passes the layers for SDPA): where every row
    runs, the fast path attends with SDPA's is_causal flag instead of building a mask; same logits and routes
    as the masked path, with all rows running, none, and mixed."""
    model = _mixed_model(family)
    ids = torch.randint(1, 1000, (1, 11), generator=torch.Generator().manual_seed(5))
    flags = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        flags.append(bool(kwargs.get("is_causal", False)))
        return real_sdpa(*args, **kwargs)

    def run(fast):
        set_fast_path(model, fast)
        try:
            with torch.no_grad():
                return routed_forward(model, ids)
        finally:
            set_fast_path(model, None)

    valid = torch.ones_like(ids, dtype=torch.bool)
    for value in (1.0, 0.0, None):
        with forced_gates(model, value) if value is not None else contextlib.nullcontext():
            ref = run(False)
            torch.nn.functional.scaled_dot_product_attention = spy
            try:
                fast = run(True)
            finally:
                torch.nn.functional.scaled_dot_product_attention = real_sdpa
        _assert_same(fast, ref, valid)
        if value == 1.0:  # every layer, routed ones included, attended with the causal flag and no mask
            assert flags == [True] * model.config.num_hidden_layers, flags
        flags.clear()
        with forced_gates(model, value) if value is not None else contextlib.nullcontext():
            ours = generate(model, None, ids, None, max_new_tokens=N_NEW)
            with torch.no_grad():
                hf = model.generate(
                    input_ids=ids, max_new_tokens=N_NEW, do_sample=False, pad_token_id=0, eos_token_id=None
                )
        assert torch.equal(hf, ours.sequences)  # and HF's own loop over the same fast path agrees


def test_fast_path_eager_attention_and_sliding_window():
    model = _mixed_model("llama", attn="eager")  # additive float mask
    ids, mask = _prompt(3, plen=10)
    _assert_same(_forward(model, ids, mask, True), _forward(model, ids, mask, False), mask.bool())
    model = _mixed_model("mistral")
    model.config.sliding_window = 4  # an active window: the model's mask carries it
    _assert_same(_forward(model, ids, mask, True), _forward(model, ids, mask, False), mask.bool())


def test_fast_chunked_prefill_with_cache(family):
    """T > 1 on top of a non-empty cache (past > 0): causal offset handled with and without padding."""
    from transformers import DynamicCache

    model = _mixed_model(family)
    for pads in ((0,), (0, 3)):
        ids, mask = _prompt(2, plen=11, pads=pads)
        ref = _forward(model, ids, mask, False)
        cache = DynamicCache(config=model.config)
        pos = _positions(mask)
        with torch.no_grad():
            a = routed_forward(
                model,
                ids[:, :6],
                attention_mask=mask[:, :6],
                position_ids=pos[:, :6],
                cache=cache,
                use_cache=True,
            )
            b = routed_forward(
                model, ids[:, 6:], attention_mask=mask, position_ids=pos[:, 6:], cache=cache, use_cache=True
            )
        logits = torch.cat([a.logits, b.logits], 1)
        run = torch.cat([a.routes.run, b.routes.run], 1)
        valid = mask.bool()
        torch.testing.assert_close(logits[valid], ref.logits[valid], rtol=1e-5, atol=1e-5)
        assert torch.equal(run[valid], ref.routes.run[valid])


# ---------------------------------------------------------------------------------------------- generation
def _teacher_forced(model, out, mask):
    full_mask = torch.cat([mask, out.valid.long()], 1)
    return _forward(model, out.sequences, full_mask, False)


@pytest.mark.parametrize("batch", [1, 3])
def test_generation_matches_teacher_forced_forward(family, batch):
    model = _mixed_model(family)
    ids, mask = _prompt(batch)
    out = generate(model, None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
    assert out.new_tokens.shape == (batch, N_NEW) and out.run.shape == (batch, N_NEW, 2)
    ref = _teacher_forced(model, out, mask)
    steps = slice(P - 1, P + N_NEW - 1)
    torch.testing.assert_close(out.logits, ref.logits[:, steps].float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.run, ref.routes.run[:, steps])
    assert torch.equal(out.prefill.run[mask.bool()], ref.routes.run[:, :P][mask.bool()])
    assert torch.equal(out.new_tokens, ref.logits[:, steps].argmax(-1))
    decisions = torch.cat([out.prefill.run[mask.bool()], out.run.reshape(-1, 2)])
    assert decisions.any() and not decisions.all()  # both branches exercised
    assert torch.equal(out.layers_used, 2 + out.run.sum(-1))


def test_generation_sliding_window_active():
    model = _mixed_model("mistral")
    model.config.sliding_window = 5  # prefill and every decode step exceed the window
    ids, mask = _prompt(2)
    out = generate(model, None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
    ref = _teacher_forced(model, out, mask)
    steps = slice(P - 1, P + N_NEW - 1)
    torch.testing.assert_close(out.logits, ref.logits[:, steps].float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(out.run, ref.routes.run[:, steps])


def test_batched_generation_equals_per_sequence(family):
    model = _mixed_model(family)
    ids, mask = _prompt(3)
    batched = generate(model, None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
    for b in range(3):
        keep = mask[b].bool()
        single = generate(model, None, ids[b : b + 1, keep], None, max_new_tokens=N_NEW, return_logits=True)
        assert torch.equal(single.new_tokens[0], batched.new_tokens[b])
        assert torch.equal(single.run[0], batched.run[b])
        torch.testing.assert_close(single.logits[0], batched.logits[b], rtol=1e-4, atol=1e-4)


def test_hf_generate_equals_ours(family):
    model = _mixed_model(family)
    ids, mask = _prompt(3)
    ours = generate(model, None, ids, mask, max_new_tokens=N_NEW)
    hf = hf_greedy(model, ids, mask, N_NEW)
    assert torch.equal(hf, ours.sequences)
    # and for the unrouted base model our loop equals HF too
    base = tiny_model(family)
    hf_base = hf_greedy(base, ids, mask, N_NEW)
    ours_base = generate(base, None, ids, mask, max_new_tokens=N_NEW)
    assert torch.equal(hf_base, ours_base.sequences) and ours_base.run is None


def test_eos_stopping_and_sampling_reproducible():
    model = _mixed_model("llama")
    ids, mask = _prompt(2)
    greedy = generate(model, None, ids, mask, max_new_tokens=N_NEW)
    eos = int(greedy.new_tokens[0, 1])
    stopped = generate(model, None, ids, mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    assert stopped.new_tokens[0, 1] == eos and stopped.valid[0, 1] and not stopped.valid[0, 2:].any()
    assert (stopped.new_tokens[0, 2:] == 0).all()
    a = generate(
        model, None, ids, mask, max_new_tokens=N_NEW, do_sample=True, temperature=0.8, top_p=0.9, seed=3
    )
    b = generate(
        model, None, ids, mask, max_new_tokens=N_NEW, do_sample=True, temperature=0.8, top_p=0.9, seed=3
    )
    assert torch.equal(a.sequences, b.sequences)


def test_fast_path_unused_for_kv_ablation():
    model = inject(tiny_model("llama"), FlexiDepthConfig(kv_for_skipped=False))
    layer = flexi_layers(model)[0]
    assert not layer._fast_path_applies(None, (torch.zeros(1), torch.zeros(1)))


def test_routing_disabled_generation_equals_base():
    from src.flexidepth import set_routing

    base = tiny_model("qwen2")
    model = inject(copy.deepcopy(base), FlexiDepthConfig())
    set_routing(model, False)
    ids, mask = _prompt(2)
    a = generate(model, None, ids, mask, max_new_tokens=N_NEW)
    b = generate(base, None, ids, mask, max_new_tokens=N_NEW)
    assert torch.equal(a.sequences, b.sequences) and a.run is None


# ---------------------------------------------------------------------------------------------- FLOPs
def test_flops_match_spec_table():
    from transformers import LlamaConfig

    from tests.conftest import llama3_8b_config

    llama3 = llama3_8b_config()
    smol = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    )
    cfg = FlexiDepthConfig()
    big = layer_macs(llama3, cfg)
    assert round(big.full / 1e6, 1) == 218.1 and round(big.skipped / 1e6, 1) == 21.5
    assert round(big.skipped / big.full, 3) == 0.099
    small = layer_macs(smol, cfg)
    assert round(small.full / 1e6, 2) == 3.54 and round(small.skipped / 1e6, 2) == 0.43
    assert round(small.skipped / small.full, 3) == 0.121
    assert round(big.router / big.full, 2) == 0.01
    # "8 of 32 layers skipped saves about 22% of layer FLOPs"
    saved = 1 - model_macs_per_token(
        llama3, cfg, skipped_layers=8, include_lm_head=False
    ) / model_macs_per_token(llama3, None, include_lm_head=False)
    assert 0.21 < saved < 0.23
    assert flop_ideal_speedup(llama3, cfg, skip_fraction=0.0) < 1.0  # router overhead only
    assert flop_ideal_speedup(llama3, cfg, skip_fraction=0.5) > 1.25


def test_single_row_decode_both_branches(family):
    """Batch-1 decode with one routed layer always running and the other always skipping."""
    model = _mixed_model(family)
    ids, mask = _prompt(1)

    def gates(z, i):
        return torch.full(z.shape[:2], 0.9 if i == 2 else 0.2)

    with forced_gates(model, gates):
        out = generate(model, None, ids, mask, max_new_tokens=N_NEW, return_logits=True)
        ref = _teacher_forced(model, out, mask)
    steps = slice(P - 1, P + N_NEW - 1)
    torch.testing.assert_close(out.logits, ref.logits[:, steps].float(), rtol=1e-4, atol=1e-4)
    assert out.run[..., 0].all() and not out.run[..., 1].any()


@pytest.mark.slow
def test_smollm2_prompts_ours_equals_hf_generate(smollm2_dir):
    """Real model and tokenizer: text prompts, left padding, mixed routes; our loop == HF generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    inject(model, FlexiDepthConfig())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in flexi_layers(model):  # a random head: some tokens skip
            layer.router.head.weight.copy_(torch.randn(layer.router.head.weight.shape, generator=g) * 0.05)
            layer.router.bias.zero_()
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    side = tok.padding_side
    ours = generate(model, tok, prompts=prompts, max_new_tokens=5, eos_token_id=None, pad_token_id=0)
    assert ours.run is not None and 0 < ours.run.float().mean() < 1
    assert tok.padding_side == side  # restored
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        hf = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(hf, ours.sequences)


# ---------------------------------------------------------------------------------------------- folded router
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_router_equals_router_and_follows_weight_changes(dtype):
    """MLPRouter.folded_logits (head @ dec folded into one vector, fused RMSNorm) = forward, to rounding;
    the cached vector is rebuilt when a weight changes in place."""
    from src.flexidepth.modules import MLPRouter

    torch.manual_seed(0)
    router = MLPRouter(64, 8, 1e-6).to(dtype)
    router.reset_parameters()
    torch.nn.init.normal_(router.head.weight, std=1.0)
    z = torch.randn(3, 5, 64).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    with torch.inference_mode():
        torch.testing.assert_close(router(z, folded=True), router(z), **tol)
    with torch.no_grad():
        router.head.weight.mul_(-2.0)  # in place: same storage, new version
        router.dec.weight.add_(0.5)
    with torch.inference_mode():
        torch.testing.assert_close(router(z, folded=True), router(z), **tol)
    assert router(z, folded=True).dtype == torch.float32


def test_fast_path_uses_the_folded_router_and_masked_path_does_not(family):
    model = _mixed_model(family)
    seen = []
    layer = flexi_layers(model)[0]
    hook = layer.router.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs.get("folded", False)), with_kwargs=True
    )
    ids, mask = _prompt(2, plen=8)
    try:
        _forward(model, ids, mask, True)
        _forward(model, ids, mask, False)
    finally:
        hook.remove()
    assert seen == [True, False]


@pytest.mark.parametrize("batch", [1, 3])
def test_fast_path_never_touches_run_weights_of_a_layer_no_row_runs(batch):
    """Batched decode and prefill: a routed layer that no row runs calls neither q_proj, o_proj nor the FFN
    (its weights are never streamed); a layer every row runs never calls the adapter."""
    model = _mixed_model("llama")
    first, second = flexi_layers(model)
    calls = {"q": 0, "o": 0, "mlp": 0, "adapter": 0}
    hooks = [
        first.self_attn.q_proj.register_forward_hook(lambda *a: calls.__setitem__("q", calls["q"] + 1)),
        first.self_attn.o_proj.register_forward_hook(lambda *a: calls.__setitem__("o", calls["o"] + 1)),
        first.mlp.register_forward_hook(lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1)),
        second.adapter.register_forward_hook(lambda *a: calls.__setitem__("adapter", calls["adapter"] + 1)),
    ]
    first.force_gate, second.force_gate = 0.0, 1.0
    try:
        ids, mask = _prompt(batch)
        out = generate(model, None, ids, mask, max_new_tokens=3)
    finally:
        for h in hooks:
            h.remove()
        first.force_gate = second.force_gate = None
    assert not out.run[..., 0].any() and out.run[..., 1].all()
    assert calls == {"q": 0, "o": 0, "mlp": 0, "adapter": 0}
