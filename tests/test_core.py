"""FlexiDepth core: parity, skip path, KV preservation, freezing, loss/statistics, checkpoints, validation."""

import copy

import pytest
import torch

from src.flexidepth import (
    FlexiDepthConfig,
    FlexiDepthConfigError,
    UnsupportedArchitectureError,
    flexi_layers,
    forced_gates,
    inject,
    load_flexidepth,
    load_released,
    parameter_counts,
    routed_forward,
    save_flexidepth,
    set_routing,
)
from src.flexidepth.families import project_kv
from tests.conftest import tiny_model


def _ids(batch=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (batch, seq), generator=g)


def _randomize_adapters(model, std=0.2):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for layer in flexi_layers(model):
            for p in layer.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------------- parity
def test_routing_disabled_equals_base(family):
    base = tiny_model(family)
    model = inject(copy.deepcopy(base), FlexiDepthConfig())
    set_routing(model, False)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-5)


def test_gate_forced_to_one_equals_base(family):
    base = tiny_model(family)
    model = inject(copy.deepcopy(base), FlexiDepthConfig())
    _randomize_adapters(model)  # the adapter must not leak in when every token runs
    ids = _ids()
    with torch.no_grad(), forced_gates(model, 1.0):
        out = routed_forward(model, ids)
    torch.testing.assert_close(out.logits, base(ids).logits, rtol=0, atol=1e-5)
    assert out.routes.run.all()


def test_eager_attention_parity():
    base = tiny_model("llama", attn="eager")
    model = inject(copy.deepcopy(base), FlexiDepthConfig(kv_for_skipped=False))
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding gives a float mask with eager attention
    with torch.no_grad(), forced_gates(model, 1.0):
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits, rtol=0, atol=1e-5
        )


def test_state_dict_keys_unchanged_and_base_weights_load(family):
    base = tiny_model(family)
    base_keys = set(base.state_dict())
    model = inject(copy.deepcopy(base), FlexiDepthConfig())
    keys = set(model.state_dict())
    assert base_keys <= keys
    extra = keys - base_keys
    assert extra and all(".router." in k or ".adapter." in k for k in extra)
    result = model.load_state_dict(base.state_dict(), strict=False)  # HF weights still load by name
    assert not result.unexpected_keys and set(result.missing_keys) == extra


# ---------------------------------------------------------------------------------------------- skip path
def _hand_all_skip(model, ids):
    """Reference for all routed layers skipping: y = x + Adapter(N_f(x)) (g = 0 so 1 - g = 1)."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = inner.rotary_emb(h, position_ids=pos)
    routed = set(model.flexidepth.layer_indices)
    for i, layer in enumerate(inner.layers):
        if i in routed:
            h = h + layer.adapter(layer.post_attention_layernorm(h))
        else:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
    return model.lm_head(inner.norm(h))


def test_all_skip_equals_adapter_path_and_keeps_kv(family):
    model = inject(tiny_model(family), FlexiDepthConfig())
    _randomize_adapters(model)
    ids = _ids(batch=1, seq=10)
    with torch.no_grad(), forced_gates(model, 0.0):
        out = routed_forward(model, ids, use_cache=True)
        torch.testing.assert_close(out.logits, _hand_all_skip(model, ids), rtol=1e-5, atol=1e-5)
    assert not out.routes.run.any()
    # every routed layer still cached K/V for every position, equal to the K/V of its own hidden state
    cache = out.cache
    for i in model.flexidepth.layer_indices:
        assert cache.layers[i].keys.shape[-2] == ids.shape[1]
    captured = {}
    layer = model.model.layers[model.flexidepth.layer_indices[0]]
    hook = layer.register_forward_pre_hook(
        lambda m, args, kw: captured.update(x=args[0], pe=kw["position_embeddings"]), with_kwargs=True
    )
    with torch.no_grad(), forced_gates(model, 0.0):
        out = routed_forward(model, ids, use_cache=True)
    hook.remove()
    with torch.no_grad():
        k, v = project_kv(
            model.flexidepth.family, layer.self_attn, layer.input_layernorm(captured["x"]), *captured["pe"]
        )
    torch.testing.assert_close(out.cache.layers[layer.layer_index].keys, k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.cache.layers[layer.layer_index].values, v, rtol=1e-5, atol=1e-5)


def _skip_position(pos):
    return lambda z, idx: torch.where(torch.arange(z.shape[1]) == pos, 0.0, 1.0).expand(z.shape[:2])


@pytest.mark.parametrize("kv_for_skipped", [True, False])
def test_kv_for_skipped_controls_visibility(kv_for_skipped):
    """Token 2 skips every layer; without its K/V no later token can depend on it."""
    model = inject(tiny_model("llama"), FlexiDepthConfig(layers="0:4", kv_for_skipped=kv_for_skipped))
    ids = _ids(batch=1, seq=8)
    other = ids.clone()
    other[0, 2] = (ids[0, 2] + 7) % 1000
    with torch.no_grad(), forced_gates(model, _skip_position(2)):
        a, b = model(ids).logits, model(other).logits
    later_differs = not torch.allclose(a[0, 3:], b[0, 3:], atol=1e-6)
    assert later_differs == kv_for_skipped
    torch.testing.assert_close(a[0, :2], b[0, :2])  # causality


def test_kv_ablation_cached_decoding_matches_full_forward():
    model = inject(tiny_model("llama"), FlexiDepthConfig(layers="0:4", kv_for_skipped=False))
    ids = _ids(batch=1, seq=8)
    with torch.no_grad(), forced_gates(model, _skip_position(2)):
        full = model(ids).logits
    steps = []
    with torch.no_grad():
        out = None
        for t in range(ids.shape[1]):
            gate = (lambda t: lambda z, idx: torch.full(z.shape[:2], 0.0 if t == 2 else 1.0))(t)
            with forced_gates(model, gate):
                out = model(ids[:, t : t + 1], cache=None if out is None else out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- freezing
def test_only_router_and_adapter_train(family):
    model = inject(tiny_model(family), FlexiDepthConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in dict(model.named_parameters()) if ".router." in n or ".adapter." in n}
    assert trainable == expected
    idx = model.flexidepth.layer_indices
    assert {int(n.split(".")[2]) for n in trainable} == set(idx)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    _randomize_adapters(model)  # non-zero down_proj so every trainable tensor gets a gradient
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapter." in n}
    before.update(adapters_before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    out = routed_forward(model, ids, labels=ids)
    (out.lm_loss + 0.1 * out.routes.skip_loss).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


# ---------------------------------------------------------------------------------------------- loss, stats
def test_skip_loss_and_stats_by_hand_with_padding():
    model = inject(tiny_model("llama", layers=4), FlexiDepthConfig(tau=0.5))  # routed: layers 2, 3
    ids = _ids(batch=2, seq=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    table = {
        2: torch.tensor([[0.9, 0.2, 0.6, 0.5, 0.1], [0.3, 0.8, 0.7, 0.99, 0.99]]),
        3: torch.tensor([[0.4, 0.7, 0.1, 0.9, 0.6], [0.2, 0.5, 0.95, 0.99, 0.99]]),
    }
    with torch.no_grad(), forced_gates(model, lambda z, i: table[i]):
        routes = routed_forward(model, ids, attention_mask=mask).routes
    valid = [(0, t) for t in range(5)] + [(1, t) for t in range(3)]
    sums = [table[2][b, t] + table[3][b, t] for b, t in valid]
    assert torch.isclose(routes.skip_loss, torch.stack(sums).pow(2).mean())
    run = {i: table[i] > 0.5 for i in (2, 3)}
    frac = [sum(bool(run[i][b, t]) for b, t in valid) / len(valid) for i in (2, 3)]
    torch.testing.assert_close(routes.layer_run_fraction, torch.tensor(frac))
    expected_used = torch.zeros(2, 5)
    for b, t in valid:
        expected_used[b, t] = 2 + int(run[2][b, t]) + int(run[3][b, t])
    torch.testing.assert_close(routes.layers_used.float(), expected_used)
    assert torch.isclose(routes.layers_skipped_mean, torch.tensor(2 - sum(frac)))


def test_lm_loss_sum_matches_hf_mean(family):
    model = inject(tiny_model(family), FlexiDepthConfig())
    ids = _ids()
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        out = routed_forward(model, ids, labels=labels)
        hf = model(ids, labels=labels).loss
    torch.testing.assert_close(out.lm_loss, hf, rtol=1e-5, atol=1e-5)


def test_initialisation_runs_everything_and_stays_close_to_base(family):
    base = tiny_model(family)
    model = inject(copy.deepcopy(base), FlexiDepthConfig())
    ids = _ids(batch=4, seq=32)
    with torch.no_grad():
        out = routed_forward(model, ids, labels=ids)
        base_loss = base(ids, labels=ids).loss
    assert out.routes.run.all()  # skip rate 0 at tau = 0.5
    torch.testing.assert_close(
        out.routes.gates, torch.full_like(out.routes.gates, torch.sigmoid(torch.tensor(3.0)).item())
    )
    assert abs(out.lm_loss.item() - base_loss.item()) < 0.05


def test_gradient_reaches_router_through_gate_scaling():
    model = inject(tiny_model("llama"), FlexiDepthConfig(gate_mode="released"))
    model.train()
    ids = _ids()
    out = routed_forward(model, ids, labels=ids)
    out.lm_loss.backward()  # no skip loss: the gradient comes from g * FFN alone
    layer = flexi_layers(model)[0]
    assert layer.router.head.weight.grad.abs().sum() > 0
    assert layer.router.bias.grad.abs() > 0


def test_ste_gate_mode_uses_unit_weights():
    base = tiny_model("llama")
    model = inject(copy.deepcopy(base), FlexiDepthConfig(gate_mode="ste"))
    ids = _ids()
    with torch.no_grad():
        out = routed_forward(model, ids)
    torch.testing.assert_close(out.logits, base(ids).logits, rtol=0, atol=1e-5)  # all run, weight 1


def test_difference_gate_mode_value_is_the_hard_choice_and_the_gate_gradient_is_the_branch_difference():
    """gate_mode=difference: y = y_run (the unmodified layer) or y_skip = x + Adapter(N_f(x)) by the hard
    decision, and dL/dg = <dL/dy, y_run - y_skip> for every token, running or skipped."""
    base = tiny_model("llama")
    last = base.config.num_hidden_layers - 1
    model = inject(copy.deepcopy(base), FlexiDepthConfig(gate_mode="difference", layers=[last]))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)  # a non-zero adapter
    layer = flexi_layers(model)[0]
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("args", args)
        seen.setdefault("kwargs", kwargs)

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        routed_forward(model, _ids())
    handle.remove()
    args, kwargs = seen["args"], seen["kwargs"]
    x = args[0] if args else kwargs["hidden_states"]
    g = torch.linspace(0.05, 0.95, x.shape[0] * x.shape[1]).reshape(x.shape[:2]).requires_grad_(True)
    layer.force_gate = lambda z, i: g
    y = layer(*args, **kwargs)
    y = y[0] if isinstance(y, tuple) else y
    c = torch.randn_like(y)
    (y * c).sum().backward()
    layer.force_gate = None
    with torch.no_grad():
        y_run = base.model.layers[last](*args, **kwargs)
        y_run = y_run[0] if isinstance(y_run, tuple) else y_run
        y_skip = x + layer.adapter(layer.post_attention_layernorm(x))
    run = (g > layer.tau).unsqueeze(-1)
    assert run.any() and (~run).any()
    torch.testing.assert_close(y.detach(), torch.where(run, y_run, y_skip), rtol=0, atol=1e-5)
    torch.testing.assert_close(g.grad, (c * (y_run - y_skip)).sum(-1), rtol=1e-4, atol=1e-4)


def test_sampled_training_decisions_run_with_probability_g_and_inference_thresholds():
    base = tiny_model("llama")
    last = base.config.num_hidden_layers - 1
    cfg = FlexiDepthConfig(gate_mode="difference", train_decisions="sample", layers=[last])
    model = inject(copy.deepcopy(base), cfg)
    layer = flexi_layers(model)[0]
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(0))
    for value in (0.2, 0.7):
        layer.force_gate = lambda z, i, v=value: torch.full(
            z.shape[:2], v, requires_grad=torch.is_grad_enabled()
        )
        torch.manual_seed(1)
        out = routed_forward(model, ids)  # autograd on: sampled
        frac = out.routes.run.float().mean().item()
        assert abs(frac - value) < 0.04, (value, frac)  # 512 draws: 4 sigma ~ 0.04
        with torch.no_grad():
            served = routed_forward(model, ids)
        assert bool(served.routes.run.all()) == (value > cfg.tau)  # inference: g > tau for every token
    layer.force_gate = None
    with pytest.raises(FlexiDepthConfigError, match="train_decisions=sample needs skip.gate_mode=difference"):
        FlexiDepthConfig(train_decisions="sample").validate()
    with pytest.raises(FlexiDepthConfigError, match="skip.train_decisions"):
        FlexiDepthConfig(train_decisions="bernoulli").validate()


def test_unresolved_skip_node_is_refused_with_the_fix():
    from omegaconf import OmegaConf

    root = OmegaConf.create(
        {
            "skip_estimator": {"gate_mode": "difference"},
            "skip": {"gate_mode": "${oc.select:skip_estimator.gate_mode,released}"},
        }
    )
    with pytest.raises(
        FlexiDepthConfigError, match=r"unresolved interpolation in skip.gate_mode .*resolve=True"
    ):
        FlexiDepthConfig.from_dict(OmegaConf.to_container(root.skip))
    assert (
        FlexiDepthConfig.from_dict(OmegaConf.to_container(root.skip, resolve=True)).gate_mode == "difference"
    )


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip(tmp_path):
    base = tiny_model("qwen3")
    model = inject(copy.deepcopy(base), FlexiDepthConfig(tau=0.4, adapter_rank=8))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    save_flexidepth(model, tmp_path / "ckpt")
    fresh = load_flexidepth(copy.deepcopy(base), tmp_path / "ckpt")
    assert fresh.flexidepth.config.tau == 0.4 and fresh.flexidepth.config.adapter_rank == 8
    ids = _ids()
    with torch.no_grad():
        a, b = routed_forward(model, ids), routed_forward(fresh, ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert torch.equal(a.routes.run, b.routes.run)
    with pytest.raises(ValueError, match="gate_mode"):
        load_flexidepth(inject(copy.deepcopy(base), FlexiDepthConfig(gate_mode="ste")), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        load_flexidepth(tiny_model("qwen3", layers=6), tmp_path / "ckpt")


def test_run_folder_loads_like_its_checkpoint_folder(tmp_path):
    """A training run folder (checkpoint in run/flexidepth/) is accepted wherever a checkpoint folder is:
    load_flexidepth, read_checkpoint_config and the methods' apply (benchmarks and tools pass run folders)."""
    from src.flexidepth.checkpoint import read_checkpoint_config
    from src.methods import build_method

    base = tiny_model("llama")
    model = inject(copy.deepcopy(base), FlexiDepthConfig(tau=0.3))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2)
    run = tmp_path / "run"
    save_flexidepth(model, run / "flexidepth")
    assert read_checkpoint_config(run) == read_checkpoint_config(run / "flexidepth")
    ids = _ids()
    loaded = [load_flexidepth(copy.deepcopy(base), run)]
    for spec in ({"name": "flexidepth"}, {"name": "random_skip", "match_rates": False, "k": 1}):
        applied = copy.deepcopy(base)
        build_method(spec).apply(applied, ckpt=run)
        loaded.append(applied)
    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for other in loaded:
        got = {n: p for n, p in other.named_parameters() if n in want}
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    with torch.no_grad():
        torch.testing.assert_close(
            routed_forward(loaded[0], ids).logits, routed_forward(model, ids).logits, rtol=0, atol=0
        )
    with pytest.raises(FileNotFoundError, match="not a FlexiDepth checkpoint folder"):
        read_checkpoint_config(tmp_path)


def test_released_key_map_loads_synthetic_checkpoint():
    model = inject(tiny_model("llama"), FlexiDepthConfig())
    d, dr, m = 64, 4, 8
    g = torch.Generator().manual_seed(0)
    released = {}
    for i in model.flexidepth.layer_indices:
        p = f"model.layers.{i}."
        released.update(
            {
                p + "router.router_enc.weight": torch.randn(dr, d, generator=g),
                p + "router.router_norm.weight": torch.randn(dr, generator=g),
                p + "router.router_dec.weight": torch.randn(d, dr, generator=g),
                p + "router.router_head.weight": torch.randn(1, d, generator=g),
                p + "router_proj.gate_proj.weight": torch.randn(m, d, generator=g),
                p + "router_proj.down_proj.weight": torch.randn(m, d, generator=g),  # W_u
                p + "router_proj.up_proj.weight": torch.randn(d, m, generator=g),  # W_o
                p + "self_attn.q_proj.weight": torch.randn(d, d, generator=g),  # base tensors are ignored
            }
        )
    load_released(model, released)
    layer = model.model.layers[2]
    assert torch.equal(layer.router.enc.weight, released["model.layers.2.router.router_enc.weight"])
    assert torch.equal(layer.adapter.up_proj.weight, released["model.layers.2.router_proj.down_proj.weight"])
    assert torch.equal(layer.adapter.down_proj.weight, released["model.layers.2.router_proj.up_proj.weight"])
    assert layer.router.bias.item() == 0.0
    # the loaded router computes the released formula
    z = torch.randn(1, 3, d)
    r = layer.router
    h = torch.tanh(r.norm(z @ r.enc.weight.T))
    expected = (h @ r.dec.weight.T @ r.head.weight.T).squeeze(-1)
    torch.testing.assert_close(r(z), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(tau=1.5), "skip.tau"),
        (dict(router_reduction=0), "skip.router_reduction"),
        (dict(router_reduction=7), "skip.router_reduction"),
        (dict(adapter_reduction=3), "skip.adapter_reduction"),
        (dict(adapter_rank=0), "skip.adapter_rank"),
        (dict(layers=[1, 9]), "skip.layers"),
        (dict(layers="x:y"), "skip.layers"),
        (dict(router="deep"), "skip.router"),
        (dict(gate_mode="soft"), "skip.gate_mode"),
    ],
)
def test_bad_config_names_the_key_before_touching_weights(kwargs, key):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FlexiDepthConfigError, match=key.replace(".", r"\.")):
        inject(model, FlexiDepthConfig(**kwargs))
    assert not hasattr(model, "flexidepth")
    assert set(model.state_dict()) == set(before)


def test_unknown_key_rejected():
    with pytest.raises(FlexiDepthConfigError, match="skip.taux"):
        FlexiDepthConfig.from_dict({"taux": 0.5})


def test_unsupported_architecture_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        inject(model, FlexiDepthConfig())


def test_routed_layer_selection():
    cfg = FlexiDepthConfig()
    assert cfg.routed_layers(30) == list(range(15, 30))
    assert cfg.routed_layers(32) == list(range(16, 32))
    assert FlexiDepthConfig(layers="10:12").routed_layers(30) == [10, 11]
    assert FlexiDepthConfig(layers=[3, 1]).routed_layers(30) == [1, 3]


def test_parameter_counts_match_spec_formula():
    model = inject(tiny_model("llama"), FlexiDepthConfig())
    counts = parameter_counts(model)
    d, dr, m, routed = 64, 4, 8, 2
    assert counts["router"] == routed * (2 * d * dr + dr + d + 1)
    assert counts["adapter"] == routed * 3 * d * m
    assert counts["trainable"] == counts["router"] + counts["adapter"]
