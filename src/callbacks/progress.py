"""Console callbacks every training run gets: a progress bar over the real number of steps and a final
validation at the last step.

Lightning's bar counts the epoch's batches (e.g. `6/496 ... 1:21:35` for a 40-step run on a long corpus),
and validation runs only every `trainer.val_check_interval` steps, so a run shorter than the interval (or one
whose length is not a multiple of it) ended without validating its final weights: no `val/ppl`, no best
checkpoint, empty sweep-summary columns.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """The training bar's total is the number of batches this run will actually process in this epoch:
    min(epoch length, batches left until `trainer.max_steps`), so its ETA is the run's."""

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return total
        accumulate = trainer.accumulate_grad_batches
        done_in_epoch = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        left = done_in_epoch + max(trainer.max_steps - trainer.global_step, 0) * accumulate
        return min(total, left)


class FinalValidation(L.Callback):
    """Validate the final weights: at the batch that completes the last optimizer step (`max_steps`) or the
    last batch of the last epoch, ask the loop to stop there, which makes Lightning run validation at that
    point (inside `fit`, so checkpoints that monitor `val/*` see it). No second validation when the
    interval already hits the last step: the loop checks once per batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.limit_val_batches == 0:
            return
        loop = trainer.fit_loop
        last_step = trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1
        if last_step or (last_epoch and loop.epoch_loop.batch_progress.is_last_batch):
            trainer.should_stop = True
