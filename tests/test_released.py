"""The released recipe end to end (issue 15): release-faithful init, the alpha relation, export to the released
checkpoint layout, and a tiny two-stage run (stage 1, then stage 2 warm-started) on local files."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file

from src.config.commands import TrainCommand
from src.config.released import describe_alpha, released_alpha
from src.config.schemas import load
from src.flexidepth import (
    FlexiDepthConfig,
    export_released,
    flexi_layers,
    inject,
    load_released,
    released_config,
    routed_forward,
)
from src.flexidepth.checkpoint import RELEASED_CONFIG, RELEASED_WEIGHTS, released_state_dict
from src.models.config import ModelConfig
from tests.conftest import tiny_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")
RELEASED_NAMES = {
    "router.router_enc.weight",
    "router.router_norm.weight",
    "router.router_dec.weight",
    "router.router_head.weight",
    "router_proj.gate_proj.weight",
    "router_proj.down_proj.weight",
    "router_proj.up_proj.weight",
}


def compose_train(overrides, output_dir=None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or "/tmp/flexidepth-unused")
    return cfg


def randomise(model, seed=1):
    """Give every router/adapter tensor random values (a 'trained' model), bias 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".router." in f".{name}" or ".adapter." in f".{name}":
                p.copy_(0.0 if name.endswith("router.bias") else torch.randn(p.shape, generator=g) * 0.3)
    return model


# ---------------------------------------------------------------------------------------------- init
def test_released_init_starts_near_half_with_a_random_adapter():
    torch.manual_seed(0)
    model = inject(tiny_model("llama"), FlexiDepthConfig(router_bias=False, init="released"))
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        out = routed_forward(model, ids)
    gates, run = out.routes.gates, out.routes.run
    assert abs(float(gates.mean()) - 0.5) < 0.1 and float(gates.std()) > 1e-3  # near 0.5, not constant
    assert 0.1 < float(run.float().mean()) < 0.9  # some tokens run, some skip
    for layer in flexi_layers(model):
        assert layer.router.bias is None
        # random, not the identity skip path
        assert float(layer.adapter.down_proj.weight.detach().abs().sum()) > 0
        u = torch.randn(1, 3, 64)
        assert float(layer.adapter(u).detach().abs().max()) > 0

    ours = inject(tiny_model("llama"), FlexiDepthConfig())  # near_base: gates start at sigmoid(3)
    with torch.no_grad():
        g = routed_forward(ours, ids).routes.gates
    torch.testing.assert_close(g, torch.full_like(g, torch.sigmoid(torch.tensor(3.0)).item()))
    assert all(float(layer.adapter.down_proj.weight.abs().sum()) == 0 for layer in flexi_layers(ours))
    with pytest.raises(ValueError, match=r"skip\.init"):
        FlexiDepthConfig(init="zeros").validate()


def test_released_init_with_bias_sets_it_to_zero_and_bf16_params():
    model = inject(
        tiny_model("llama"), FlexiDepthConfig(router_bias=True, init="released", param_dtype="bfloat16")
    )
    for layer in flexi_layers(model):
        assert float(layer.router.bias) == 0.0 and layer.router.head.weight.abs().sum() > 0
        assert (
            layer.router.enc.weight.dtype == torch.bfloat16
            and layer.adapter.up_proj.weight.dtype == torch.bfloat16
        )


# ---------------------------------------------------------------------------------------------- alpha
def test_released_alpha_relation_and_report(capsys):
    assert released_alpha(1e-4, 8, "reproduce") == pytest.approx(8e-4)
    assert released_alpha(1e-4, 8, "face") == pytest.approx(1e-4)
    with pytest.raises(ValueError, match=r"released_alpha\.use"):
        released_alpha(1e-4, 8, "double")
    with pytest.raises(ValueError, match=r"released_alpha\.processes"):
        released_alpha(1e-4, 0, "face")

    for stage, face in (("1", 1e-4), ("2", 1e-5)):
        cfg = load(compose_train([f"experiment=released_stage{stage}_llama3_8b"]), TrainCommand)
        cfg.validate()
        assert cfg.loss.alpha == pytest.approx(8 * face)  # default: reproduce the released behaviour
        assert (cfg.skip.router_bias, cfg.skip.init, cfg.skip.param_dtype) == (False, "released", "bfloat16")
        line = describe_alpha(cfg.released_alpha, cfg.loss.alpha)
        assert "released_alpha.use=reproduce" in line and f"{8 * face:g}" in line and f"{face:g}" in line
        face_cfg = compose_train([f"experiment=released_stage{stage}_llama3_8b", "released_alpha.use=face"])
        assert face_cfg.loss.alpha == pytest.approx(face)
        assert "released_alpha.use=face" in describe_alpha(face_cfg.released_alpha, face_cfg.loss.alpha)
    stage2 = compose_train(["experiment=released_stage2_llama3_8b"])
    assert OmegaConf.to_container(stage2.data.conversation_roles) == {"human": "user", "gpt": "assistant"}
    assert stage2.data.source == "mlabonne/open-perfectblend"
    # overriding the alpha directly would make the printed relation wrong: refused, naming both keys
    for override in ("loss.alpha=0.5", "skip.alpha=0.5"):  # skip.alpha: the deprecated alias
        clash = load(compose_train(["experiment=released_stage1_llama3_8b", override]), TrainCommand)
        clash.translate_skip_alpha()  # what src.train does first
        with pytest.raises(ValueError, match=r"loss\.alpha=0\.5 but released_alpha\.use=reproduce"):
            describe_alpha(clash.released_alpha, clash.loss.alpha)
    plain = load(compose_train([]), TrainCommand)
    assert plain.released_alpha is None and describe_alpha(None, plain.loss.alpha) is None  # others: nothing


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_export_released_round_trip_is_exact(tmp_path, family):
    cfg = FlexiDepthConfig(router_bias=False, tau=0.45, layers="1:4", adapter_rank=12)
    model = randomise(inject(tiny_model(family), cfg))
    folder = export_released(model, tmp_path / "released")
    tensors = load_file(str(folder / RELEASED_WEIGHTS))
    assert {k.split(".", 3)[3] for k in tensors} == RELEASED_NAMES
    assert len(tensors) == 7 * 3
    assert tensors["model.layers.1.router.router_enc.weight"].shape == (4, 64)
    assert tensors["model.layers.1.router_proj.down_proj.weight"].shape == (12, 64)  # W_u
    assert tensors["model.layers.1.router_proj.up_proj.weight"].shape == (64, 12)  # W_o
    meta = json.loads((folder / RELEASED_CONFIG).read_text())
    assert meta["tau"] == 0.45 and meta["routed_layers"] == [1, 2, 3]
    assert (meta["router_width"], meta["adapter_width"]) == (4, 12)
    assert (meta["router_reduction_factor"], meta["proj_reduction_factor"]) == (16, None)  # 128 % 12 != 0

    fresh_cfg = released_config(folder)
    assert (fresh_cfg.tau, fresh_cfg.adapter_rank, fresh_cfg.layers) == (0.45, 12, [1, 2, 3])
    fresh = load_released(inject(tiny_model(family), fresh_cfg), folder)
    ids = torch.randint(0, 1000, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        a, b = routed_forward(model, ids, mask), routed_forward(fresh, ids, mask)
    assert 0 < float(a.routes.run.float().mean()) < 1  # both branches exercised
    assert torch.equal(a.routes.gates, b.routes.gates) and torch.equal(a.routes.run, b.routes.run)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    # a fresh model that kept our bias (set to 0 by load_released) computes the same function
    with_bias = load_released(
        inject(tiny_model(family), FlexiDepthConfig(tau=0.45, layers="1:4", adapter_rank=12)), folder
    )
    with torch.no_grad():
        torch.testing.assert_close(routed_forward(with_bias, ids, mask).logits, a.logits, rtol=0, atol=0)
    # bf16 export, as released: same names, bf16 values
    bf16 = export_released(model, tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((bf16 / RELEASED_CONFIG).read_text())["dtype"] == "bfloat16"


def test_adapter_and_router_follow_the_released_formulas_through_the_key_map():
    """Released FDProj: up_proj(silu(gate_proj(x)) * down_proj(x)); released router:
    head(dec(tanh(RMSNorm(enc(z))))). Computed from the released tensors by name, compared with our modules."""
    model = inject(tiny_model("llama"), FlexiDepthConfig(router_bias=False))
    d, dr, m = 64, 4, 8
    g = torch.Generator().manual_seed(3)
    released = {}
    for i in model.flexidepth.layer_indices:
        p = f"model.layers.{i}."
        released[p + "router.router_enc.weight"] = torch.randn(dr, d, generator=g)
        released[p + "router.router_norm.weight"] = torch.rand(dr, generator=g) + 0.5
        released[p + "router.router_dec.weight"] = torch.randn(d, dr, generator=g)
        released[p + "router.router_head.weight"] = torch.randn(1, d, generator=g)
        released[p + "router_proj.gate_proj.weight"] = torch.randn(m, d, generator=g)
        released[p + "router_proj.down_proj.weight"] = torch.randn(m, d, generator=g)
        released[p + "router_proj.up_proj.weight"] = torch.randn(d, m, generator=g)
    load_released(model, released)
    x = torch.randn(2, 5, d, generator=g)
    eps = model.config.rms_norm_eps
    for layer in flexi_layers(model):
        p = f"model.layers.{layer.layer_index}."
        r = {k.removeprefix(p): v for k, v in released.items() if k.startswith(p)}
        adapter = F.linear(
            F.silu(F.linear(x, r["router_proj.gate_proj.weight"]))
            * F.linear(x, r["router_proj.down_proj.weight"]),
            r["router_proj.up_proj.weight"],
        )
        torch.testing.assert_close(layer.adapter(x), adapter, rtol=1e-5, atol=1e-5)
        h = F.linear(x, r["router.router_enc.weight"])
        h = r["router.router_norm.weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
        logit = F.linear(
            F.linear(torch.tanh(h), r["router.router_dec.weight"]), r["router.router_head.weight"]
        )
        torch.testing.assert_close(layer.router(x), logit.squeeze(-1), rtol=1e-5, atol=1e-5)
    # and export gives the released tensors back, bit for bit
    exported = released_state_dict(model)
    assert set(exported) == set(released)
    assert all(torch.equal(exported[k], released[k]) for k in released)


@pytest.mark.parametrize(
    "cfg, match",
    [
        (FlexiDepthConfig(router="linear", router_bias=False), r"skip\.router='linear'"),
        (FlexiDepthConfig(adapter="none", router_bias=False), r"skip\.adapter='none'"),
        (FlexiDepthConfig(gate_mode="ste", router_bias=False), r"skip\.gate_mode='ste'"),
        (FlexiDepthConfig(kv_for_skipped=False, router_bias=False), r"skip\.kv_for_skipped"),
        (FlexiDepthConfig(), r"model\.layers\.2\.router\.bias=\[3\.0\].*skip\.router_bias=false"),
    ],
)
def test_export_refuses_what_the_released_layout_cannot_hold(tmp_path, cfg, match):
    model = inject(tiny_model("llama"), cfg)
    with pytest.raises(ValueError, match=match):
        export_released(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- two stages
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _stage_files(tmp_path):
    pairs = [(f"Repeat: word{i} word{i + 1}", f"word{i} word{i + 1}") for i in range(48)]
    return {
        "messages": _write_jsonl(
            tmp_path / "tulu_like.jsonl",
            [
                {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in pairs
            ],
        ),
        "text": _write_jsonl(
            tmp_path / "plain.jsonl",
            [{"text": f"{q}. {a}. The end of document {i}."} for i, (q, a) in enumerate(pairs)],
        ),
        "conversations": _write_jsonl(
            tmp_path / "perfectblend_like.jsonl",
            [
                {
                    "conversations": [
                        {"from": "system", "value": "Answer briefly."},
                        {"from": "human", "value": q},
                        {"from": "gpt", "value": a},
                    ],
                    "source": "unit",
                }
                for q, a in pairs
            ],
        ),
    }


TINY = ["model=tiny_llama", "trainer=cpu", "trainer.devices=1", "debug=tiny", "logger=none"]


@pytest.mark.parametrize("stage1_format", ["messages", "text"])
def test_two_stage_released_recipe_on_local_files(tmp_path, capsys, stage1_format):
    """Stage 1 (released_stage1 experiment, local messages or text file), then stage 2 (released_stage2,
    ShareGPT file through data=open_perfectblend's role mapping) warm-started from stage 1's export; the
    stage-2 model then round-trips exactly through the released layout."""
    from src.flexidepth import load_flexidepth
    from src.models.loader import load_base_model
    from src.train import train

    files = _stage_files(tmp_path)
    s1 = compose_train(
        ["experiment=released_stage1_llama3_8b", *TINY, f"data.source={files[stage1_format]}"],
        tmp_path / "s1",
    )
    train(s1)
    s1_out = tmp_path / "s1" / "flexidepth"
    s1_weights = load_file(str(s1_out / "flexidepth.safetensors"))
    assert s1_weights and not any(k.endswith("router.bias") for k in s1_weights)  # skip.router_bias=false
    assert all(v.dtype == torch.bfloat16 for v in s1_weights.values())  # skip.param_dtype=bfloat16
    assert "loss.alpha=0.0008: released_alpha.use=reproduce" in capsys.readouterr().out

    s2 = compose_train(
        [
            "experiment=released_stage2_llama3_8b",
            *TINY,
            f"data.source={files['conversations']}",
            f"init_from={s1_out}",
            "released_alpha.use=face",
        ],
        tmp_path / "s2",
    )
    assert s2.data.conversation_roles.gpt == "assistant" and "system" not in s2.data.conversation_roles
    metrics = train(s2)
    assert "loss.alpha=1e-05: released_alpha.use=face" in capsys.readouterr().out
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    s2_weights = load_file(str(tmp_path / "s2" / "flexidepth" / "flexidepth.safetensors"))
    assert set(s2_weights) == set(s1_weights)
    # warm start: 6 steps at lr 1e-4 move each weight by well under 0.01; a fresh init would be far away
    diffs = [float((s2_weights[k].float() - s1_weights[k].float()).abs().max()) for k in s1_weights]
    assert max(diffs) < 0.01 and any(d > 0 for d in diffs)

    model = load_flexidepth(
        load_base_model(ModelConfig(**OmegaConf.to_container(s2.model, resolve=True))),
        tmp_path / "s2" / "flexidepth",
    )
    folder = export_released(model, tmp_path / "released")
    fresh = load_released(
        inject(
            load_base_model(ModelConfig(**OmegaConf.to_container(s2.model, resolve=True))),
            released_config(folder),
        ),
        folder,
    )
    ids = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        a, b = routed_forward(model, ids), routed_forward(fresh, ids)
    assert torch.equal(a.routes.gates, b.routes.gates) and torch.equal(a.routes.run, b.routes.run)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert released_config(folder).param_dtype == "bfloat16"  # stage 2 trained bf16 parameters
