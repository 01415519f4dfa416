"""Layer-usage histograms: per-token layers used and per-layer run fraction, every `every_n_steps` steps.

Logged to W&B (when a WandbLogger is attached) as
    skip/layers_used_hist      histogram of per-token layers used (bins = L-R .. L)
    skip/layer_run_fraction    histogram over layer index (bin height = run fraction of that layer)
    skip/layer_run_table       wandb.Table(step, layer, run_fraction)
    skip/run_fraction_heatmap  image: run fraction per layer (rows) over training (columns)
plus scalar `skip/run_fraction/layer_{i}` through Lightning's logger (any logger). The same data is
written to `<output_dir>/layer_usage.jsonl` and the heatmap to `<output_dir>/run_fraction_heatmap.png`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from ..utils.files import append_text, atomic_save_figure

log = logging.getLogger(__name__)


class LayerUsageCallback(L.Callback):
    def __init__(self, every_n_steps: int = 50, output_dir: str | None = None):
        self.every_n_steps = int(every_n_steps)
        self.output_dir = Path(output_dir) if output_dir else None
        self.history: list[tuple[int, np.ndarray]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only at optimizer steps
        if trainer.global_step % self.every_n_steps == 0:
            self.flush(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.usage.tokens > 0:
            self.flush(trainer, pl_module)

    def flush(self, trainer, pl_module) -> None:
        usage = pl_module.usage
        packed = torch.cat(
            [usage.run_counts, usage.used_hist, torch.tensor([usage.tokens], dtype=torch.float64)]
        )
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed.to(pl_module.device), reduce_op="sum").cpu()
        routed = len(usage.layer_indices)
        run_counts, used_hist, tokens = packed[:routed], packed[routed : 2 * routed + 1], float(packed[-1])
        usage.reset()
        if tokens <= 0 or not trainer.is_global_zero:
            return
        fraction = (run_counts / tokens).numpy()
        step = trainer.global_step
        self.history.append((step, fraction))
        scalars = {
            f"skip/run_fraction/layer_{layer}": float(v)
            for layer, v in zip(usage.layer_indices, fraction, strict=True)
        }
        for lg in trainer.loggers:  # direct, since self.log is not allowed in on_train_end
            lg.log_metrics(scalars, step=step)
        self._write_files(step, usage, fraction, used_hist.numpy(), tokens)
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_logger is not None:
            self._log_wandb(wandb_logger, step, usage, fraction, used_hist.numpy())

    def _write_files(self, step, usage, fraction, used_hist, tokens) -> None:
        if self.output_dir is None:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "step": step,
            "tokens": tokens,
            "layers": usage.layer_indices,
            "run_fraction": fraction.round(6).tolist(),
            "layers_used_counts": {str(usage.min_layers + k): float(c) for k, c in enumerate(used_hist)},
        }
        append_text(self.output_dir / "layer_usage.jsonl", json.dumps(record) + "\n")  # never through a link
        atomic_save_figure(self._heatmap(), self.output_dir / "run_fraction_heatmap.png", dpi=80)

    def _heatmap(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.close("all")
        steps = [s for s, _ in self.history]
        grid = np.stack([f for _, f in self.history], axis=1)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("log point (global step)")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=6, rotation=90)
        ax.set_ylabel("routed layer")
        ax.set_title("run fraction per layer over training")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        return fig

    def _log_wandb(self, wandb_logger, step, usage, fraction, used_hist) -> None:
        import wandb

        layer_edges = np.arange(len(usage.layer_indices) + 1, dtype=np.float64) + usage.layer_indices[0]
        if usage.layer_indices != list(range(usage.layer_indices[0], usage.layer_indices[-1] + 1)):
            layer_edges = np.arange(len(usage.layer_indices) + 1, dtype=np.float64)  # non-contiguous: by rank
        used_edges = np.arange(len(used_hist) + 1, dtype=np.float64) + usage.min_layers - 0.5
        table = wandb.Table(
            columns=["step", "layer", "run_fraction"],
            data=[[step, layer, float(f)] for layer, f in zip(usage.layer_indices, fraction, strict=True)],
        )
        # never pass step= to experiment.log (it breaks Lightning's step bookkeeping); carry it as a key
        wandb_logger.experiment.log(
            {
                "skip/layers_used_hist": wandb.Histogram(
                    np_histogram=(used_hist.tolist(), used_edges.tolist())
                ),
                "skip/layer_run_fraction": wandb.Histogram(
                    np_histogram=(fraction.tolist(), layer_edges.tolist())
                ),
                "skip/layer_run_table": table,
                "skip/run_fraction_heatmap": wandb.Image(self._heatmap()),
                "trainer/global_step": step,
            }
        )
