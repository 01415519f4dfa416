"""The distillation teacher sharing the student's unrouted prefix (src/lit/teacher.py): same teacher logits,
losses and gradients as the full teacher forward, for every family, padding, non-contiguous routed layers,
gradient checkpointing and sampled decisions; and the LightningModule's training step uses it."""

from __future__ import annotations

import pytest
import torch

from src.flexidepth import FlexiDepthConfig, inject, routed_forward
from src.lit.objectives import kd_loss_sum
from src.lit.teacher import full_teacher_logits, student_and_teacher
from tests.conftest import FAMILY_NAMES, tiny_model


def batch(seed: int = 0, bsz: int = 3, seq: int = 12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (bsz, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100  # prompt tokens without loss
    return ids, mask, labels


def loss_and_grads(model, ids, mask, labels, shared: bool, seed: int = 0):
    """kd loss + skip loss of one step, and the gradients of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # sampled decisions draw the same numbers in both variants
    if shared:
        out, teacher = student_and_teacher(model, lambda: routed_forward(model, ids, mask, labels=labels))
    else:
        teacher = full_teacher_logits(model, ids, mask)
        out = routed_forward(model, ids, mask, labels=labels)
    loss = kd_loss_sum(out.logits, teacher, labels, 2.0) + 0.3 * out.routes.skip_loss_sum
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return teacher, out.routes.run, loss.detach(), grads


def check_same(model, ids, mask, labels):
    t_full, run_full, loss_full, g_full = loss_and_grads(model, ids, mask, labels, shared=False)
    t_shared, run_shared, loss_shared, g_shared = loss_and_grads(model, ids, mask, labels, shared=True)
    assert torch.equal(run_full, run_shared)
    assert 0.0 < run_full[mask.bool()].float().mean() < 1.0  # routing is not trivial
    torch.testing.assert_close(t_shared, t_full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss_shared, loss_full, atol=1e-6, rtol=1e-6)
    assert g_full.keys() == g_shared.keys() and g_full
    for name in g_full:
        torch.testing.assert_close(g_shared[name], g_full[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(float(g.abs().max()) > 0 for g in g_full.values())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shared_teacher_equals_full_teacher(family):
    model = tiny_model(family)
    torch.manual_seed(1)
    inject(model, FlexiDepthConfig(init="released"))
    model.train()
    check_same(model, *batch())


@pytest.mark.parametrize(
    "skip, checkpointing",
    [
        ({"init": "released", "layers": [1, 3]}, False),  # unrouted layer 2 between routed ones
        ({"init": "released"}, True),
        ({"init": "released", "gate_mode": "difference", "train_decisions": "sample"}, False),
    ],
)
def test_shared_teacher_variants(skip, checkpointing):
    model = tiny_model("llama")
    torch.manual_seed(1)
    inject(model, FlexiDepthConfig(**skip))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    check_same(model, *batch(seed=3))


def test_training_step_uses_the_shared_teacher(monkeypatch):
    """FlexiDepthModule.training_step: the loss equals the full-teacher loss, and the full teacher is not run."""

    from src.config.commands import TrainCommand
    from src.config.schemas import load
    from src.lit import module as module_mod
    from src.lit.module import FlexiDepthModule
    from tests.test_train import compose_cfg

    s = load(
        compose_cfg(["debug=tiny", "loss.objective=kd", "loss.alpha=0.05", "skip.init=released"]),
        TrainCommand,
    )
    module = FlexiDepthModule(model=s.model.to_dict(), skip=s.skip.flexidepth(), optim=s.optim, loss=s.loss)
    module.log = lambda *args, **kwargs: None
    ids, mask, labels = batch(seq=10)
    b = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "lm_denom": torch.tensor(17.0),
        "tok_denom": torch.tensor(25.0),
    }
    model = module.model
    model.train()
    teacher = full_teacher_logits(model, ids, mask)
    out = routed_forward(model, ids, mask, labels=labels)
    c = module.loss_cfg
    ref = kd_loss_sum(out.logits, teacher, labels, c.temperature) / 17.0 + module.alpha * (
        out.routes.skip_loss_sum / 25.0
    )
    called = []
    monkeypatch.setattr(module_mod, "full_teacher_logits", lambda *a: called.append(1))
    loss = module.training_step(b, 0)
    assert not called
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-6, rtol=1e-6)
