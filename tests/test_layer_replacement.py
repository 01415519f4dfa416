"""method=layer_replacement (src/methods/layer_replacement.py): ShortGPT's k lowest-Block-Influence layers, each
replaced by a trained FlexiDepth adapter every token takes; a baseline in the manner of LLM-Streamline, whose
checkpoints say so and load back through the registry."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from src.flexidepth import FlexiDepthConfig
from src.flexidepth.checkpoint import CheckpointError, load_flexidepth
from src.methods import MethodConfigError, build_method, checkpoint_method
from src.methods.base import Calibration, calibration_batches
from src.methods.layer_replacement import replaceable_layers
from src.methods.shortgpt import block_influence, shortgpt_layers
from src.models.config import ModelConfig
from tests.helpers.configs import compose_tiny, settings_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = {"texts": 4, "max_length": 48, "batch_size": 2}  # the method option
CALIBRATED = Calibration(**CALIBRATION)  # small: the tiny model's BI, quickly


@pytest.fixture(scope="module")
def tokenizer():
    from src.models.tokenizer import load_tokenizer

    return load_tokenizer(
        ModelConfig(**{"name_or_path": "tiny", "tokenizer": "embedded:smollm2-135m-instruct"})
    )


def tiny_model(family="llama", layers=4):
    """conf/model/tiny_llama.yaml (the embedded tokenizer's vocabulary) at `layers` layers, random weights."""
    from src.models.loader import load_base_model

    node = OmegaConf.to_container(compose_tiny("train").model, resolve=True)
    node["arch"]["num_hidden_layers"] = layers
    return load_base_model(ModelConfig(**node))


def method(k=2):
    m = build_method({"name": "layer_replacement", "k": k, "calibration": CALIBRATION})
    return m


def make_identity(layer):
    """Zero the attention and MLP output projections: the layer returns its input (BI 0)."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def injected(tokenizer, model, k=2):
    m = method(k)
    m.tokenizer = tokenizer
    cfg = FlexiDepthConfig()
    m.inject(model, cfg)
    return m, cfg


# ------------------------------------------------------------------------------------------ the layer choice
def test_chosen_layers_are_shortgpts_on_the_same_calibration_batches(tokenizer):
    model = tiny_model("llama", layers=6)
    make_identity(model.model.layers[3])
    make_identity(model.model.layers[4])
    plain = tiny_model("llama", layers=6)
    plain.load_state_dict(model.state_dict())
    bi = block_influence(plain, calibration_batches(tokenizer, CALIBRATED))
    m, cfg = injected(tokenizer, model, k=2)
    record = m.training_record()
    assert record["block_influence"] == bi  # exact: the same function on the same batches
    assert record["layers"] == shortgpt_layers(bi, 2) == [3, 4]  # ShortGPT's own (unrestricted) choice
    assert cfg.layers == cfg.always_skip == [3, 4]  # the caller's config object, shared by the model
    assert model.flexidepth.config is cfg and model.flexidepth.layer_indices == [3, 4]
    assert record["k"] == 2 and "LLM-Streamline" in record["credit"]


def test_layer_zero_is_never_chosen_even_at_the_lowest_bi(tokenizer):
    model = tiny_model("llama", layers=4)
    make_identity(model.model.layers[0])  # BI 0: ShortGPT would drop it; the cache reads its length from it
    bi = block_influence(tiny_model_copy(model), calibration_batches(tokenizer, CALIBRATED))
    assert shortgpt_layers(bi, 1) == [0]
    m, cfg = injected(tokenizer, model, k=2)
    assert replaceable_layers(model.config) == [1, 2, 3]
    assert m.training_record()["layers"] == shortgpt_layers(bi, 2, candidates=[1, 2, 3]) == cfg.always_skip


def tiny_model_copy(model):
    other = tiny_model("llama", layers=model.config.num_hidden_layers)
    other.load_state_dict(model.state_dict())
    return other


def test_only_the_k_adapters_train(tokenizer):
    model = tiny_model("llama", layers=6)
    m, cfg = injected(tokenizer, model, k=3)
    layers = m.training_record()["layers"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.adapter.{w}.weight" for i in layers for w in ("gate_proj", "up_proj", "down_proj")
    }
    assert len(layers) == 3


# ------------------------------------------------------------------------------------------ checkpoint
def test_export_says_layer_replacement_and_loads_back_through_the_registry(tokenizer, tmp_path):
    from src.callbacks.export import ExportFlexiDepth
    from src.lit.module import FlexiDepthModule
    from src.models.loader import load_base_model

    s = settings_tiny("train", ["method=layer_replacement", "method.k=2"], tmp_path)
    m = build_method(s.method)
    m.calibration = build_method({"name": "layer_replacement", "calibration": CALIBRATION}).calibration
    model_cfg = s.model.to_dict()
    m.prepare_training(s, set())
    module = FlexiDepthModule(
        model=model_cfg,
        skip=s.skip.flexidepth(),
        optim=s.optim,
        method=m.name,
        inject_fn=m.inject,
        loss=s.loss,
    )
    module.method_details = m.training_record()
    with torch.no_grad():  # a trained-looking adapter: its output projection starts at 0
        for name, p in module.model.named_parameters():
            if ".adapter." in name:
                p.add_(0.05 * torch.randn_like(p))
    ExportFlexiDepth(str(tmp_path / "flexidepth")).on_train_end(
        SimpleNamespace(is_global_zero=True, datamodule=None, global_step=0), module
    )
    meta = json.loads((tmp_path / "flexidepth" / "flexidepth_config.json").read_text())
    assert meta["method"] == "layer_replacement" == checkpoint_method(tmp_path)
    assert meta["method_details"]["layers"] == module.model.flexidepth.layer_indices
    assert meta["method_details"]["block_influence"] == module.method_details["block_influence"]
    assert meta["flexidepth"]["always_skip"] == meta["flexidepth"]["layers"] == meta["layer_indices"]

    fresh = load_base_model(ModelConfig(**model_cfg))
    applied = build_method({"name": checkpoint_method(tmp_path)}).apply(fresh, ckpt=str(tmp_path))
    assert applied.name == applied.label == "layer_replacement"
    assert applied.details["layers"] == meta["method_details"]["layers"] and applied.k == 2.0
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    module.model.eval()
    fresh.eval()
    with torch.no_grad():
        want = module.model(input_ids=ids, attention_mask=mask).logits
        got = fresh(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    with pytest.raises(MethodConfigError, match="holds a layer_replacement checkpoint"):
        build_method({"name": "flexidepth"}).apply(
            load_base_model(ModelConfig(**model_cfg)), ckpt=str(tmp_path)
        )
    with pytest.raises(CheckpointError, match="method=layer_replacement"):
        load_flexidepth(load_base_model(ModelConfig(**model_cfg)), tmp_path)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("k", [0, -1, True])
def test_k_below_one_is_refused_naming_the_key(k):
    with pytest.raises(MethodConfigError, match=r"method\.k"):
        build_method({"name": "layer_replacement", "k": k})


def test_k_above_layers_minus_one_is_refused_before_anything_is_loaded(tmp_path):
    from src.train import train

    cfg = compose_tiny("train", ["method=layer_replacement", "method.k=4"], tmp_path / "run")
    with pytest.raises(MethodConfigError, match=r"method\.k=4 must be in \[1, 3\]"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder was claimed
    m = method(k=4)
    m.tokenizer = "unused"
    with pytest.raises(MethodConfigError, match=r"method\.k=4"):  # against the loaded model, too
        m.choose_layers(tiny_model("llama", layers=4), tokenizer=None)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.target_layers_skipped=2", "loss.target_layers_skipped"),
        ("loss.alpha=0.01", "loss.alpha"),
        ("skip.layers=[1,2]", "skip.layers"),
        ("skip.always_skip=[3]", "skip.always_skip"),
    ],
)
def test_contradicting_settings_are_refused_naming_the_key(override, key):
    s = settings_tiny("train", ["method=layer_replacement", "method.k=2", override])
    with pytest.raises(MethodConfigError, match=rf"^{key}=.* contradicts method=layer_replacement"):
        method().prepare_training(s, {key})


def test_a_recipe_budget_is_cleared_not_refused():
    s = settings_tiny("train", ["method=layer_replacement", "loss.target_layers_skipped=2"])
    notes = method().prepare_training(s, set())  # not the user's: e.g. the embedded model's recipe
    assert s.loss.target_layers_skipped is None and s.loss.alpha == 0.0
    assert len(notes) == 1 and "loss.target_layers_skipped=2.0" in notes[0]


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_src_train_cli_end_to_end(tmp_path, tokenizer):
    env = dict(os.environ, PROJECT_ROOT=str(tmp_path))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.train",
            "debug=tiny",
            "logger=none",
            "method=layer_replacement",
            "method.k=2",
            "run_name=lr",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "outputs" / "train" / "runs" / "lr"
    meta = json.loads((run / "flexidepth" / "flexidepth_config.json").read_text())
    assert meta["method"] == "layer_replacement"
    layers = meta["method_details"]["layers"]
    assert len(layers) == 2 and meta["flexidepth"]["always_skip"] == layers
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"]["name"] == "layer_replacement" and metrics["method"]["layers"] == layers
    assert metrics["loss"]["target_layers_skipped"] is None and metrics["loss"]["alpha"] == 0.0
    assert abs(metrics["metrics"]["val/layers_skipped_mean"] - 2.0) < 1e-6
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["flexidepth"]["method_details"]["layers"] == layers
    assert ckpt["state_dict"] and all(".adapter." in k or ".router." in k for k in ckpt["state_dict"])

    from src.models.loader import load_base_model

    model = load_base_model(ModelConfig(**OmegaConf.to_container(compose_tiny("train").model, resolve=True)))
    applied = build_method({"name": checkpoint_method(run)}).apply(model, ckpt=str(run))
    assert applied.name == "layer_replacement" and applied.details["layers"] == layers


# ------------------------------------------------------------------------------------------ the study file
def test_routing_study_rows_compose_validate_and_label_static_rows_as_the_baseline():
    """conf/study/routing.yaml: every row is a valid src.train config of the embedded model (composed, not run);
    static rows are method=layer_replacement, the others FlexiDepth with the budget their name says."""
    from hydra import compose, initialize_config_dir

    from src.config import register
    from src.config.commands import TrainCommand
    from src.config.schemas import load
    from src.studies.spec import plan_points

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        spec = OmegaConf.to_object(compose("study", overrides=["study=routing"]).study).validate()
        assert {r.rsplit("_k", 1)[0] for r in spec.rows} == {"static", "routed", "hybrid"}
        for point in plan_points(spec)[: len(spec.rows)]:
            cfg = compose("train", overrides=list(point.overrides))
            with open_dict(cfg):
                cfg.paths.output_dir = "/tmp/flexidepth-unused"
            s = load(cfg, TrainCommand)
            m = s.validate()
            kind, k = point.row.rsplit("_k", 1)
            if kind == "static":
                assert m.name == "layer_replacement" and m.k == int(k)
                explicit = {o.split("=", 1)[0] for o in point.overrides}
                m.prepare_training(s, explicit)  # no contradiction; the recipe's budget is cleared
                assert s.loss.target_layers_skipped is None
            else:
                assert m.name == "flexidepth" and s.loss.target_layers_skipped == int(k)
                static = list(s.skip.always_skip)
                assert len(static) == (int(k) // 2 if kind == "hybrid" else 0)
