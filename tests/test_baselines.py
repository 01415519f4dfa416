"""Baselines and the `method` group: early exit, static removal, random skip, MindSkip, method dispatch and
config validation, and train + eval end to end for every method and ablation config on a tiny model."""

import json

import pytest
import torch

from src.flexidepth import FlexiDepthConfig, flexi_layers, parameter_counts, routed_forward
from src.flexidepth.flops import layer_macs, model_macs_per_token
from src.flexidepth.generation import generate
from src.methods import MethodConfigError, build_method, method_macs
from src.methods.early_exit import early_exit_layers
from src.methods.mindskip import MindSkipLayer, inject_mindskip
from src.methods.random_skip import RandomGate, uniform_run_rates
from src.methods.removal import remove_layers, resolve_k
from tests.conftest import tiny_model
from tests.helpers.configs import compose_tiny


def _ids(batch=2, seq=12, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


# ---------------------------------------------------------------------------------------- k matching
def test_k_is_scaled_from_32_layers():
    assert resolve_k(None, 4, 32) == 4 and resolve_k(None, 8, 32) == 8
    assert resolve_k(None, 4, 30) == 4 and resolve_k(None, 8, 30) == 8  # SmolLM2: 3.75 -> 4, 7.5 -> 8
    assert resolve_k(None, 8, 40) == 10 and resolve_k(None, 4, 4) == 1
    assert resolve_k(3, 8, 30) == 3  # an explicit k wins
    assert resolve_k(None, None, 30) is None


def test_method_config_errors_name_the_key():
    with pytest.raises(MethodConfigError, match="method.name='nope'"):
        build_method({"name": "nope"})
    with pytest.raises(MethodConfigError, match="method.kk"):
        build_method({"name": "shortgpt", "k32": 4, "kk": 1})
    with pytest.raises(MethodConfigError, match="method.k must be"):
        build_method({"name": "early_exit", "k": -1})
    with pytest.raises(MethodConfigError, match="needs method.k"):
        build_method({"name": "laco"})
    with pytest.raises(MethodConfigError, match="method.merge_size"):
        build_method({"name": "laco", "k": 2, "merge_size": 1})
    with pytest.raises(MethodConfigError, match="method.calibration.txts"):
        build_method({"name": "shortgpt", "k": 2, "calibration": {"txts": 3}})
    model = tiny_model()
    with pytest.raises(MethodConfigError, match="pass ckpt_path"):
        build_method({"name": "flexidepth"}).apply(model)
    with pytest.raises(MethodConfigError, match="ckpt_path is not used by method=early_exit"):
        build_method({"name": "early_exit", "k": 1}).apply(model, ckpt="/x")
    assert not hasattr(model, "flexidepth")  # nothing touched on error


# ---------------------------------------------------------------------------------------- early exit
def test_early_exit_at_the_last_layer_is_the_base_model():
    model = tiny_model(layers=4)
    ids = _ids()
    base = _logits(model, ids)
    applied = build_method({"name": "early_exit", "k": 0}).apply(model)
    assert applied.removed == [] and not hasattr(model, "flexidepth")
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)


def test_early_exit_equals_final_norm_and_head_on_an_intermediate_state():
    model = tiny_model(layers=5)
    ids = _ids()
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # [emb, after layer 0, ...]
        expected = model.lm_head(model.model.norm(hidden[3]))  # exit after 3 layers = L - k with k = 2
    applied = build_method({"name": "early_exit", "k": 2}).apply(model)
    assert applied.removed == [3, 4] and applied.label == "early_exit_k2"
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    out = routed_forward(model, ids)
    assert torch.all(out.routes.layers_used == 3)
    assert early_exit_layers(30, 8) == list(range(22, 30))
    with pytest.raises(ValueError, match="0 <= k < 4"):
        early_exit_layers(4, 4)


def test_removed_layers_are_identity_in_cached_generation_too():
    model = tiny_model(layers=4)
    ref = tiny_model(layers=4)
    ids = _ids(batch=2, seq=6)
    remove_layers(model, [1, 3])
    assert all(not p.requires_grad for p in model.parameters())
    # the reference deletes the layers outright (no cache entries for them)
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[0], ref.model.layers[2]])
    ref.model.layers[1].self_attn.layer_idx = 1
    ref.config.num_hidden_layers = 2
    ref.config.layer_types = ref.config.layer_types[:2] if getattr(ref.config, "layer_types", None) else None
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=1e-5, atol=1e-5)
    a = generate(model, input_ids=ids, max_new_tokens=5)
    b = generate(ref, input_ids=ids, max_new_tokens=5)
    assert torch.equal(a.new_tokens, b.new_tokens)
    assert torch.all(a.layers_used[a.valid] == 2)


# ---------------------------------------------------------------------------------------- random skip
def test_random_skip_realises_its_rate_and_is_seeded():
    model = tiny_model(layers=6)
    applied = build_method({"name": "random_skip", "k": 1.5, "seed": 3}).apply(
        model, skip=FlexiDepthConfig(layers="2:6")
    )
    assert applied.k == pytest.approx(1.5)
    assert applied.details["run_rates"] == {i: pytest.approx(1 - 1.5 / 4) for i in range(2, 6)}
    ids = _ids(batch=8, seq=256)
    out = routed_forward(model, ids)
    frac = out.routes.layer_run_fraction
    assert torch.allclose(frac, torch.full_like(frac, 0.625), atol=0.03), frac
    assert float(out.routes.layers_skipped_mean) == pytest.approx(1.5, abs=0.06)
    # decisions are independent per token, not constant per sequence
    assert (
        0.3 < out.routes.run[..., 0].float().mean(1).min() and out.routes.run[0, :, 0].unique().numel() == 2
    )
    # same seed: same decisions
    other = tiny_model(layers=6)
    build_method({"name": "random_skip", "k": 1.5, "seed": 3}).apply(
        other, skip=FlexiDepthConfig(layers="2:6")
    )
    assert torch.equal(routed_forward(other, ids).routes.run, out.routes.run)
    with pytest.raises(ValueError, match="run rates"):
        RandomGate({2: 1.5})
    with pytest.raises(ValueError, match="k=5"):
        uniform_run_rates([2, 3, 4, 5], 5)


def test_random_skip_with_checkpoint_matches_its_measured_rates(tmp_path, monkeypatch):
    from src.flexidepth import inject, save_flexidepth
    from src.methods.random_skip import measured_run_rates

    trained = tiny_model(layers=4)
    inject(trained, FlexiDepthConfig(tau=0.5))
    with torch.no_grad():  # layer 2 runs everything, layer 3 runs about half (bias 0, weight ~ random)
        flexi_layers(trained)[0].router.head.weight.zero_()
        flexi_layers(trained)[0].router.bias.fill_(5.0)
        flexi_layers(trained)[1].router.bias.fill_(0.0)
        torch.nn.init.normal_(flexi_layers(trained)[1].router.head.weight, std=3.0)
    save_flexidepth(trained, tmp_path / "ckpt")
    batches = [(_ids(batch=4, seq=64, seed=s), torch.ones(4, 64, dtype=torch.long)) for s in range(3)]
    target = measured_run_rates(trained, batches)
    assert target[2] == 1.0 and 0.05 < target[3] < 0.95

    model = tiny_model(layers=4)
    from src.methods import random_skip

    monkeypatch.setattr(random_skip, "calibration_batches", lambda tok, calibration: batches)
    applied = build_method({"name": "random_skip", "seed": 1}).apply(
        model, tokenizer=object(), ckpt=tmp_path / "ckpt"
    )
    assert applied.label == "random_skip_matched"
    assert applied.details["run_rates"] == pytest.approx(target)
    out = routed_forward(model, _ids(batch=8, seq=256, seed=9))
    assert float(out.routes.layer_run_fraction[0]) == 1.0
    assert float(out.routes.layer_run_fraction[1]) == pytest.approx(target[3], abs=0.04)
    # the checkpoint's adapters serve the skip path
    sd, ref = model.state_dict(), trained.state_dict()
    assert torch.equal(
        sd["model.layers.3.adapter.down_proj.weight"], ref["model.layers.3.adapter.down_proj.weight"]
    )


# ---------------------------------------------------------------------------------------- MindSkip
def test_mindskip_gate_is_per_sequence_and_ignores_padding():
    model = tiny_model(layers=4)
    inject_mindskip(model, FlexiDepthConfig(adapter="none", router="linear"))
    assert all(isinstance(layer, MindSkipLayer) for layer in flexi_layers(model))
    with torch.no_grad():
        for layer in flexi_layers(model):
            torch.nn.init.normal_(layer.router.head.weight, std=1.0)
    ids = _ids(batch=2, seq=10)
    mask = torch.ones_like(ids)
    out = routed_forward(model, ids, mask)
    g = out.routes.gates
    assert torch.allclose(g, g[:, :1].expand_as(g))  # one gate per sequence and layer
    # right padding does not change the real tokens' gate or logits
    padded = torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], 1)
    pmask = torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], 1)
    out_p = routed_forward(model, padded, pmask)
    torch.testing.assert_close(out_p.routes.gates[:, :10], g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_p.logits[:, :10], out.logits, rtol=1e-4, atol=1e-4)
    counts = parameter_counts(model)
    assert counts["trainable"] == counts["router"] == 2 * (64 + 1) and counts["adapter"] == 0
    with pytest.raises(ValueError, match="skip.adapter=none"):
        inject_mindskip(tiny_model(), FlexiDepthConfig())


def test_mindskip_skips_attention_only():
    model, ref = tiny_model(layers=3), tiny_model(layers=3)
    inject_mindskip(model, FlexiDepthConfig(adapter="none", router="linear", layers=[2]))
    ids = _ids()
    base = _logits(ref, ids)
    for layer in flexi_layers(model):
        layer.force_gate = 1.0  # run with g = 1: the base layer
    torch.testing.assert_close(_logits(model, ids), base, rtol=1e-5, atol=1e-5)
    for layer in flexi_layers(model):
        layer.force_gate = 0.0  # skip: attention gone, FFN still there
    blk = ref.model.layers[2]

    def attn_free(module, args, kwargs, output):
        x = kwargs.get("hidden_states", args[0] if args else None)
        return x + blk.mlp(blk.post_attention_layernorm(x))

    handle = blk.register_forward_hook(attn_free, with_kwargs=True)
    try:
        expected = _logits(ref, ids)
    finally:
        handle.remove()
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_mindskip_router_learns_from_the_skip_loss():
    model = tiny_model(layers=4)
    inject_mindskip(model, FlexiDepthConfig(adapter="none", router="linear", router_init_bias=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    ids = _ids(batch=4, seq=16)
    first = None
    for _ in range(10):
        out = routed_forward(model, ids, labels=ids)
        loss = out.lm_loss + 1.0 * out.routes.skip_loss
        first = first if first is not None else float(out.routes.skip_loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(routed_forward(model, ids).routes.skip_loss) < first


# ---------------------------------------------------------------------------------------- FLOPs
def test_method_macs_per_method():
    from src.methods import AppliedMethod
    from tests.conftest import llama3_8b_config

    cfg = llama3_8b_config()
    base = model_macs_per_token(cfg)
    lay = layer_macs(cfg)
    static = method_macs(cfg, AppliedMethod("shortgpt", "shortgpt_k8", 8, list(range(8))), 8.0)
    assert static["analytic_macs_saved_frac"] == pytest.approx(8 * lay.full / base)
    fcfg = FlexiDepthConfig()
    flexi = method_macs(cfg, AppliedMethod("flexidepth", "flexidepth", flexi_cfg=fcfg), 8.0)
    assert flexi["macs_per_token"] == pytest.approx(model_macs_per_token(cfg, fcfg, 8.0))
    ms_cfg = FlexiDepthConfig(adapter="none", router="linear")
    ms = method_macs(cfg, AppliedMethod("mindskip", "mindskip", flexi_cfg=ms_cfg), 8.0)
    ms_lay = layer_macs(cfg, ms_cfg)
    assert ms["macs_per_token"] == pytest.approx(base + 16 * ms_lay.router - 8 * (lay.q + lay.o))
    assert (
        static["analytic_macs_saved_frac"]
        > flexi["analytic_macs_saved_frac"]
        > ms["analytic_macs_saved_frac"]
    )


# ---------------------------------------------------------------------------------------- end to end
def _eval_cfg(overrides, out):
    quick = [
        "eval.n_per_task=1",
        "eval.max_new_tokens=3",
        "eval.ppl_max_articles=1",
        "eval.ppl_max_length=32",
        "eval.tasks=[copy,addition]",
    ]
    return compose_tiny("evaluate", [*quick, *overrides], out)


SMALL_CAL = ["method.calibration.texts=2", "method.calibration.max_length=32"]
UNTRAINED = {
    "shortgpt": ["method=shortgpt", "method.k=1", *SMALL_CAL],
    "laco": ["method=laco", "method.k=1", *SMALL_CAL],
    "early_exit": ["method=early_exit", "method.k=1"],
    "random_skip": ["method=random_skip", "method.k=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(UNTRAINED))
def test_untrained_method_eval_end_to_end(name, tmp_path):
    from src.eval.__main__ import run

    overrides = UNTRAINED[name]
    res = run(_eval_cfg(overrides, tmp_path / "eval"))
    again = run(_eval_cfg(overrides, tmp_path / "again"))
    label = res["system"]
    assert set(res["tasks"]) == {"base", label} and label.startswith(name)
    skipped = res["layers"][label]["layers_skipped_scored"]
    if name == "random_skip":
        assert 0.0 <= skipped <= 2.0
    else:
        assert skipped == pytest.approx(1.0) and len(res["method"]["removed"]) == 1
        assert res["method"]["removed"] == again["method"]["removed"]  # calibration is deterministic
    assert res["layers"]["base"]["layers_used_scored"] == 4.0
    assert "retention" in res and (tmp_path / "eval" / "results.md").is_file()
    # the base's entropy is recorded under routing off, except after LaCo's merges (the base is gone)
    from src.eval import load_depthmap

    entropy = load_depthmap(tmp_path / "eval" / "depthmap.parquet")["base_entropy"]
    assert all(h is None for h in entropy) if name == "laco" else any(h is not None for h in entropy)
    analysis = json.loads((tmp_path / "eval" / "analysis.json").read_text())
    assert (analysis["spearman"]["entropy"]["n"] == 0) == (name == "laco")


TRAINED = {
    "flexidepth": [],
    "mindskip": ["method=mindskip"],
    "linear_router": ["skip=linear_router"],
    "no_adapter": ["skip=no_adapter"],
    "no_kv": ["skip=no_kv"],
    "adapter_rank": ["skip.adapter_rank=8"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAINED))
def test_trained_method_and_ablation_train_and_eval_end_to_end(name, tmp_path):
    from src.eval.__main__ import run
    from src.flexidepth.checkpoint import read_checkpoint_config
    from src.train import train
    from tests.test_train import compose_cfg

    overrides = TRAINED[name]
    metrics = train(compose_cfg(["debug=tiny", "logger=none", *overrides], tmp_path / "train"))
    assert metrics["val/ppl"] > 1
    meta = read_checkpoint_config(tmp_path / "train" / "flexidepth")
    method = "mindskip" if name == "mindskip" else "flexidepth"
    assert meta["method"] == method
    res = run(_eval_cfg([f"ckpt_path={tmp_path / 'train'}", "eval.tau=0.99"], tmp_path / "eval"))
    assert res["system"] == method and res["method"]["name"] == method
    # tau = 0.99 is above every freshly initialised gate: both routed layers are skipped
    assert res["layers"][method]["layers_skipped_scored"] == pytest.approx(2.0)
    assert res["flops"]["scored"]["analytic_macs_saved_frac"] > 0


def test_tau_for_k_sets_the_threshold_that_skips_k_layers():
    from src.flexidepth import inject, set_tau
    from src.flexidepth.calibrate import tau_for_k

    model = tiny_model(layers=6)
    inject(model, FlexiDepthConfig(layers="2:6"))
    with torch.no_grad():
        for layer in flexi_layers(model):
            torch.nn.init.normal_(layer.router.head.weight, std=2.0)
    batches = [(_ids(batch=4, seq=64, seed=s), torch.ones(4, 64, dtype=torch.long)) for s in range(2)]
    for k in (1.0, 2.5):
        set_tau(model, tau_for_k(model, batches, k))
        skipped = [
            float(routed_forward(model, ids, mask).routes.layers_skipped_mean) for ids, mask in batches
        ]
        assert sum(skipped) / len(skipped) == pytest.approx(k, abs=0.02)
    assert tau_for_k(model, batches, 0) == 0.0 and tau_for_k(model, batches, 4) == 1.0


def test_mindskip_checkpoint_round_trip_goes_through_the_registry(tmp_path):
    from src.flexidepth import load_flexidepth, save_flexidepth

    trained = tiny_model(layers=4)
    inject_mindskip(trained, FlexiDepthConfig(adapter="none", router="linear"))
    with torch.no_grad():
        for layer in flexi_layers(trained):
            torch.nn.init.normal_(layer.router.head.weight, std=1.0)
    save_flexidepth(trained, tmp_path / "ms", extra={"method": "mindskip"})
    with pytest.raises(ValueError, match="method=mindskip checkpoint"):
        load_flexidepth(tiny_model(layers=4), tmp_path / "ms")  # would build FlexiDepth layers otherwise
    model = tiny_model(layers=4)
    applied = build_method({"name": "mindskip"}).apply(model, ckpt=tmp_path / "ms")
    assert applied.label == "mindskip" and all(isinstance(m, MindSkipLayer) for m in flexi_layers(model))
    ids = _ids()
    torch.testing.assert_close(routed_forward(model, ids).logits, routed_forward(trained, ids).logits)
