"""The LightningModule: a frozen base LM with injected FlexiDepth layers, trained on L_lm + alpha * L_skip.

Loss normalisation: every training micro-batch carries `lm_denom` / `tok_denom`, the supervised and valid
token counts of its whole optimizer step divided by (accumulation x world size) (see data/sampler.py).
Dividing *summed* losses by them makes the gradient the exact global token mean, independent of how the
step is split into micro-batches or ranks -- the manual fix the official code needs is built in.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from ..flexidepth import FlexiDepthConfig, parameter_counts, routed_forward, set_routing
from ..flexidepth.flops import flops_report
from ..flexidepth.inject import is_flexidepth_param
from ..models.config import ModelConfig
from ..models.loader import load_base_model
from .objectives import AlphaSchedule, LossConfig, kd_loss_sum
from .optim import OptimConfig
from .teacher import full_teacher_logits, student_and_teacher


class UsageAccumulator:
    """Per-layer run counts and a histogram of per-token layers used, summed over an interval."""

    def __init__(self, layer_indices: list[int], num_layers: int):
        self.layer_indices = list(layer_indices)
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        routed = len(self.layer_indices)
        self.run_counts = torch.zeros(routed, dtype=torch.float64)
        self.used_hist = torch.zeros(routed + 1, dtype=torch.float64)  # bin k: L - R + k layers used
        self.tokens = 0.0

    @torch.no_grad()
    def update(self, routes) -> None:
        valid = routes.valid
        self.run_counts += routes.layer_run_counts.double().cpu()
        ran = routes.run.sum(-1)[valid]
        self.used_hist += torch.bincount(ran.cpu(), minlength=len(self.layer_indices) + 1).double()
        self.tokens += float(valid.sum())

    @property
    def min_layers(self) -> int:
        return self.num_layers - len(self.layer_indices)


class FlexiDepthModule(L.LightningModule):
    """Hosts the model; logs train/*, val/*, skip/* metrics.

    Args:
        model: the `model` node as a mapping (name_or_path, dtype, arch, ...; `ModelConfig.to_dict()`).
        skip: the routers' and adapters' settings (checked; `inject_fn` may fill in the routed layers).
        optim: the optimizer's settings.
        loss: the objective (alpha, objective, temperature, warm-up, target; its budget already checked
            against the routed layers by the command).
        gradient_checkpointing: enable HF gradient checkpointing in the frozen base.
        method: the trained method's name (stored in hparams and checkpoints: "flexidepth", "mindskip", ...).
        inject_fn: what wraps the routed layers, `inject_fn(model, flexi_cfg)` (the method object's
            `inject`, src/methods/); None: the registry's method `method`. The module imports no baseline.
    Checkpoints store the settings as plain dicts (`hyper_parameters`: model, skip, optim,
    gradient_checkpointing, method, loss). Raises MethodConfigError when `method` trains nothing.
    """

    def __init__(
        self,
        model: dict[str, Any],
        skip: FlexiDepthConfig,
        optim: OptimConfig,
        gradient_checkpointing: bool = False,
        method: str = "flexidepth",
        loss: LossConfig | None = None,
        inject_fn: Callable[[Any, FlexiDepthConfig], Any] | None = None,
    ):
        super().__init__()
        self.loss_cfg = loss if loss is not None else LossConfig()
        self.save_hyperparameters(
            {
                "model": dict(model),
                "skip": skip.to_dict(),
                "optim": asdict(optim),
                "gradient_checkpointing": gradient_checkpointing,
                "method": method,
                "loss": self.loss_cfg.to_dict(),
            },
            logger=False,
        )
        self.alpha_schedule = AlphaSchedule(self.loss_cfg)
        self.flexi_cfg = copy.deepcopy(skip)  # the model's own: inject_fn and set_tau change it
        self.optim_cfg = optim
        self.method = method
        self.model = load_base_model(
            ModelConfig.from_node(model, "the module's model (hyper_parameters.model)")
        )
        if inject_fn is None:
            from ..methods import method_class

            inject_fn = method_class(
                method
            )().inject  # raises MethodConfigError for a method with nothing to train
        inject_fn(self.model, self.flexi_cfg)
        if gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5 name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        state = self.model.flexidepth
        self.usage = UsageAccumulator(state.layer_indices, state.num_layers)
        self.strict_loading = False  # Lightning checkpoints hold only router/adapter tensors
        self._val: dict[str, float] = {}
        self._base_val_loss: float | None = None  # base-model val loss, measured once
        self._clock: float | None = None
        self._window = [0.0, 0.0]  # skipped-layer sum, valid tokens of the current optimizer step
        # what the method's inject decided (e.g. layer_replacement's layers; `Method.training_record`, read from
        # the object whose `inject` inject_fn is): checkpoints and the export carry it
        record = getattr(getattr(inject_fn, "__self__", None), "training_record", None)
        self.method_details: dict[str, Any] = dict(record()) if callable(record) else {}

    @property
    def alpha(self) -> float:
        """The skip-loss weight of the current optimizer step (fixed, warming up, or adapted to a target)."""
        return self.alpha_schedule.value(self.global_step)

    # ------------------------------------------------------------------ forward / loss
    def forward(self, batch: dict[str, torch.Tensor]):
        return routed_forward(self.model, batch["input_ids"], batch["attention_mask"], labels=batch["labels"])

    def _teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the same model with routing off (the frozen base), without autograd, every layer run
        (the reference `training_step` matches; it shares the unrouted prefix instead, src/lit/teacher.py)."""
        return full_teacher_logits(self.model, batch["input_ids"], batch["attention_mask"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        c = self.loss_cfg
        if c.objective != "ce":  # the teacher reuses the student's forward up to the first routed layer
            out, teacher = student_and_teacher(self.model, lambda: self(batch))
        else:
            out, teacher = self(batch), None
        routes = out.routes
        ce = out.lm_loss_sum / batch["lm_denom"]
        if teacher is None:
            lm = ce
        else:
            kd = kd_loss_sum(out.logits, teacher, batch["labels"], c.temperature) / batch["lm_denom"]
            self.log("train/kd_loss", kd.detach(), batch_size=batch["input_ids"].shape[0])
            lm = kd if c.objective == "kd" else (1 - c.kd_weight) * ce + c.kd_weight * kd
        skip = routes.skip_loss_sum / batch["tok_denom"]
        loss = lm + self.alpha * skip
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at global step {self.global_step} (lm={lm.item()}, skip={skip.item()}); "
                "stopping. Checkpoints written before this step stay in the run's checkpoints/ folder "
                "(resume=auto continues from the last one)."
            )
        self.usage.update(routes)
        n = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/lm_loss", out.lm_loss.detach(), batch_size=n)
        self.log("train/skip_loss", routes.skip_loss.detach(), batch_size=n)
        self.log("skip/layers_skipped_mean", routes.layers_skipped_mean, prog_bar=True, batch_size=n)
        self.log(
            "skip/gate_mean",
            (routes.gates * routes.valid.unsqueeze(-1)).sum() / (routes.n_valid * routes.gates.shape[-1]),
            batch_size=n,
        )
        self._tokens_in_step = getattr(self, "_tokens_in_step", 0.0) + float(routes.n_valid)
        self._window[0] += float(routes.layers_skipped_mean) * float(routes.n_valid)
        self._window[1] += float(routes.n_valid)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # throughput over optimizer steps (tokens on this rank x world size)
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        now = time.perf_counter()
        if self._clock is not None:
            tps = self._tokens_in_step * self.trainer.world_size / max(now - self._clock, 1e-9)
            self.log("train/tokens_per_s", tps, prog_bar=True)
        self._clock, self._tokens_in_step = now, 0.0
        window = torch.tensor(self._window, dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            window = self.trainer.strategy.reduce(window, reduce_op="sum")
        self._window = [0.0, 0.0]
        skipped = float(window[0] / window[1].clamp_min(1))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("skip/tau", self.flexi_cfg.tau)
        self.log("skip/alpha", self.alpha)  # the alpha this step used (before the controller's update)
        self.log("skip/step_layers_skipped", skipped)
        self.alpha_schedule.update(skipped)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        routed = len(self.usage.layer_indices)
        self._val = {
            "lm_sum": 0.0,
            "lm_tokens": 0.0,
            "base_sum": 0.0,
            "tokens": 0.0,
            "run": torch.zeros(routed, dtype=torch.float64),
        }

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self(batch)
        r = out.routes
        self._val["lm_sum"] += float(out.lm_loss_sum)
        self._val["lm_tokens"] += float(out.lm_tokens)
        self._val["tokens"] += float(r.n_valid)
        self._val["run"] += r.layer_run_counts.double().cpu()
        if self._base_val_loss is None:  # the frozen base on the same batches, once per run, for val/base_ppl
            set_routing(self.model, False)
            try:
                self._val["base_sum"] += float(self(batch).lm_loss_sum)
            finally:
                set_routing(self.model, True)

    def _val_totals(self) -> tuple[float, float, torch.Tensor, float, float] | None:
        """(lm loss per supervised token, layers skipped per token, run counts [R], tokens, base loss sum) of
        the accumulated validation, summed over ranks; None when no token was seen."""
        v = self._val
        packed = torch.tensor(
            [v["lm_sum"], v["lm_tokens"], v["tokens"], v["base_sum"], *v["run"].tolist()],
            dtype=torch.float64,
            device=self.device,
        )
        trainer = self._trainer  # None when measured outside a Trainer (`measure`)
        if trainer is not None and trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        lm_sum, lm_tokens, tokens, base_sum, run = packed[0], packed[1], packed[2], packed[3], packed[4:]
        if tokens <= 0:
            return None
        loss = float(lm_sum / lm_tokens.clamp_min(1))
        skipped = float(len(run) - run.sum() / tokens)
        return loss, skipped, run, float(base_sum / lm_tokens.clamp_min(1)), float(tokens)

    def on_validation_epoch_end(self) -> None:
        totals = self._val_totals()
        if totals is None:
            return
        loss, skipped, run, base_loss, _ = totals
        if self._base_val_loss is None and not self.trainer.sanity_checking:
            self._base_val_loss = base_loss
        if self._base_val_loss is not None:
            self.log("val/base_ppl", math.exp(min(self._base_val_loss, 50.0)))
        self.log("val/lm_loss", loss, sync_dist=False)
        self.log("val/ppl", math.exp(min(loss, 50.0)), prog_bar=True)
        self.log("val/layers_skipped_mean", skipped)
        self.log("val/skip_rate", skipped / len(run))
        # where speed could come from: analytic MACs at the realised skip rate (K/V, router, adapter counted)
        report = flops_report(self.model.config, self.flexi_cfg, skipped)
        self.log("val/analytic_macs_saved_frac", report["analytic_macs_saved_frac"])
        self.log("val/flop_ideal_speedup", report["flop_ideal_speedup"])

    @torch.no_grad()
    def measure(self, batches) -> dict[str, float]:
        """Validation metrics of the model as it is now (e.g. after `calibrate_tau`), outside Lightning's loop:
        {"val/lm_loss", "val/ppl", "val/layers_skipped_mean", "val/skip_rate", "val/analytic_macs_saved_frac",
        "val/flop_ideal_speedup", "val/tau"} over `batches` (dicts of [B, T] tensors, e.g. the validation loader),
        in eval mode, computed exactly as the validation epoch computes them. Empty dict without tokens."""
        was_training = self.model.training
        self.model.eval()
        self.on_validation_epoch_start()
        base = self._base_val_loss
        self._base_val_loss = 0.0  # not None: the base model's loss is not recomputed
        try:
            for batch in batches:
                self.validation_step({k: v.to(self.device) for k, v in batch.items()}, 0)
            totals = self._val_totals()
        finally:
            self._base_val_loss = base
            self.model.train(was_training)
        if totals is None:
            return {}
        loss, skipped, run, _, _ = totals
        report = flops_report(self.model.config, self.flexi_cfg, skipped)
        return {
            "val/lm_loss": loss,
            "val/ppl": math.exp(min(loss, 50.0)),
            "val/layers_skipped_mean": skipped,
            "val/skip_rate": skipped / len(run),
            "val/analytic_macs_saved_frac": report["analytic_macs_saved_frac"],
            "val/flop_ideal_speedup": report["flop_ideal_speedup"],
            "val/tau": float(self.flexi_cfg.tau),
        }

    # ------------------------------------------------------------------ optimizer
    def configure_optimizers(self):
        o = self.optim_cfg
        groups: dict[str, list] = {"router": [], "adapter": []}
        for name, p in self.trainer.model.named_parameters():
            if p.requires_grad:
                groups["router" if ".router." in f".{name}" else "adapter"].append(p)
        params = [
            {"params": ps, "lr": float(getattr(o, f"{kind}_lr") or o.lr), "name": kind}
            for kind, ps in groups.items()
            if ps
        ]
        opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(math.ceil(o.warmup_ratio * total))
        floor = float(o.min_lr_ratio)

        def schedule(step: int) -> float:  # linear warmup, cosine decay to min_lr_ratio
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ threshold for the budget
    @torch.no_grad()
    def calibrate_tau(self, batches) -> float | None:
        """With a layers-skipped target and `loss.calibrate_tau`: set tau to the threshold at which the model
        skips the target on `batches` (the k/R gate quantile, `src.flexidepth.calibrate.tau_for_k`); returns it.

        batches: iterable of dicts with input_ids / attention_mask [B, T] (the validation loader)."""
        c = self.loss_cfg
        if c.target_layers_skipped is None or not c.calibrate_tau:
            return None
        from ..flexidepth import set_tau
        from ..flexidepth.calibrate import tau_for_k

        pairs = [(b["input_ids"].to(self.device), b["attention_mask"].to(self.device)) for b in batches]
        if not pairs:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            tau = tau_for_k(self.model, pairs, float(c.target_layers_skipped))
        finally:
            self.model.train(was_training)
        set_tau(self.model, tau)  # also updates self.flexi_cfg (the same config object)
        return tau

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # keep the frozen base out of Lightning checkpoints: it is reloaded from model.name_or_path
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if is_flexidepth_param(k)
        }
        checkpoint["flexidepth"] = {
            "config": self.flexi_cfg.to_dict(),
            "alpha": self.alpha,
            "loss": self.loss_cfg.to_dict(),
            "alpha_schedule": self.alpha_schedule.state_dict(),
        }
        if self.method_details:
            checkpoint["flexidepth"]["method_details"] = dict(self.method_details)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # resume continues the controller where it was (the target run's alpha is training state)
        stored = (checkpoint.get("flexidepth") or {}).get("method_details") or {}
        if "layers" in stored and stored["layers"] != self.method_details.get("layers"):
            raise ValueError(
                f"resume: the checkpoint's method={self.method} chose layers {stored['layers']}, this start "
                f"chose {self.method_details.get('layers')} (calibration text, model or method.k changed)"
            )
        state = (checkpoint.get("flexidepth") or {}).get("alpha_schedule")
        if state:
            self.alpha_schedule.load_state_dict(state)

    def parameter_counts(self) -> dict[str, int]:
        return parameter_counts(self.model)
