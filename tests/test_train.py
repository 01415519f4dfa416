"""Training framework: config composition and validation, Lightning runs, W&B output, resume, multirun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from src.config.commands import TrainCommand
from src.config.schemas import load
from src.models.config import ModelConfig
from src.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_cfg(overrides=(), output_dir=None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or "/tmp/flexidepth-unused")
    return cfg


def validate(cfg):
    """src.train's conversion and value checks (`TrainCommand.validate`) of a composed config."""
    return load(cfg, TrainCommand).validate()


def group_options(group):
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group", ["model", "skip", "data", "trainer", "logger", "callbacks", "optim", "debug", "experiment"]
)
def test_every_config_composes_and_validates(group):
    for option in group_options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option == "local":
            overrides.append("data.source=/tmp/x.jsonl")
        cfg = compose_cfg(overrides)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        validate(cfg)


def test_trainer_presets_instantiate():
    import hydra

    for option in group_options("trainer"):
        cfg = compose_cfg([f"trainer={option}"])
        if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
            continue
        node = OmegaConf.to_container(cfg.trainer, resolve=True)
        if node.get("strategy") == "ddp":
            node["devices"] = 1
        trainer = hydra.utils.instantiate(node, logger=False, enable_checkpointing=False)
        assert trainer.accumulate_grad_batches == cfg.trainer.accumulate_grad_batches


@pytest.mark.parametrize(
    "override, key",
    [
        ("skip.tau=1.5", "skip.tau"),
        ("skip.alpha=-1", "skip.alpha"),
        ("skip.router_reduction=7", "skip.router_reduction"),
        ("skip.layers=[3,40]", "skip.layers"),
        ("optim.lr=0", "optim.lr"),
        ("model.dtype=float8", "model.dtype"),
        ("resume=/nonexistent.ckpt", "resume"),
    ],
)
def test_bad_values_are_named(override, key):
    cfg = compose_cfg([override])
    with pytest.raises(Exception, match=key.replace(".", r"\.")):
        validate(cfg)


def test_typo_in_yaml_key_is_rejected(tmp_path):
    cfg = compose_cfg()
    with pytest.raises(Exception, match=r"skip\.taux"), open_dict(cfg):  # the typed skip schema refuses it
        cfg.skip.taux = 0.3
    plain = OmegaConf.create(OmegaConf.to_container(cfg))  # a config built without the schemas
    plain.skip.taux = 0.3
    with pytest.raises(ConfigError, match=r"^skip\.taux: Key 'taux' not in 'SkipSchema'$"):
        validate(plain)
    del plain.skip.taux
    plain.optim.learning_rate = 1
    with pytest.raises(
        ConfigError, match=r"^optim\.learning_rate: Key 'learning_rate' not in 'OptimConfig'$"
    ):
        validate(plain)
    plain.optim.pop("learning_rate")
    plain.foo = 1
    with pytest.raises(ConfigError, match=r"^foo: Key 'foo' not in 'TrainCommand'$"):
        validate(plain)


def test_command_line_typo_is_rejected():
    with pytest.raises(Exception, match="taux"):
        compose_cfg(["skip.taux=0.3"])


# ---------------------------------------------------------------------------------------------- runs
def tiny_overrides(extra=()):
    return ["debug=tiny", "logger=none", *extra]


def test_fast_dev_run_tiny(tmp_path):
    from src.train import train

    cfg = compose_cfg(
        [
            "model=tiny_llama",
            "debug=fast_dev_run",
            "trainer.precision=32-true",
            "data.n_synthetic=32",
            "data.max_train_examples=32",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert "train/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_tiny_run_writes_checkpoints_and_export(tmp_path):
    from src.flexidepth import load_flexidepth
    from src.models.loader import load_base_model
    from src.train import train

    cfg = compose_cfg(tiny_overrides(["model=tiny_qwen3"]), tmp_path)
    metrics = train(cfg)
    assert metrics["val/ppl"] > 1 and metrics["val/base_ppl"] > 1
    assert metrics["val/flop_ideal_speedup"] >= 0.9  # nothing skipped yet: only the router overhead
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(".router." in k or ".adapter." in k for k in ckpt["state_dict"])
    usage = (tmp_path / "layer_usage.jsonl").read_text().splitlines()
    assert len(usage) >= 2 and (tmp_path / "run_fraction_heatmap.png").stat().st_size > 1000
    model = load_flexidepth(
        load_base_model(ModelConfig(**OmegaConf.to_container(cfg.model))), tmp_path / "flexidepth"
    )
    trained = {k: v for k, v in ckpt["state_dict"].items()}
    for k, v in trained.items():
        assert torch.equal(model.state_dict()[k.removeprefix("model.")], v)


def test_gradients_do_not_depend_on_accumulation_split(smollm2_dir):
    """accumulation 1 x batch 4 and accumulation 2 x batch 2 give the same gradients (padding included)."""
    from src.data.config import DataConfig
    from src.data.datamodule import SFTDataModule
    from src.lit.module import FlexiDepthModule
    from src.lit.objectives import LossConfig

    s = load(compose_cfg(["model=tiny_llama"]), TrainCommand)
    model_cfg = s.model.to_dict()

    def grads(micro, accumulate):
        data = SFTDataModule(
            DataConfig(micro_batch_size=micro, n_synthetic=40, max_train_examples=40, max_length=128, seed=3),
            tokenizer_path=str(smollm2_dir),
            accumulate_grad_batches=accumulate,
        )
        data.setup("fit")
        module = FlexiDepthModule(
            model=model_cfg, skip=s.skip.flexidepth(), optim=s.optim, loss=LossConfig(alpha=0.05)
        )
        with torch.no_grad():  # non-zero adapters so every parameter has a gradient
            for n, p in module.model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
        module.log = lambda *a, **k: None
        batches = iter(data.train_dataloader())
        for _ in range(accumulate):
            loss = module.training_step(next(batches), 0) / accumulate  # Lightning's division
            loss.backward()
        return {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}, module

    g1, _ = grads(4, 1)
    g2, _ = grads(2, 2)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-7, msg=n)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from src.lit import module as lit_module
    from src.train import train

    real_forward = lit_module.FlexiDepthModule.forward

    def nan_from_step_3(self, batch):
        out = real_forward(self, batch)
        if self.global_step >= 3:
            out.lm_loss_sum = out.lm_loss_sum * float("nan")
        return out

    monkeypatch.setattr(lit_module.FlexiDepthModule, "forward", nan_from_step_3)
    with pytest.raises(FloatingPointError, match="non-finite loss at global step 3"):
        train(compose_cfg(tiny_overrides(["trainer.limit_val_batches=0"]), tmp_path))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2  # written before the failure, not overwritten by it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_resume_continues_the_same_wandb_run(tmp_path):
    from src.train import train

    overrides = ["debug=tiny", "trainer.limit_val_batches=0", "trainer.max_steps=2"]
    train(compose_cfg(overrides, tmp_path))
    first_id = (tmp_path / "wandb_id.txt").read_text().strip()
    train(compose_cfg([*overrides[:-1], "trainer.max_steps=4", "resume=extend"], tmp_path))
    assert (tmp_path / "wandb_id.txt").read_text().strip() == first_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(first_id) for r in runs)  # one run id, resumed


def test_resume_reaches_same_weights(tmp_path, monkeypatch):
    """A run that dies after step 4 of 6 and is restarted with resume=auto ends with the same weights."""
    from src.lit.module import FlexiDepthModule
    from src.train import train

    overrides = tiny_overrides(["trainer.limit_val_batches=0"])
    train(compose_cfg(overrides, tmp_path / "full"))

    original = FlexiDepthModule.on_train_batch_end

    def crash_after_step_4(self, *args):
        original(self, *args)
        if self.global_step == 4:  # the step-4 checkpoint was written by the callbacks just before
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(FlexiDepthModule, "on_train_batch_end", crash_after_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_cfg(overrides, tmp_path / "part"))
    monkeypatch.setattr(FlexiDepthModule, "on_train_batch_end", original)
    assert torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    train(compose_cfg([*overrides, "resume=auto"], tmp_path / "part"))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)


def test_bad_data_errors_are_clear(tmp_path):
    from src.train import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ValueError, match="messages|text"):
        train(compose_cfg(tiny_overrides([f"data.source={bad}"]), tmp_path / "o1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="empty|no example|0"):
        train(compose_cfg(tiny_overrides([f"data.source={empty}"]), tmp_path / "o2"))


# ---------------------------------------------------------------------------------------------- CLI
def _cli(args, cwd, timeout=900):
    env = dict(os.environ, PROJECT_ROOT=str(cwd))
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_multirun_two_alphas_writes_two_runs(tmp_path):
    res = _cli(
        ["--multirun", "debug=tiny", "skip.alpha=0.001,0.1", "hydra.sweep.dir=" + str(tmp_path / "sweep")],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in runs] == ["0_skip.alpha=0.001", "1_skip.alpha=0.1"]
    for run in runs:
        assert (run / "flexidepth" / "flexidepth.safetensors").is_file()
        assert len(list(run.glob("wandb/offline-run-*"))) == 1  # one W&B run per job, never merged


@pytest.mark.slow
def test_embedded_model_run_logs_wandb_histograms(tmp_path):
    """A few real steps on SmolLM2-135M; the offline W&B file holds the layer-usage histograms."""
    from tests.helpers.wandb_reader import find_run_file, history_rows

    res = _cli(
        [
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.limit_val_batches=2",
            "trainer.log_every_n_steps=1",
            "data.max_length=128",
            "data.n_synthetic=64",
            "data.max_train_examples=64",
            "data.micro_batch_size=2",
            "callbacks.layer_usage.every_n_steps=2",
            "callbacks.last_checkpoint.every_n_train_steps=2",
            "hydra.run.dir=" + str(tmp_path / "run"),
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = history_rows(find_run_file(tmp_path / "run"))
    keys = set().union(*rows)
    for key in (
        "train/loss",
        "train/lm_loss",
        "train/skip_loss",
        "skip/layers_skipped_mean",
        "train/tokens_per_s",
        "train/lr",
        "val/ppl",
        "val/base_ppl",
        "skip/run_fraction/layer_15",
    ):
        assert key in keys, key
    hist = [r for r in rows if r.get("skip/layers_used_hist/_type") == "histogram"]
    assert len(hist) >= 2
    bins = hist[-1]["skip/layers_used_hist/bins"]
    assert bins[0] == pytest.approx(14.5) and bins[-1] == pytest.approx(30.5)
    assert sum(hist[-1]["skip/layers_used_hist/values"]) > 0
    frac = [r for r in rows if r.get("skip/layer_run_fraction/_type") == "histogram"][-1]
    assert len(frac["skip/layer_run_fraction/values"]) == 15
    assert all(0 <= v <= 1 for v in frac["skip/layer_run_fraction/values"])
    assert any("skip/layer_run_table" in k for k in keys) and any("run_fraction_heatmap" in k for k in keys)
    assert any(r.get("val/ppl", 0) > 1 for r in rows)


def test_model_recipes_specialise_defaults():
    """The embedded model gets the CPU demo lr; hub models get GPU trainer settings (conf/recipe/)."""
    default = compose_cfg()
    assert default.optim.lr == pytest.approx(3e-3) and default.trainer.accelerator == "cpu"
    # the embedded model's recipe (issue 11): distillation at T = 2, a 4.45-layer budget started from alpha
    # 3e-3 with tau kept at 0.5, two-digit generated arithmetic
    assert (default.loss.objective, default.loss.temperature) == ("kd", pytest.approx(2.0))
    assert default.loss.alpha == pytest.approx(3e-3)
    assert default.loss.target_layers_skipped == pytest.approx(4.45)
    assert default.loss.calibrate_tau is False and default.skip.tau == pytest.approx(0.5)
    assert default.data.synthetic_max_digits == 2 and default.skip.gate_mode == "difference"
    big = compose_cfg(["model=llama3_8b", "skip.alpha=0.01"])
    assert big.loss.objective == "ce" and big.data.synthetic_max_digits is None  # the paper's objective
    assert big.loss.temperature == pytest.approx(1.0) and big.loss.target_layers_skipped is None
    assert (
        big.trainer.accelerator == "gpu"
        and big.trainer.max_steps == -1
        and big.optim.lr == pytest.approx(1e-4)
    )
    assert compose_cfg(["model=llama3_8b", "optim.lr=5e-4"]).optim.lr == pytest.approx(5e-4)


def test_alpha_sweeps_fix_alpha_and_a_command_line_alpha_under_a_budget_gets_a_note():
    """The embedded recipe trains to a budget, so a command-line alpha only starts the controller: the alpha,
    grid and tau sweeps set loss.target_layers_skipped=null, and src.train notes an alpha given under a budget."""
    for sweep in ("alpha", "grid", "tau"):
        assert compose_cfg([f"+sweep={sweep}"]).loss.target_layers_skipped is None, sweep
    assert compose_cfg(["+sweep=adapter_rank"]).loss.target_layers_skipped == pytest.approx(4.45)
    budget = load(compose_cfg(["loss.alpha=1e-2"]), TrainCommand)
    for given in (["loss.alpha=1e-2"], ["+skip.alpha=0.01", "seed=1"]):
        note = budget.loss.alpha_override_note(given)
        assert note is not None and given[0].split("=")[0].lstrip("+") in note
        assert "loss.target_layers_skipped=4.45" in note and "loss.target_layers_skipped=null" in note
    assert budget.loss.alpha_override_note(["seed=1", "loss.temperature=1"]) is None  # no alpha given
    fixed = load(compose_cfg(["loss.alpha=1e-2", "loss.target_layers_skipped=null"]), TrainCommand)
    assert fixed.loss.alpha_override_note(["loss.alpha=1e-2", "loss.target_layers_skipped=null"]) is None
