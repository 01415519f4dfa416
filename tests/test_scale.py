"""Scale-out: DeepSpeed presets (config validation on CPU, a raw-engine ZeRO-2 run, a GPU fit), checkpoint
export (src/convert.py) and the memory planner."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from src.flexidepth.checkpoint import CheckpointError
from src.models.config import ModelConfig
from tests.helpers.configs import run_main
from tests.test_train import ROOT, compose_cfg, group_options

DS_PRESETS = [p for p in group_options("trainer") if p.startswith("deepspeed_")]
EXPECTED = {
    "deepspeed_zero2": (2, None, None),
    "deepspeed_zero3": (3, None, None),
    "deepspeed_zero3_offload": (3, "cpu", "cpu"),
}


def lightning_filled_config(strategy, cfg, world_size: int = 1) -> dict:
    """strategy.config completed the way DeepSpeedStrategy._format_config does at fit time."""
    from lightning.fabric.strategies.deepspeed import _format_precision_config

    ds = json.loads(json.dumps(strategy.config))  # a copy, as plain JSON types
    assert "gradient_accumulation_steps" not in ds  # Lightning refuses it: it comes from the Trainer
    ds["gradient_accumulation_steps"] = int(cfg.trainer.accumulate_grad_batches)
    assert "train_micro_batch_size_per_gpu" in ds, (
        "Lightning would have to infer it from a batch_size=None loader"
    )
    ds.setdefault("gradient_clipping", float(cfg.trainer.gradient_clip_val or 0.0))
    ds["train_batch_size"] = (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    )
    _format_precision_config(ds, str(cfg.trainer.precision), 0, 1000, 1, 16, 2)
    return ds


def build_strategy(overrides=()):
    cfg = compose_cfg(list(overrides))
    return hydra.utils.instantiate(cfg.trainer.strategy), cfg


@pytest.mark.deepspeed
@pytest.mark.parametrize("preset", DS_PRESETS)
def test_deepspeed_preset_generates_valid_config(preset):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    assert set(DS_PRESETS) == set(EXPECTED)
    strategy, cfg = build_strategy(
        [f"trainer={preset}", "trainer.accumulate_grad_batches=2", "data.micro_batch_size=3"]
    )
    assert strategy.exclude_frozen_parameters is True
    ds = lightning_filled_config(strategy, cfg)
    parsed = DeepSpeedConfig(ds)
    stage, offload_param, offload_opt = EXPECTED[preset]
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_micro_batch_size_per_gpu == 3 and parsed.gradient_accumulation_steps == 2
    assert parsed.train_batch_size == 6
    assert parsed.bfloat16_config.enabled is True and parsed.gradient_clipping == 1.0
    zero = parsed.zero_config

    def device(node):
        return None if node is None else getattr(node.device, "value", node.device)

    assert device(zero.offload_param) == offload_param and device(zero.offload_optimizer) == offload_opt


@pytest.mark.deepspeed
@pytest.mark.parametrize("preset", DS_PRESETS)
def test_deepspeed_bad_values_are_rejected(preset):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    key = (
        "trainer.strategy.config.zero_optimization.stage" if "offload" in preset else "trainer.strategy.stage"
    )
    strategy, cfg = build_strategy([f"trainer={preset}", f"{key}=7"])
    with pytest.raises(Exception, match="0, 1, 2|stage"):
        DeepSpeedConfig(lightning_filled_config(strategy, cfg))
    strategy, cfg = build_strategy([f"trainer={preset}"])
    ds = lightning_filled_config(strategy, cfg)
    ds["zero_optimization"]["overlap_comms"] = True  # typo of overlap_comm
    with pytest.raises(Exception, match="[Ee]xtra inputs"):
        DeepSpeedConfig(ds)
    ds = lightning_filled_config(strategy, cfg)
    ds["train_batch_size"] += 1  # not micro x accumulation x world
    with pytest.raises(AssertionError, match="batch"):
        DeepSpeedConfig(ds)


def test_deepspeed_presets_inherit_trainer_defaults():
    for preset in DS_PRESETS:
        cfg = compose_cfg([f"trainer={preset}"])
        node = OmegaConf.to_container(cfg.trainer, resolve=True)
        assert node["strategy"]["_target_"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
        assert node["strategy"]["logging_batch_size_per_gpu"] == cfg.data.micro_batch_size
        assert node["accelerator"] == "gpu" and node["precision"] == "bf16-mixed"


# ---------------------------------------------------------------------------------- raw DeepSpeed engine
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_engine_main(out_dir: str) -> None:
    """Run in a fresh process: 3 ZeRO-2 steps of the tiny FlexiDepth model by the raw engine on CPU (gloo)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    import deepspeed

    from src.flexidepth import FlexiDepthConfig, inject, routed_forward
    from src.models.loader import load_base_model

    deepspeed.init_distributed(dist_backend="gloo")
    model_cfg = yaml.safe_load((ROOT / "conf/model/tiny_llama.yaml").read_text())
    # resolved like every entry point does (the estimator keys read a model recipe's `skip_estimator`; alone,
    # the file resolves them to their defaults)
    skip = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/skip/flexidepth.yaml"), resolve=True)
    skip.pop("alpha")  # the deprecated alias (null); the weight lives in the loss group
    alpha = yaml.safe_load((ROOT / "conf/loss/default.yaml").read_text())["alpha"]

    class Holder(torch.nn.Module):  # same `model.` prefix as FlexiDepthModule, so checkpoint keys match
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            out = routed_forward(self.model, ids, torch.ones_like(ids), labels=ids)
            return out.lm_loss + alpha * out.routes.skip_loss

    holder = Holder(inject(load_base_model(ModelConfig(**model_cfg)), FlexiDepthConfig.from_dict(skip)))
    frozen = {n: p.detach().clone() for n, p in holder.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in holder.named_parameters() if p.requires_grad}
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, optimizer, _, _ = deepspeed.initialize(
        model=holder, model_parameters=[p for p in holder.parameters() if p.requires_grad], config=config
    )
    in_optimizer = sum(p.numel() for group in optimizer.bit16_groups for p in group)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        loss = engine(torch.randint(0, model_cfg["arch"]["vocab_size"], (2, 16), generator=gen))
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    params = dict(engine.module.named_parameters())
    client = {"hyper_parameters": {"model": model_cfg, "skip": {**skip, "alpha": alpha}}, "global_step": 3}
    engine.save_checkpoint(
        str(Path(out_dir) / "zero"), tag="checkpoint", client_state=client, exclude_frozen_parameters=True
    )
    result = {
        "losses": losses,
        "stage": engine.zero_optimization_stage(),
        "optimizer_numel": in_optimizer,
        "trainable_numel": sum(v.numel() for v in trainable.values()),
        "base_identical": all(torch.equal(params[n], v) for n, v in frozen.items()),
        "base_count": len(frozen),
        "unchanged": [n for n, v in trainable.items() if torch.equal(params[n], v)],
        "trainable_count": len(trainable),
    }
    torch.save(
        {n: p.detach().clone() for n, p in params.items() if p.requires_grad}, Path(out_dir) / "final.pt"
    )
    (Path(out_dir) / "result.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_raw_deepspeed_zero2_trains_only_router_and_adapter(tmp_path):
    pytest.importorskip("deepspeed")
    cache = Path(os.environ.get("FLEXIDEPTH_CACHE", Path.home() / ".cache" / "flexidepth"))
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")),
    )
    code = f"from tests.test_scale import ds_engine_main; ds_engine_main({str(tmp_path)!r})"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["stage"] == 2 and all(map(lambda x: x == x, r["losses"]))
    assert r["optimizer_numel"] == r["trainable_numel"] > 0  # only router/adapter params in the optimizer
    assert r["base_count"] > 0 and r["base_identical"]  # frozen base bit-identical after 3 steps
    assert len(r["unchanged"]) < r["trainable_count"] / 2, r["unchanged"]  # the router/adapter trained

    # export the ZeRO folder (frozen params excluded) to our checkpoint folder and load it back
    from src.convert import convert
    from src.flexidepth import flexidepth_state_dict, load_flexidepth
    from src.models.loader import load_base_model

    saved = torch.load(tmp_path / "zero" / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)[
        "module"
    ]
    # frozen weights stay out; DeepSpeed only misses the tied lm_head (not in named_parameters())
    assert {k for k in saved if ".router." not in k and ".adapter." not in k} <= {"model.lm_head.weight"}
    out = convert(tmp_path / "zero", tmp_path / "exported")
    model_cfg = yaml.safe_load((ROOT / "conf/model/tiny_llama.yaml").read_text())
    model = load_flexidepth(load_base_model(ModelConfig(**model_cfg)), out)
    final = torch.load(tmp_path / "final.pt")
    loaded = flexidepth_state_dict(model)
    assert set(loaded) == {k.removeprefix("model.") for k in final}
    for k, v in final.items():
        torch.testing.assert_close(loaded[k.removeprefix("model.")], v.float(), rtol=0, atol=0, msg=k)


@pytest.mark.gpu
@pytest.mark.deepspeed
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_lightning_deepspeed_zero2_fit_on_gpu(tmp_path):
    pytest.importorskip("deepspeed")
    from src.convert import convert
    from src.train import train

    cfg = compose_cfg(
        [
            "debug=tiny",
            "logger=none",
            "trainer=deepspeed_zero2",
            "trainer.devices=1",
            "trainer.precision=bf16-mixed",
            # a GPU machine without the embedded model: the tokenizer carried by benchmarks/gpu_check.sh
            *(
                [f"model.tokenizer={os.environ['FLEXIDEPTH_GPU_TOKENIZER']}"]
                if os.environ.get("FLEXIDEPTH_GPU_TOKENIZER")
                else []
            ),
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert metrics["val/ppl"] > 1
    shards = tmp_path / "checkpoints" / "last.ckpt"
    assert shards.is_dir()  # a DeepSpeed shard folder
    out = convert(shards, tmp_path / "exported")
    assert (out / "flexidepth.safetensors").is_file()


# ---------------------------------------------------------------------------------- convert (plain ckpt)
def test_convert_plain_lightning_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from src.convert import convert, main
    from src.train import train

    train(
        compose_cfg(
            ["debug=tiny", "logger=none", "trainer.max_steps=2", "trainer.limit_val_batches=0"],
            tmp_path / "run",
        )
    )
    run_main(
        main,
        [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"out_dir={tmp_path / 'exported'}"],
    )
    ours = load_file(tmp_path / "exported" / "flexidepth.safetensors")
    exported = load_file(tmp_path / "run" / "flexidepth" / "flexidepth.safetensors")
    assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours)
    meta = json.loads((tmp_path / "exported" / "flexidepth_config.json").read_text())
    assert meta["global_step"] == 2 and meta["flexidepth"]["tau"] == 0.5
    with pytest.raises(CheckpointError, match="missing.ckpt"):
        convert(tmp_path / "missing.ckpt", tmp_path / "x")


def test_convert_keeps_the_method_of_the_run(tmp_path):
    """A MindSkip run converted from its Lightning checkpoint loads back as MindSkip (with its own gates),
    not as per-token FlexiDepth: the export records `method` and the layers are built through the registry."""
    from src.convert import convert
    from src.methods import checkpoint_method
    from src.train import train

    train(
        compose_cfg(
            [
                "debug=tiny",
                "logger=none",
                "method=mindskip",
                "trainer.max_steps=2",
                "trainer.limit_val_batches=0",
            ],
            tmp_path / "run",
        )
    )
    out = convert(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "exported")
    assert json.loads((out / "flexidepth_config.json").read_text())["method"] == "mindskip"
    assert checkpoint_method(out) == "mindskip" == checkpoint_method(tmp_path / "run" / "flexidepth")


# ---------------------------------------------------------------------------------- memory planner
def test_memory_planner_arithmetic_on_a_constructed_example():
    from src.lit.memory_plan import GB, Arch, Plan

    toy = Arch("toy", layers=4, hidden=64, intermediate=128, vocab=100, heads=4, kv_heads=2)
    # per layer: q,o 2*64*64 + k,v 2*64*32 + MLP 3*64*128 + norms 2*64 = 36992; embed + head 2*100*64; final norm 64
    assert toy.base_params() == 4 * 36992 + 12800 + 64
    plan = Plan(toy, gpus=2, gpu_mem_gb=1.0, zero=2, micro_batch=1, seq=10, overhead_gb=0.0)
    # 2 routed layers x (router 2*64*4 + 64 + 4 + 1 = 581, adapter 3*64*8 = 1536)
    assert plan.trainable_params() == 2 * (581 + 1536) == 4234
    b = plan.breakdown()
    assert b["base_weights"] == 160832 * 2
    assert b["trainable_weights"] == 4234 * 6
    assert b["gradients"] == 4234 * 4 / 2 and b["optimizer"] == 4234 * 8 / 2  # ZeRO-2 shards both
    assert b["activations"] == 10 * 2 * 2 * (6 * 64 + 2 * 32 + 4 * 128)
    assert b["logits"] == 10 * 100 * 10
    assert plan.total() == sum(b.values()) and plan.fits()
    gc = Plan(toy, gpus=2, zero=2, seq=10, gradient_checkpointing=True, overhead_gb=0.0).breakdown()
    assert gc["activations"] == 10 * (2 * 2 * 64 + 2 * (6 * 64 + 2 * 32 + 4 * 128))
    z3 = Plan(toy, gpus=2, zero=3, seq=10, offload_optimizer=True).breakdown()
    assert z3["base_weights"] == 160832 and z3["optimizer"] == 0 and z3["overhead"] == 2 * GB
    z0 = Plan(toy, gpus=2, zero=0, seq=10).breakdown()
    assert z0["gradients"] == 4234 * 4 and z0["optimizer"] == 4234 * 8
    assert not Plan(toy, gpu_mem_gb=1e-6, overhead_gb=0.0).fits()


def test_memory_planner_matches_model_and_paper_counts():
    from src.flexidepth import FlexiDepthConfig, inject, parameter_counts
    from src.lit.memory_plan import ARCHS, Plan
    from src.memory_planner import main
    from src.models.loader import load_base_model

    assert round(Plan(ARCHS["llama3_8b"]).trainable_params() / 1e6, 1) == 209.8  # the paper's count
    assert round(ARCHS["llama3_8b"].base_params() / 1e9, 2) == 8.03
    model_cfg = yaml.safe_load((ROOT / "conf/model/tiny_llama.yaml").read_text())
    model = inject(load_base_model(ModelConfig(**model_cfg)), FlexiDepthConfig())
    arch = model_cfg["arch"]
    from src.lit.memory_plan import Arch

    tiny = Arch(
        "tiny",
        arch["num_hidden_layers"],
        arch["hidden_size"],
        arch["intermediate_size"],
        arch["vocab_size"],
        arch["num_attention_heads"],
        arch["num_key_value_heads"],
        tied=True,
    )
    counts = parameter_counts(model)
    assert Plan(tiny).trainable_params() == counts["trainable"]
    assert tiny.base_params() == counts["total"] - counts["trainable"]
    run_main(main, ["all=true"])
