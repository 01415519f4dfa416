"""The settings of the tool commands (src.convert, src.analyze, src.sweep_summary, src.memory_planner): one
typed schema each, the primary config's first default like every command's (src/config/commands.py), with
the checks the command runs before any work. Their conf/<name>.yaml documents each key."""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.errors import ConfigError


def required(key: str, value: str | None, what: str) -> str:
    """`value`, or ConfigError naming `key` and what it must be when it is unset or empty."""
    if not value:
        raise ConfigError(f"{key} is required: {what}")
    return value


@dataclass
class ConvertCommand:
    """`python -m src.convert` (conf/convert.yaml)."""

    checkpoint: str | None = None  # a Lightning .ckpt file or a DeepSpeed checkpoint folder
    out_dir: str | None = None  # the FlexiDepth checkpoint folder to write

    def check(self) -> None:
        required("checkpoint", self.checkpoint, "a Lightning .ckpt file or a DeepSpeed checkpoint folder")
        required("out_dir", self.out_dir, "the FlexiDepth checkpoint folder to write")


@dataclass
class AnalyzeCommand:
    """`python -m src.analyze` (conf/analyze.yaml)."""

    eval_dir: str | None = None  # an evaluation folder of src.eval
    n_boot: int = 1000
    seed: int = 0
    overwrite: bool = False

    def check(self) -> None:
        required("eval_dir", self.eval_dir, "eval_dir=<evaluation folder> (outputs/evaluate/runs/<run>)")


@dataclass
class SweepSummaryCommand:
    """`python -m src.sweep_summary` (conf/sweep_summary.yaml)."""

    sweep_dir: str | None = None  # a multirun folder (hydra.sweep.dir)
    out_dir: str | None = None  # null: the sweep folder
    baseline_ppl: float | None = None  # the base model's perplexity: adds ppl_ratio = baseline / ppl

    def check(self) -> None:
        required("sweep_dir", self.sweep_dir, "a multirun folder (the sweep folder printed at its start)")
        if self.baseline_ppl is not None and not self.baseline_ppl > 0:
            raise ConfigError(f"baseline_ppl must be a finite perplexity > 0, got {self.baseline_ppl}")


@dataclass
class MemoryPlanCommand:
    """`python -m src.memory_planner` (conf/memory_planner.yaml); the values are checked by `Plan`."""

    arch: str = "llama3_8b"  # a preset of src/lit/memory_plan.py ARCHS (not `model`: that is a config group)
    gpus: int = 8
    gpu_mem: float = 80.0  # GB per GPU
    zero: int = 2
    micro_batch: int = 1
    seq: int = 2048
    routed_layers: int | None = None  # null: the last half
    adapter_rank: int | None = None
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    all: bool = False  # print the Llama-3-8B, Llama-2-13B and Llama-3-70B plans instead


TOOLS: dict[str, type] = {
    "convert": ConvertCommand,
    "analyze": AnalyzeCommand,
    "sweep_summary": SweepSummaryCommand,
    "memory_planner": MemoryPlanCommand,
}
