"""Training objectives of FlexiDepth (the `loss` config group): the LM term, the skip-loss weight alpha and
how alpha moves during training.

    L = L_lm + alpha_t * L_skip                      (docs/method.md §4)

L_lm is one of
  * ``ce``:  next-token cross-entropy on the training text (the paper's objective);
  * ``kd``:  self-distillation: KL(p_base || p_routed) per supervised position, where p_base is the *same*
             model with routing switched off (the frozen base layers, no second copy in memory), both softened
             by ``temperature`` and the KL multiplied by temperature^2 (Hinton et al., 2015, "Distilling the
             Knowledge in a Neural Network", Sec. 2). With routing off the two distributions are equal, so the
             term and its gradient are exactly 0: skipping is penalised only by how far it moves the output.
  * ``mix``: (1 - kd_weight) * ce + kd_weight * kd.

alpha_t is ``alpha`` scaled by a linear warm-up over ``alpha_warmup_steps`` optimizer steps, or, when
``target_layers_skipped`` is set, the Lagrange multiplier of the constraint "mean layers skipped on training
tokens = target", updated after every optimizer step by dual ascent (Boyd & Vandenberghe, "Convex
Optimization", Sec. 5.5) in units of the configured ``alpha``:

    alpha_{t+1} = alpha_t + rate_t * alpha * (target - skipped_t),   clamped to [-alpha_max, alpha_max]
    rate_t = controller_rate (below target) or controller_rate * controller_down_factor (above it)

where skipped_t is the mean number of routed layers the step's training tokens skipped (hard decisions,
padding excluded). The multiplier is signed on purpose: a token whose gate fell below tau gets no gradient
that would bring it back (its layer did not run, so nothing says running would have been better), so once a
run overshoots the budget only a *negative* weight on L_skip (which raises every gate) can pull it back.
The faster way down is an anti-windup measure: while the fresh gates (sigmoid(3) = 0.95) sink towards tau
nothing is skipped yet, the multiplier keeps growing, and the first crossing overshoots; it must unwind
quickly. A researcher asks for a compute budget instead of guessing alpha; runs trained to the same target are matched
in skip rate, which is what ablations need.

Hard decisions make the realised count jump when many gates cross tau together (a fresh router gives every
token the same gate), so the count the controller reaches at the end of training is close to, not exactly,
the target. With ``calibrate_tau`` (default) the exported model's threshold is then set to the k/R quantile
of its gates on the validation split (training-side text, never the held-out sets), k = the target: the
checkpoint skips the budget at its own threshold. Without a target, tau stays as configured (0.5, the paper).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..utils.errors import UserError

OBJECTIVES = ("ce", "kd", "mix")


class LossConfigError(UserError, ValueError):
    """A `loss.<key>` setting is invalid; the message names the key."""


TEMPERATURE_RANGE = (
    0.01,
    100.0,
)  # distillation temperature: outside it logits / T overflow or flatten to uniform


@dataclass
class LossConfig:
    """The `loss` config group (conf/loss/default.yaml documents each key)."""

    alpha: float = 1e-3
    objective: str = "ce"
    kd_weight: float = 0.5
    temperature: float = 1.0
    alpha_warmup_steps: int = 0
    target_layers_skipped: float | None = None
    controller_rate: float = 0.02
    controller_down_factor: float = 4.0
    alpha_max: float = 1.0
    calibrate_tau: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> LossConfig:
        """Value checks; LossConfigError naming `loss.<key>`. Returns self."""
        for key in ("alpha", "temperature", "controller_rate", "controller_down_factor", "alpha_max"):
            if getattr(self, key) < 0:
                raise LossConfigError(f"loss.{key} must be a number >= 0, got {getattr(self, key)!r}")
        if self.objective not in OBJECTIVES:
            raise LossConfigError(f"loss.objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 <= float(self.kd_weight) <= 1.0:
            raise LossConfigError(f"loss.kd_weight must be in [0, 1], got {self.kd_weight!r}")
        if not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:
            raise LossConfigError(
                f"loss.temperature must be in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}] (logits are "
                f"divided by it; a smaller one overflows), got {self.temperature!r}"
            )
        if self.alpha_warmup_steps < 0:
            raise LossConfigError(
                f"loss.alpha_warmup_steps must be an integer >= 0, got {self.alpha_warmup_steps!r}"
            )
        if self.alpha > self.alpha_max:
            raise LossConfigError(f"loss.alpha ({self.alpha}) must be <= loss.alpha_max ({self.alpha_max})")
        t = self.target_layers_skipped
        if t is not None:
            if t < 0:
                raise LossConfigError(f"loss.target_layers_skipped must be a number >= 0 or null, got {t!r}")
            if self.alpha <= 0:
                raise LossConfigError(
                    "loss.alpha (the controller's starting value) must be > 0 with a target"
                )
        return self

    def alpha_override_note(self, overrides: list[str]) -> str | None:
        """A note when the command line (`overrides`, Hydra's `key=value` list) sets an alpha (`loss.alpha` or
        `skip.alpha`) while a layers-skipped budget (`target_layers_skipped`, as the embedded model's recipe
        has) is set: the alpha is then only the controller's starting value, which a user sweeping alpha
        would not expect. None otherwise."""
        keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        given = sorted(keys & {"loss.alpha", "skip.alpha"})
        if self.target_layers_skipped is None or not given:
            return None
        return (
            f"{given[0]} is only the starting value of the alpha controller: loss.target_layers_skipped="
            f"{self.target_layers_skipped:g} (the recipe's budget) adapts alpha every step. Add "
            "loss.target_layers_skipped=null for a fixed alpha."
        )

    def budget_problems(self, routed_layers: int) -> list[str]:
        """The layers-skipped budget against the model's `routed_layers` (0 <= target <= R): one message
        naming `loss.target_layers_skipped` when it cannot be reached, [] otherwise."""
        t = self.target_layers_skipped
        if t is not None and t > routed_layers:
            return [f"loss.target_layers_skipped={t} exceeds the {routed_layers} routed layers of this model"]
        return []


def kd_loss_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Summed KL(teacher || student) over supervised next-token positions, times temperature^2.

    Args:
        student_logits / teacher_logits: [B, T, V]; position t predicts token t + 1.
        labels: [B, T] unshifted labels, -100 where no loss is taken (the same positions as the CE term).
        temperature: softening of both distributions.

    Returns:
        A 0-dim fp32 tensor; divide by the supervised count (as for the CE sum) for the mean.
    """
    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=-1))).sum()
    return kl * temperature**2


class AlphaSchedule:
    """alpha_t: fixed with linear warm-up, or adapted to a layers-skipped target (module docstring)."""

    def __init__(self, cfg: LossConfig):
        self.cfg = cfg
        self.multiplier = float(cfg.alpha) if cfg.target_layers_skipped is not None else None

    @property
    def adaptive(self) -> bool:
        return self.multiplier is not None

    def value(self, step: int) -> float:
        """alpha for optimizer step `step` (0-based)."""
        if self.adaptive:
            return self.multiplier
        warm = self.cfg.alpha_warmup_steps
        return self.cfg.alpha * (min(1.0, (step + 1) / warm) if warm else 1.0)

    def update(self, layers_skipped: float) -> None:
        """One dual-ascent step after an optimizer step whose tokens skipped `layers_skipped` layers."""
        if not self.adaptive:
            return
        c = self.cfg
        error = float(c.target_layers_skipped) - layers_skipped
        rate = c.controller_rate * (1.0 if error >= 0 else c.controller_down_factor)
        step = rate * c.alpha * error
        self.multiplier = min(max(self.multiplier + step, -c.alpha_max), c.alpha_max)

    def state_dict(self) -> dict[str, Any]:
        return {"multiplier": self.multiplier}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.adaptive and state.get("multiplier") is not None:
            self.multiplier = float(state["multiplier"])
