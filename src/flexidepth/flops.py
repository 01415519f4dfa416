"""Analytic compute per token (multiply-accumulates), docs/method.md §6.

Counted per token and layer, from a HF model config and a FlexiDepthConfig:

    full layer    = q + k + v + o + FFN                       (the base layer)
    routed layer  = full + router                             (a routed token that runs it)
    skipped layer = k + v + router + adapter                  (K/V are still computed and cached)
    always-skip   = adapter                                   (`always_skip` layers: no token runs them)
    always-run    = full                                      (`set_always_run` layers: no router call)

Attention scores (q.k and p.v, 2 * H * hd per cached key) are excluded unless `context` is given; RMSNorms,
RoPE, activations and residual adds are ignored. Llama-3-8B: 218.1M full, 21.5M skipped (9.9%);
SmolLM2-135M: 3.54M / 0.43M (12.1%), as in the spec table (tested).

The FLOP-ideal speedup of a skip fraction is base model MACs / FlexiDepth model MACs, counting the
lm_head by default (decode tokens/s cannot beat it); it is what a wall-clock speedup is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import FlexiDepthConfig


@dataclass(frozen=True)
class LayerMacs:
    q: int
    k: int
    v: int
    o: int
    ffn: int
    router: int
    adapter: int
    attn_scores: int = 0  # per token, for the given context length (0 by default)

    @property
    def full(self) -> int:
        """The base decoder layer (no router)."""
        return self.q + self.k + self.v + self.o + self.ffn + self.attn_scores

    @property
    def routed_run(self) -> int:
        """A routed layer that the token runs: the full layer plus its router."""
        return self.full + self.router

    @property
    def skipped(self) -> int:
        """A routed layer that the token skips: K/V, router and adapter."""
        return self.k + self.v + self.router + self.adapter


def _sizes(config):
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return d, heads, kv_heads, head_dim, config.intermediate_size


def layer_macs(config, cfg: FlexiDepthConfig | None = None, context: int = 0) -> LayerMacs:
    """MACs per token of one decoder layer's pieces. `context`: cached keys attended (0 = excluded)."""
    cfg = cfg or FlexiDepthConfig()
    d, heads, kv_heads, head_dim, d_ff = _sizes(config)
    if cfg.router == "linear":
        router = d
    else:
        d_r = cfg.router_width(d)
        router = 2 * d * d_r + d  # enc, dec, head (no biases)
    adapter = 0 if cfg.adapter == "none" else 3 * d * cfg.adapter_width(d_ff)
    return LayerMacs(
        q=d * heads * head_dim,
        k=d * kv_heads * head_dim,
        v=d * kv_heads * head_dim,
        o=heads * head_dim * d,
        ffn=3 * d * d_ff,
        router=router,
        adapter=adapter,
        attn_scores=2 * heads * head_dim * int(context),
    )


def model_macs_per_token(
    config,
    cfg: FlexiDepthConfig | None = None,
    skipped_layers: float = 0.0,
    include_lm_head: bool = True,
    context: int = 0,
    always_run: int = 0,
) -> float:
    """MACs per token of the whole decoder (+ lm_head).

    cfg None: the base model. Otherwise a FlexiDepth model whose token skips `skipped_layers` of its
    R routed layers on average (the other routed layers run, paying the router too); the `always_skip`
    layers are among the skipped ones and cost only their adapter; `always_run` of the routed layers run
    every token without a router call (full cost). ValueError: `skipped_layers` outside
    [len(always_skip), R - always_run].
    """
    layers = config.num_hidden_layers
    lm = config.vocab_size * config.hidden_size if include_lm_head else 0
    lay = layer_macs(config, cfg, context)
    if cfg is None:
        return layers * lay.full + lm
    routed = len(cfg.routed_layers(layers))
    static = len(cfg.always_skip)
    if static - 1e-6 <= skipped_layers < static:  # a mean over tokens, rounded below its exact minimum
        skipped_layers = float(static)
    if not 0 <= always_run <= routed - static:
        raise ValueError(f"always_run must be in [0, {routed - static}], got {always_run}")
    if not static <= skipped_layers <= routed - always_run:
        raise ValueError(f"skipped_layers must be in [{static}, {routed - always_run}], got {skipped_layers}")
    run = routed - skipped_layers - always_run
    routed_skips = skipped_layers - static
    return (
        (layers - routed + always_run) * lay.full
        + run * lay.routed_run
        + routed_skips * lay.skipped
        + static * lay.adapter
        + lm
    )


def flop_ideal_speedup(
    config,
    cfg: FlexiDepthConfig | None = None,
    skip_fraction: float = 0.0,
    include_lm_head: bool = True,
    context: int = 0,
) -> float:
    """Base-model MACs / FlexiDepth MACs when a fraction of the routed layers is skipped per token."""
    cfg = cfg or FlexiDepthConfig()
    routed = len(cfg.routed_layers(config.num_hidden_layers))
    base = model_macs_per_token(config, None, include_lm_head=include_lm_head, context=context)
    flexi = model_macs_per_token(config, cfg, skip_fraction * routed, include_lm_head, context)
    return base / flexi


def flops_report(
    config,
    cfg: FlexiDepthConfig,
    layers_skipped_mean: float,
    measured_speedup: float | None = None,
    include_lm_head: bool = True,
) -> dict[str, float]:
    """The FLOPs-vs-wall-clock line of a run: layers skipped, analytic MACs saved, measured speedup."""
    base = model_macs_per_token(config, None, include_lm_head=include_lm_head)
    flexi = model_macs_per_token(config, cfg, layers_skipped_mean, include_lm_head)
    out = {
        "layers_skipped_mean": float(layers_skipped_mean),
        "macs_per_token_base": float(base),
        "macs_per_token_flexidepth": float(flexi),
        "analytic_macs_saved_frac": 1.0 - flexi / base,
        "flop_ideal_speedup": base / flexi,
    }
    if measured_speedup is not None:
        out["measured_speedup"] = float(measured_speedup)
        out["measured_over_ideal"] = float(measured_speedup) / (base / flexi)
    return out


__all__ = ["LayerMacs", "flop_ideal_speedup", "flops_report", "layer_macs", "model_macs_per_token"]
