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


class RunTimeEstimate(L.Callback):
    """Print, once, the run's expected wall time on this machine, from timed optimizer steps.

    The first `skip` optimizer steps are not timed (allocator and kernel warm-up), the next `timed` are; then
    one line: seconds per step, the steps left until `trainer.max_steps`, their expected time (validation and
    checkpoint export not included), the model's dtype and whether this CPU computes bf16 natively
    (`src.utils.hardware.cpu_has_fast_bf16`: without it, CPU runs are fp32 and several times slower).
    Nothing is printed for runs without a step limit or with fewer steps left than the timing needs.
    """

    def __init__(self, skip: int = 1, timed: int = 2, file=None):
        self.skip, self.timed, self.file = int(skip), int(timed), file
        self._start_step: int | None = None
        self._t0: float | None = None
        self.estimate: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step, self._t0, self.estimate = (
            trainer.global_step,
            None,
            None,
        )  # a resumed run starts later

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        if self.estimate is not None or self._start_step is None:
            return
        if trainer.max_steps is None or trainer.max_steps < 0:
            return
        step = trainer.global_step
        done = step - self._start_step
        if done == self.skip and self._t0 is None:
            self._t0 = time.perf_counter()
        elif self._t0 is not None and done == self.skip + self.timed:
            per_step = (time.perf_counter() - self._t0) / self.timed
            left = max(trainer.max_steps - step, 0)
            self.estimate = {
                "seconds_per_step": per_step,
                "steps_left": left,
                "seconds_left": per_step * left,
            }
            self._report(trainer, pl_module)

    def _report(self, trainer, pl_module) -> None:
        import sys

        from ..utils.hardware import cpu_has_fast_bf16

        e = self.estimate
        params = next(pl_module.parameters(), None)
        dtype = str(
            getattr(
                getattr(pl_module, "model", pl_module), "dtype", params.dtype if params is not None else ""
            )
        )
        device = params.device.type if params is not None else "cpu"
        native = "" if device != "cpu" else f", CPU native bf16: {'yes' if cpu_has_fast_bf16() else 'no'}"
        secs = int(round(e["seconds_left"]))
        left = (
            f"{secs // 3600} h {secs % 3600 // 60:02d} min"
            if secs >= 3600
            else f"{secs // 60} min {secs % 60:02d} s"
        )
        print(
            f"timing: {e['seconds_per_step']:.2f} s per optimizer step (steps {self._start_step + self.skip + 1}-"
            f"{self._start_step + self.skip + self.timed}; {dtype.removeprefix('torch.')} on {device}{native}); "
            f"expected ~{left} for the {e['steps_left']} steps left, validation not included",
            file=self.file or sys.stdout,
            flush=True,
        )
