"""Skip loss and route statistics (docs/method.md §4-5), and a forward that returns them with the logits.

    L_skip = sum over valid tokens t of (sum over routed layers l of g_t^l)^2  /  #valid tokens

Everything is returned as sums and counts as well as means, so the training loop can normalise by the
token count of a whole optimizer step (gradient accumulation and world size then do not change the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routes:
    """Gates/decisions of one forward. gates: [B, T, R] fp32; run: [B, T, R] bool; valid: [B, T] bool."""

    gates: torch.Tensor
    run: torch.Tensor
    valid: torch.Tensor
    num_layers: int  # L, all decoder layers (unrouted ones always run)

    @property
    def n_valid(self) -> torch.Tensor:
        return self.valid.sum()

    @property
    def skip_loss_sum(self) -> torch.Tensor:
        per_token = self.gates.sum(-1).pow(2)
        return (per_token * self.valid).sum()

    @property
    def skip_loss(self) -> torch.Tensor:
        return self.skip_loss_sum / self.n_valid.clamp_min(1)

    @property
    def layers_used(self) -> torch.Tensor:
        """[B, T] layers each token ran, unrouted layers included (0 on padding)."""
        routed = self.run.shape[-1]
        used = (self.num_layers - routed) + self.run.sum(-1)
        return used * self.valid

    @property
    def layer_run_counts(self) -> torch.Tensor:
        """[R] number of valid tokens that ran each routed layer."""
        return (self.run & self.valid.unsqueeze(-1)).sum((0, 1))

    @property
    def layer_run_fraction(self) -> torch.Tensor:
        return self.layer_run_counts.float() / self.n_valid.clamp_min(1)

    @property
    def layers_skipped_mean(self) -> torch.Tensor:
        routed = self.run.shape[-1]
        return routed - self.layer_run_counts.sum().float() / self.n_valid.clamp_min(1)


@dataclass
class RoutedOutput:
    logits: torch.Tensor
    routes: Routes | None  # None when routing is disabled
    lm_loss_sum: torch.Tensor | None = None
    lm_tokens: torch.Tensor | None = None
    cache: object | None = None

    @property
    def lm_loss(self) -> torch.Tensor | None:
        if self.lm_loss_sum is None:
            return None
        return self.lm_loss_sum / self.lm_tokens.clamp_min(1)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (fp32) and the number of supervised positions (labels != -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, (shift_labels != -100).sum()


def routed_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    **kwargs,
) -> RoutedOutput:
    """Run a FlexiDepth model and collect its routes.

    Args:
        model: a model prepared by `inject`.
        input_ids: [B, T].
        attention_mask: [B, T], 1 for real tokens; padding is excluded from every statistic.
        labels: [B, T] (unshifted, -100 = ignore) to also get the summed LM loss.
        **kwargs: passed to the HF forward (e.g. cache, use_cache, position_ids).
    """
    state = model.flexidepth
    state.recorder.clear()
    state.recorder.token_mask = attention_mask  # kept until the next clear(): backward recomputes read it
    kwargs.setdefault("use_cache", False)
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    routes = None
    if state.recorder.gates:
        gates, run = state.recorder.stacked()
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        routes = Routes(gates, run, valid[:, -gates.shape[1] :], state.num_layers)
    result = RoutedOutput(out.logits, routes, cache=getattr(out, "cache", None))
    if labels is not None:
        result.lm_loss_sum, result.lm_tokens = lm_loss_sum(out.logits, labels)
    return result
