"""Per-GPU memory estimate for FlexiDepth training (frozen base + trainable router/adapter), and whether it fits:
the arithmetic of `python -m src.memory_planner` (the command is src/memory_planner.py).

    plan = Plan(ARCHS["llama3_8b"], gpus=8, gpu_mem_gb=40, zero=2, seq=2048)
    plan.breakdown()                  # {"base_weights": bytes, ...} per GPU
    plan.fits(); print(plan.report())

Terms (bytes per GPU, N = data-parallel GPUs):
    base weights     P_base * b_w                   (/N under ZeRO-3; 0 when the parameters are offloaded)
    trainable        T * 4 fp32 master + T * b_w working copy (/N under ZeRO-3)
    gradients        T * 4                          (/N under ZeRO-2/3)
    Adam states      T * 8                          (/N under ZeRO-1/2/3; 0 when the optimizer is offloaded)
    activations      routed layers only: nothing before the first router needs a gradient, so autograd saves
                     nothing there. Per routed layer and token b_a * (6h + 2 kv + 4i) (norm outputs, q/k/v,
                     attention output, residuals, SwiGLU gate/up/act/product; SDPA keeps no s x s scores);
                     with gradient checkpointing only the layer input b_a * h per layer, plus one layer
                     recomputed in full.
    logits           micro * seq * vocab * (b_a + 4 + 4): bf16 logits, the fp32 upcast and its gradient
    overhead         a fixed allowance for the CUDA context, NCCL buffers and fragmentation
Trainable count T: per routed layer a router (h*h/r + h/r*h + h + h/r + 1 bias) and a SwiGLU adapter
(3 * h * m, m = i / adapter_reduction), which gives 209.8M for Llama-3-8B with the paper's sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GB = 1024**3


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder's sizes: `layers` decoder layers of width `hidden`, SwiGLU width `intermediate`,
    `vocab` tokens, `heads` query and `kv_heads` key/value heads; `tied`: the lm_head shares the embedding."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def base_params(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h  # q, o, k, v, gate/up/down, two norms
        embed = self.vocab * h * (1 if self.tied else 2)
        return self.layers * per_layer + embed + h


ARCHS = {
    "llama3_8b": Arch("Llama-3-8B", 32, 4096, 14336, 128256, 32, 8),
    "llama2_13b": Arch("Llama-2-13B", 40, 5120, 13824, 32000, 40, 40),
    "llama3_70b": Arch("Llama-3-70B", 80, 8192, 28672, 128256, 64, 8),
    "qwen3_8b": Arch("Qwen3-8B", 36, 4096, 12288, 151936, 32, 8),
    "smollm2_135m": Arch("SmolLM2-135M", 30, 576, 1536, 49152, 9, 3, tied=True),
}


def _check_count(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class Plan:
    """One training setup on `gpus` GPUs of `gpu_mem_gb` GB (GiB) each, under DeepSpeed ZeRO stage `zero`;
    `micro_batch` x `seq` tokens per step and GPU; router / adapter sizes as FlexiDepthConfig's; weights and
    activations of `weight_bytes` / `act_bytes` bytes per value. ValueError naming the field for a value
    out of range (`__post_init__`)."""

    arch: Arch
    gpus: int = 8
    gpu_mem_gb: float = 80.0
    zero: int = 2
    micro_batch: int = 1
    seq: int = 2048
    routed_layers: int | None = None  # default: the last half
    router_reduction: int = 16
    adapter_reduction: int = 16
    adapter_rank: int | None = None
    gradient_checkpointing: bool = False
    weight_bytes: int = 2  # bf16 base
    act_bytes: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    overhead_gb: float = 2.0

    def __post_init__(self) -> None:
        """Range checks naming the field: counts are integers >= 1 (routed_layers <= the model's layers),
        memory a finite number > 0, zero in 0..3. Raises ValueError."""
        for name in ("gpus", "micro_batch", "seq", "router_reduction", "adapter_reduction", "weight_bytes",
                     "act_bytes"):  # fmt: skip
            _check_count(name, getattr(self, name))
        for name in ("routed_layers", "adapter_rank"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        if self.routed_layers is not None and self.routed_layers > self.arch.layers:
            raise ValueError(
                f"routed_layers={self.routed_layers} exceeds the model's {self.arch.layers} layers"
            )
        for name in ("gpu_mem_gb", "overhead_gb"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < 0 or (name == "gpu_mem_gb" and value == 0):
                raise ValueError(f"{name} must be {'> 0' if name == 'gpu_mem_gb' else '>= 0'}, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero!r}")

    @property
    def routed(self) -> int:
        return self.arch.layers // 2 if self.routed_layers is None else self.routed_layers

    def trainable_params(self) -> int:
        h, i = self.arch.hidden, self.arch.intermediate
        d_r = h // self.router_reduction
        m = self.adapter_rank or i // self.adapter_reduction
        router = 2 * h * d_r + h + d_r + 1
        adapter = 3 * h * m
        return self.routed * (router + adapter)

    def breakdown(self) -> dict[str, float]:
        """Bytes per GPU for each term."""
        a, n, t = self.arch, self.gpus, self.trainable_params()
        shard_params = n if self.zero >= 3 else 1
        tokens = self.micro_batch * self.seq
        kv = a.kv_heads * a.head_dim
        per_layer_token = self.act_bytes * (6 * a.hidden + 2 * kv + 4 * a.intermediate)
        if self.gradient_checkpointing:
            acts = tokens * (self.routed * self.act_bytes * a.hidden + per_layer_token)
        else:
            acts = tokens * self.routed * per_layer_token
        return {
            "base_weights": 0.0
            if self.offload_params
            else a.base_params() * self.weight_bytes / shard_params,
            "trainable_weights": t * (4 + self.weight_bytes) / shard_params,
            "gradients": t * 4 / (n if self.zero >= 2 else 1),
            "optimizer": 0.0 if self.offload_optimizer else t * 8 / (n if self.zero >= 1 else 1),
            "activations": float(acts),
            "logits": float(tokens * a.vocab * (self.act_bytes + 4 + 4)),
            "overhead": self.overhead_gb * GB,
        }

    def total(self) -> float:
        return sum(self.breakdown().values())

    def fits(self) -> bool:
        return self.total() <= self.gpu_mem_gb * GB

    def report(self) -> str:
        b = self.breakdown()
        gc = "on" if self.gradient_checkpointing else "off"
        lines = [
            f"{self.arch.name}: {self.gpus} GPUs x {self.gpu_mem_gb:g} GB, ZeRO-{self.zero}, micro batch "
            f"{self.micro_batch} x {self.seq} tokens, gradient checkpointing {gc}",
            f"  base params {self.arch.base_params() / 1e9:.2f} B, trainable {self.trainable_params() / 1e6:.1f} M "
            f"({self.routed} routed layers)",
        ]
        lines += [f"  {k:<18}{v / GB:8.2f} GB" for k, v in b.items()]
        verdict = "fits" if self.fits() else "does NOT fit"
        lines.append(f"  {'total':<18}{self.total() / GB:8.2f} GB  -> {verdict} in {self.gpu_mem_gb:g} GB")
        return "\n".join(lines)


__all__ = ["ARCHS", "GB", "Arch", "Plan"]
