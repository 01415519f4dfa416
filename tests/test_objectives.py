"""The `loss` group: self-distillation, alpha warm-up, the layers-skipped controller, separate learning rates,
and the deprecated `skip.alpha` alias."""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from src.flexidepth import FlexiDepthConfig, inject, set_routing
from src.lit.objectives import AlphaSchedule, LossConfig, LossConfigError, kd_loss_sum
from tests.conftest import tiny_config


def _tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama"))
    return inject(model, FlexiDepthConfig())


def test_kd_loss_is_zero_with_routing_off_and_matches_a_direct_kl():
    model = _tiny_model()
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[1, 8:] = -100
    set_routing(model, False)
    teacher = model(input_ids=ids).logits.detach()
    student_off = model(input_ids=ids).logits
    assert kd_loss_sum(student_off, teacher, labels, 1.0).item() == 0.0
    set_routing(model, True)
    student = model(input_ids=ids).logits  # gates 0.953 scale every routed FFN: differs from the base
    t = 2.0
    got = kd_loss_sum(student, teacher, labels, t)
    mask = labels[:, 1:] != -100
    p = F.softmax(teacher[:, :-1][mask] / t, -1)
    direct = (p * (p.log() - F.log_softmax(student[:, :-1][mask] / t, -1))).sum() * t * t
    assert got.item() > 0
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)
    got.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if "adapter" in n or "router" in n
    )


def test_alpha_warmup_and_controller():
    warm = AlphaSchedule(LossConfig(alpha=1e-2, alpha_warmup_steps=4))
    assert [warm.value(s) for s in range(6)] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    warm.update(10.0)  # a fixed alpha ignores measurements
    assert warm.value(10) == pytest.approx(1e-2)

    ctl = AlphaSchedule(
        LossConfig(
            alpha=1e-3,
            target_layers_skipped=2.0,
            controller_rate=0.5,
            controller_down_factor=1.0,
            alpha_max=0.01,
        )
    )
    ctl.update(0.0)  # skipped too little: alpha grows by 0.5 * 1e-3 * 2
    assert ctl.value(0) == pytest.approx(2e-3)
    ctl.update(7.0)  # too much: shrinks by 0.5 * 1e-3 * 5, through zero (a negative weight raises gates)
    assert ctl.value(0) == pytest.approx(-5e-4)
    for _ in range(100):
        ctl.update(15.0)
    assert ctl.value(0) == pytest.approx(-0.01)  # clamped at -alpha_max
    restored = AlphaSchedule(LossConfig(alpha=0.5, target_layers_skipped=2.0))
    restored.load_state_dict(ctl.state_dict())
    assert restored.value(0) == pytest.approx(-0.01)
    fast_down = AlphaSchedule(LossConfig(alpha=1e-3, target_layers_skipped=2.0, controller_rate=0.1))
    fast_down.update(3.0)  # above target: 4x the rate (anti-windup)
    assert fast_down.value(0) == pytest.approx(1e-3 - 0.4 * 1e-3)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"alhpa": 1.0}, "loss.alhpa"),
        ({"objective": "mse"}, "loss.objective"),
        ({"kd_weight": 1.5}, "loss.kd_weight"),
        ({"temperature": 0.0}, "loss.temperature"),
        ({"alpha_warmup_steps": -1}, "loss.alpha_warmup_steps"),
        ({"target_layers_skipped": -2}, "loss.target_layers_skipped"),
        ({"alpha": 2.0, "alpha_max": 1.0}, "loss.alpha"),
    ],
)
def test_loss_config_errors_name_the_key(data, key):
    from omegaconf import OmegaConf

    from src.config.schemas import load
    from src.utils.errors import ConfigError

    with pytest.raises((LossConfigError, ConfigError), match=key.replace(".", r"\.")):  # ConfigError: the key
        loss = load(OmegaConf.create({"loss": data}), _LossOnly).loss  # the conversion (unknown keys)
        loss.validate()  # the values
    assert LossConfig(target_layers_skipped=3).budget_problems(routed_layers=2) == [
        "loss.target_layers_skipped=3 exceeds the 2 routed layers of this model"
    ]
    assert LossConfig(target_layers_skipped=2).budget_problems(routed_layers=2) == []


@dataclass
class _LossOnly:
    loss: LossConfig = field(default_factory=LossConfig)


def _metrics(out: Path) -> list[dict]:
    return list(csv.DictReader(open(next(out.rglob("metrics.csv")))))


@pytest.mark.slow
def test_target_run_lands_on_the_layers_skipped_budget(tmp_path):
    """A tiny run asked for 1.0 of its 2 routed layers ends within +-0.25 layers of it (training tokens)."""
    from src.train import train
    from tests.test_train import compose_cfg

    cfg = compose_cfg(
        [
            "debug=tiny",
            "logger=csv",
            "callbacks=none",
            "trainer.max_steps=200",
            "trainer.max_epochs=-1",
            "trainer.limit_val_batches=0",
            "data.max_train_examples=null",
            "data.n_synthetic=400",
            "data.max_length=64",  # the cost is the 49k-vocabulary head and KD softmax per token: short rows
            "optim.router_lr=1e-3",
            "optim.adapter_lr=1e-2",
            "loss.objective=kd",
            "loss.target_layers_skipped=1.0",
            "loss.controller_rate=0.1",
        ],
        tmp_path,
    )
    train(cfg)
    rows = _metrics(tmp_path)
    skipped = [float(r["skip/step_layers_skipped"]) for r in rows if r.get("skip/step_layers_skipped")]
    alphas = [float(r["skip/alpha"]) for r in rows if r.get("skip/alpha")]
    assert len(skipped) == 200
    assert skipped[0] == 0.0  # fresh gates run everything
    assert abs(sum(skipped[-30:]) / 30 - 1.0) <= 0.25
    assert max(skipped) > 1.25  # the first crossing overshoots (all fresh gates sink together) ...
    assert min(alphas) < 0 < alphas[0]  # ... and only a negative multiplier pulls it back


def test_router_and_adapter_learning_rates_and_skip_alpha_alias(tmp_path):
    from src.config.commands import TrainCommand
    from src.config.schemas import load
    from src.lit.module import FlexiDepthModule
    from tests.test_train import compose_cfg

    cfg = compose_cfg(["debug=tiny", "optim.router_lr=1e-2", "optim.adapter_lr=5e-4", "skip.alpha=0.07"])
    s = load(cfg, TrainCommand)
    assert (
        s.translate_skip_alpha() == "skip.alpha is deprecated: loss.alpha is the key (taking loss.alpha=0.07)"
    )
    assert s.loss.alpha == 0.07 and s.skip.alpha is None  # the deprecated alias, translated once
    module = FlexiDepthModule(model=s.model.to_dict(), skip=s.skip.flexidepth(), optim=s.optim, loss=s.loss)
    assert module.hparams["loss"]["alpha"] == 0.07 and "alpha" not in module.hparams["skip"]
    assert module.alpha == pytest.approx(0.07)

    class _Trainer:
        model = module
        estimated_stepping_batches = 10

    module.trainer = _Trainer()  # configure_optimizers reads the trainer's model and step count
    groups = module.configure_optimizers()["optimizer"].param_groups
    by_name = {g["name"]: g for g in groups}
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx({"router": 1e-2, "adapter": 5e-4})
    router_params = {id(p) for p in by_name["router"]["params"]}
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert all(".router." in names[i] for i in router_params)
    assert all(".adapter." in names[id(p)] for p in by_name["adapter"]["params"])
