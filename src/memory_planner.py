"""Per-GPU memory estimate for FlexiDepth training (frozen base + trainable router/adapter), and whether it fits.

    python -m src.memory_planner arch=llama3_8b gpus=8 gpu_mem=40 zero=2 micro_batch=1 seq=2048
    python -m src.memory_planner all=true         # Llama-3-8B, Llama-2-13B and Llama-3-70B presets

The terms, presets (`ARCHS`) and the trainable count are src/lit/memory_plan.py's (its docstring lists them);
conf/memory_planner.yaml lists the keys.
"""

from __future__ import annotations

from omegaconf import DictConfig

from .config import register
from .config.schemas import load
from .config.tools import MemoryPlanCommand
from .lit.memory_plan import ARCHS, Plan
from .utils.cli import hydra_command
from .utils.errors import ConfigError

register()  # resolvers and typed schemas, before Hydra composes this command's config


@hydra_command("memory_planner")  # conf/memory_planner.yaml; a user error is one `error:` line, exit 2
def main(cfg: DictConfig) -> None:
    s = load(cfg, MemoryPlanCommand)
    if s.arch not in ARCHS:
        raise ConfigError(f"arch must be one of {sorted(ARCHS)}, got {s.arch!r}")
    if s.all:
        for name, mem, zero in (("llama3_8b", 40, 2), ("llama2_13b", 40, 2), ("llama3_70b", 80, 3)):
            for gc in (False, True):
                plan = Plan(ARCHS[name], 8, mem, zero, s.micro_batch, s.seq, gradient_checkpointing=gc)
                print(plan.report(), end="\n\n")
        return
    try:
        plan = Plan(
            ARCHS[s.arch],
            gpus=s.gpus,
            gpu_mem_gb=s.gpu_mem,
            zero=s.zero,
            micro_batch=s.micro_batch,
            seq=s.seq,
            routed_layers=s.routed_layers,
            adapter_rank=s.adapter_rank,
            gradient_checkpointing=s.gradient_checkpointing,
            offload_optimizer=s.offload_optimizer,
            offload_params=s.offload_params,
        )
    except ValueError as err:  # Plan's range checks name the field; the setting is named alike
        raise ConfigError(str(err).replace("gpu_mem_gb", "gpu_mem")) from None
    print(plan.report())


if __name__ == "__main__":
    main()
