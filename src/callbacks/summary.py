"""The end of a training run: metrics.json and the closing lines (where the run is, what it reached, how to
evaluate it), written by `RunSummary` when fit ends, after the export callback (on_train_end) has measured
the exported model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from ..utils.files import atomic_write_text


class RunSummary(L.Callback):
    """At the end of fit: `metrics` (the final callback metrics, with the export's re-measured val/* numbers
    when it calibrated tau), written to <output_dir>/metrics.json with `knobs` and printed as the closing
    summary (rank zero). A fit that trained and validated nothing (a resume at `trainer.max_steps`) never
    rewrites metrics.json: `metrics` are then the ones it holds.

    knobs: {"skip": the skip node, "loss": the loss node, "model": model.name_or_path, "run_name": ...}."""

    def __init__(self, output_dir: str | Path, knobs: dict[str, Any]):
        self.output_dir = Path(output_dir)
        self.knobs = knobs
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        if not metrics:  # nothing trained or validated (resumed at max_steps): keep metrics.json as it is
            self.metrics = read_metrics(self.output_dir)
            if not self.metrics:  # stopped after its last checkpoint, before its final validation and export
                from ..utils.errors import RunFolderError

                raise RunFolderError(
                    f"{self.output_dir} reached trainer.max_steps={trainer.global_step} but was stopped before its "
                    "final validation wrote metrics.json, so it is not finished: continue it with resume=auto "
                    f"trainer.max_steps={trainer.global_step + 1} (one more step, then the final validation and "
                    "the export)"
                )
            if trainer.is_global_zero:
                print(
                    f"nothing to train: {self.output_dir} is already at step {trainer.global_step} "
                    "(trainer.max_steps); metrics.json is left as it was",
                    flush=True,
                )
            return
        # a tau calibrated at export: the val/* numbers of the exported model replace those at the training tau
        export = next((cb for cb in trainer.callbacks if type(cb).__name__ == "ExportFlexiDepth"), None)
        metrics.update(getattr(export, "metrics", None) or {})
        self.metrics = metrics
        if trainer.is_global_zero:
            details = getattr(pl_module, "method_details", None)  # what the method decided (its layers, ...)
            knobs = {**self.knobs, "method": {"name": pl_module.method, **details}} if details else self.knobs
            write_metrics(self.output_dir, metrics, trainer.global_step, knobs, tau=pl_module.flexi_cfg.tau)
            print(closing_summary(self.output_dir, metrics, trainer, pl_module), flush=True)


def read_metrics(output_dir: Path) -> dict[str, float]:
    """The metrics of <output_dir>/metrics.json ({} when it is missing or unreadable)."""
    try:
        return dict(json.loads((Path(output_dir) / "metrics.json").read_text())["metrics"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_metrics(
    output_dir: Path,
    metrics: dict[str, float],
    global_step: int,
    knobs: dict[str, Any],
    tau: float | None = None,
) -> Path:
    """<output_dir>/metrics.json: final metrics plus the knobs a sweep summary needs (src/sweep_summary.py).
    `tau` is the exported model's threshold (it differs from skip.tau when the export calibrated it); the
    metrics must have been measured at it."""
    skip = dict(knobs["skip"])
    if tau is not None:
        skip["tau"] = float(tau)
    record = {
        "metrics": metrics,
        "global_step": int(global_step),
        "skip": {k: skip.get(k) for k in ("tau", "adapter_rank", "adapter_reduction", "router")},
        "loss": knobs["loss"],
        "model": str(knobs["model"]),
        "run_name": str(knobs["run_name"]),
    }
    if knobs.get("method"):  # a method that decided something at the start (layer_replacement's layers)
        record["method"] = knobs["method"]
    return atomic_write_text(output_dir / "metrics.json", json.dumps(record, indent=2, sort_keys=True))


def closing_summary(output_dir: Path, metrics: dict[str, float], trainer, module) -> str:
    """The lines printed at the end of a run: where it is, what it reached, how to evaluate it (the run folder
    is enough: src.eval reads the run's model from it)."""
    routed = len(module.model.flexidepth.layer_indices)
    counts = module.parameter_counts()
    lines = [
        f"run finished: {output_dir}",
        f"  steps: {trainer.global_step} optimizer steps; trained {counts['trainable']:,} router/adapter "
        f"parameters of {counts['total']:,}",
    ]
    if "val/ppl" in metrics:
        base = metrics.get("val/base_ppl")
        lines.append(
            f"  val ppl {metrics['val/ppl']:.3f}" + (f" (base model {base:.3f})" if base is not None else "")
        )
        if "val/layers_skipped_mean" in metrics:
            calibrated = metrics.get("val/tau")
            lines.append(
                f"  layers skipped {metrics['val/layers_skipped_mean']:.2f} of {routed} routed "
                f"(skip rate {100 * metrics.get('val/skip_rate', 0.0):.1f}%)"
                + (f" at the export's calibrated tau {calibrated:.4f}" if calibrated is not None else "")
            )
    else:
        lines.append("  no validation ran (trainer.limit_val_batches=0 or no validation data)")
    export = next((cb.dirpath for cb in trainer.callbacks if type(cb).__name__ == "ExportFlexiDepth"), None)
    if export is not None and (Path(export) / "flexidepth_config.json").is_file():
        lines.append(f"  export: {export}")
        lines.append(f"  evaluate: python -m src.eval ckpt_path={output_dir}")
    best = next((cb for cb in trainer.callbacks if getattr(cb, "monitor", None) == "val/ppl"), None)
    if best is not None and getattr(best, "best_model_path", ""):
        lines.append(f"  best checkpoint: {best.best_model_path}")
    return "\n".join(lines)
