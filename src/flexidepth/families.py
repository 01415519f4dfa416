"""Per-family differences between supported HF decoder architectures, kept in one place.

The FlexiDepth layer reuses each decoder layer's own submodules (`input_layernorm`, `self_attn`,
`post_attention_layernorm`, `mlp`) and calls the family's own attention module, so the families differ
only in what the K/V-only projection of a skipped token needs (Qwen3's per-head q/k RMSNorm) and in
which attribute carries a sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    """What differs between families. `qk_norm`: per-head RMSNorm on q/k before RoPE (Qwen3)."""

    name: str
    qk_norm: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),  # Llama 2, 3, 3.x, SmolLM2
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2"),  # Qwen2 / Qwen2.5 (q/k/v biases live inside the Linear modules)
    "qwen3": Family("qwen3", qk_norm=True),
}


class UnsupportedArchitectureError(ValueError):
    """The base model's family is not one FlexiDepth can be injected into; the message names it."""


def family_of(model_config) -> Family:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in FAMILIES:
        archs = getattr(model_config, "architectures", None) or [model_type]
        raise UnsupportedArchitectureError(
            f"FlexiDepth does not support architecture {archs[0]!r} (model_type={model_type!r}); "
            f"supported model types: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [B, T, hd] as produced by the model's rotary embedding."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def project_kv(family: Family, attn, z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """K (RoPE'd) and V of rows z: [B, T, d] -> two [B, H_kv, T, hd] tensors; no query is formed."""
    bsz, seq, _ = z.shape
    k = attn.k_proj(z).view(bsz, seq, -1, attn.head_dim)
    v = attn.v_proj(z).view(bsz, seq, -1, attn.head_dim).transpose(1, 2)
    if family.qk_norm:
        k = attn.k_norm(k)
    k = apply_rope(k.transpose(1, 2), cos, sin)
    return k, v


# ---------------------------------------------------------------------------------------------- fast path
# Attention implementations whose 4D mask the fast path (layer.py) can reuse as is: sdpa passes a bool
# mask (True = attend) or None (plain causal), eager an additive float mask. Both already encode padding
# and any active sliding window (transformers builds the mask per layer type).
FAST_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def project_q_rows(
    family: Family, attn, z_rows: torch.Tensor, cos_rows: torch.Tensor, sin_rows: torch.Tensor
):
    """Queries (Qwen3 q_norm, RoPE) of flattened rows z_rows: [N, d] -> [N, H, hd].

    cos_rows / sin_rows: [N, hd], the rotary tables of those rows' own positions.
    """
    q = attn.q_proj(z_rows).view(z_rows.shape[0], -1, attn.head_dim)
    if family.qk_norm:
        q = attn.q_norm(q)
    cos, sin = cos_rows.unsqueeze(1), sin_rows.unsqueeze(1)
    return q * cos + rotate_half(q) * sin
