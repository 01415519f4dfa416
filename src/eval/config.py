"""The `eval` config group (conf/eval/default.yaml documents each key; conf/eval/compare.yaml changes three
of them for src.compare) as a typed schema, with its checks: counts, the threshold, the device, task names.

    ev = EvalConfig(tasks=["cloze"], n_per_task=16).validate()
    ev.problems()        # [] or one message per device / task-name problem (lm-eval's index is read)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..flexidepth.config import FlexiDepthConfigError, check_tau
from ..tasks.lm_tasks import unknown_task_problems
from ..utils.errors import ConfigError, check_count
from ..utils.hardware import device_problems


@dataclass
class HarnessConfig:
    """`eval.harness`: lm-evaluation-harness settings (src/eval/harness.py)."""

    num_fewshot: int | None = None
    limit: Any = None  # docs per task (int) or a fraction (float < 1), as lm-eval reads it
    max_gen_toks: int | None = None
    include_path: str | None = None
    apply_chat_template: bool = False
    confirm_run_unsafe_code: bool = False
    bootstrap_iters: int = 1000


@dataclass
class EvalConfig:
    """What `src.eval` and `src.compare` evaluate every system on, and how."""

    tasks: list[str] = field(
        default_factory=lambda: ["next_sentence", "cloze", "add_choice", "mul_choice", "copy_choice"]
    )
    n_per_task: int = 200
    max_new_tokens: int = 48
    seed: int = 1234
    batch_size: int = 8
    ppl_max_length: int = 256
    ppl_max_articles: int | None = None
    tau: float | None = None
    device: str = "auto"
    harness: HarnessConfig = field(default_factory=HarnessConfig)

    def validate(self) -> EvalConfig:
        """Counts (each >= 1, ppl_max_length >= 2, ppl_max_articles null for all) and `tau` (null or in
        [0, 1]); ConfigError naming `eval.<key>`. Returns self."""
        for key, low in (("n_per_task", 1), ("max_new_tokens", 1), ("batch_size", 1), ("ppl_max_length", 2)):
            check_count(f"eval.{key}", getattr(self, key), low)
        check_count("eval.ppl_max_articles", self.ppl_max_articles, 1, nullable=True)
        try:
            check_tau(self.tau, "eval.tau", allow_none=True)
        except FlexiDepthConfigError as err:
            raise ConfigError(str(err)) from None
        return self

    def problems(self) -> list[str]:
        """What this machine and lm-eval cannot do as asked: the device, unknown task names."""
        return device_problems(self.device, "eval.device") + unknown_task_problems(
            list(self.tasks), self.harness.include_path
        )


__all__ = ["EvalConfig", "HarnessConfig"]
