"""RunTimeEstimate (src/callbacks/progress.py): the expected wall time printed after the first timed steps."""

from __future__ import annotations

import io
import time

import torch

from src.callbacks.progress import RunTimeEstimate


class FakeTrainer:
    def __init__(self, max_steps: int, global_step: int = 0):
        self.max_steps, self.global_step = max_steps, global_step


def drive(callback, trainer, steps: int, seconds: list[float], accumulate: int, monkeypatch):
    """`steps` optimizer steps of `accumulate` batches each; the clock advances per optimizer step."""
    clock = iter(seconds)
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    module = torch.nn.Linear(2, 2)
    callback.on_train_start(trainer, module)
    for _ in range(steps):
        now[0] += next(clock)
        for b in range(accumulate):
            if b == accumulate - 1:
                trainer.global_step += 1
            callback.on_train_batch_end(trainer, module, None, None, b)


def test_estimate_skips_warmup_and_times_the_next_steps(monkeypatch):
    out = io.StringIO()
    cb = RunTimeEstimate(skip=1, timed=2, file=out)
    trainer = FakeTrainer(max_steps=300)
    # step 1 is the warm-up (30 s, not counted); steps 2 and 3 take 4 s and 6 s: 5 s per step
    drive(cb, trainer, 5, [30.0, 4.0, 6.0, 5.0, 5.0], accumulate=2, monkeypatch=monkeypatch)
    assert cb.estimate == {"seconds_per_step": 5.0, "steps_left": 297, "seconds_left": 1485.0}
    line = out.getvalue()
    assert line.count("\n") == 1 and "5.00 s per optimizer step (steps 2-3" in line
    assert (
        "~24 min 45 s for the 297 steps left" in line and "float32 on cpu" in line and "native bf16" in line
    )


def test_resumed_run_and_no_step_limit(monkeypatch):
    out = io.StringIO()
    cb = RunTimeEstimate(skip=1, timed=2, file=out)
    drive(cb, FakeTrainer(max_steps=300, global_step=100), 3, [9.0, 2.0, 2.0], 1, monkeypatch)
    assert cb.estimate["steps_left"] == 197 and "(steps 102-103" in out.getvalue()
    quiet = RunTimeEstimate(file=io.StringIO())
    drive(quiet, FakeTrainer(max_steps=-1), 4, [1.0] * 4, 1, monkeypatch)
    assert quiet.estimate is None and quiet.file.getvalue() == ""
