"""The `method` config group: one entry point that turns a base model into any compared system.

    applied = apply_method(model, method_cfg, tokenizer=tok, ckpt=folder, skip=skip_cfg)

| method      | trains            | what `apply_method` does                                               |
|-------------|-------------------|------------------------------------------------------------------------|
| flexidepth  | routers+adapters  | loads the checkpoint (`ckpt`, required)                                |
| mindskip    | routers           | injects MindSkip layers and loads the checkpoint (`ckpt`, required)    |
| shortgpt    | no                | Block Influence on calibration text, removes the k lowest-BI layers     |
| laco        | no                | RDSC merges of later layers into their predecessors (k layers removed) |
| early_exit  | no                | removes the last k layers (exit through final norm + LM head)           |
| random_skip | no                | random per-token skips over the routed layers, at a uniform rate k / R  |
|             |                   | or at a FlexiDepth checkpoint's measured per-layer rates (its adapters) |

k: `method.k` when set, else `round(method.k32 * L / 32)` -- the paper's k for a 32-layer model scaled to
the model's depth (k32 = 4 -> 4 and k32 = 8 -> 8 of SmolLM2's 30 layers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..flexidepth import FlexiDepthConfig, flexi_layers, inject, load_flexidepth, routed_forward
from ..flexidepth.checkpoint import read_checkpoint_config
from ..flexidepth.flops import layer_macs, model_macs_per_token
from .mindskip import inject_mindskip
from .random_skip import RandomGate, uniform_run_rates
from .removal import early_exit_layers, remove_layers

log = logging.getLogger(__name__)

TRAINED = ("flexidepth", "mindskip")
STATIC = ("shortgpt", "laco", "early_exit")
METHODS = (*TRAINED, *STATIC, "random_skip")
METHOD_KEYS = {
    "name",
    "k",
    "k32",
    "seed",
    "calibration",
    "merge_size",
    "interval",
    "threshold",
    "lowest_layer",
    "match_rates",
}
CALIBRATION_KEYS = {"texts", "max_length", "batch_size"}


class MethodConfigError(ValueError):
    pass


def validate_method(method: dict[str, Any]) -> None:
    """Raise MethodConfigError naming the bad `method.<key>` (before any model is loaded)."""
    name = method.get("name")
    if name not in METHODS:
        raise MethodConfigError(f"method.name={name!r} is not one of {list(METHODS)}")
    bad = sorted(set(method) - METHOD_KEYS)
    if bad:
        raise MethodConfigError(
            f"unknown key(s) {', '.join('method.' + k for k in bad)}; valid: {sorted(METHOD_KEYS)}"
        )
    for key in ("k", "k32"):
        v = method.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise MethodConfigError(f"method.{key} must be a number >= 0, got {v!r}")
    if name in STATIC and method.get("k") is not None and not float(method["k"]).is_integer():
        raise MethodConfigError(
            f"method.k must be a whole number of layers for method={name}, got {method['k']!r}"
        )
    if name in STATIC and method.get("k") is None and method.get("k32") is None:
        raise MethodConfigError(f"method={name} needs method.k or method.k32")
    cal = method.get("calibration") or {}
    bad = sorted(set(cal) - CALIBRATION_KEYS)
    if bad:
        raise MethodConfigError(f"unknown key(s) {', '.join('method.calibration.' + k for k in bad)}")
    if name == "laco":
        if int(method.get("merge_size", 2)) < 2:
            raise MethodConfigError(f"method.merge_size must be >= 2, got {method.get('merge_size')!r}")
        if int(method.get("interval", 1)) < 1:
            raise MethodConfigError(f"method.interval must be >= 1, got {method.get('interval')!r}")


def resolve_k(method: dict[str, Any], num_layers: int) -> int | None:
    """`method.k`, else the 32-layer count `method.k32` scaled to `num_layers` (at least 1)."""
    if method.get("k") is not None:
        k = float(method["k"])
        return int(k) if k.is_integer() else k  # fractional k: random skip's average only
    if method.get("k32") is not None:
        return max(1, round(float(method["k32"]) * num_layers / 32))
    return None


@dataclass
class AppliedMethod:
    """What a method did to the model: its label in result tables and the facts needed to report it."""

    name: str
    label: str
    k: float | None = None  # target layers skipped (None: learned, measured at evaluation)
    removed: list[int] = field(default_factory=list)  # static methods: layers made identity
    flexi_cfg: FlexiDepthConfig | None = None  # FlexiDepth-family systems: the routing config
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "k": self.k,
            "removed": list(self.removed),
            "flexidepth": None if self.flexi_cfg is None else self.flexi_cfg.to_dict(),
            "details": self.details,
        }


def checkpoint_method(folder: str | Path) -> str:
    """The method a checkpoint folder was trained with (checkpoints before the method group: flexidepth)."""
    return str(read_checkpoint_config(folder).get("method", "flexidepth"))


def calibration_batches(tokenizer, method: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration text (the training-side Lee corpus, never the held-out articles), tokenised."""
    from ..data.corpora import lee_articles
    from .shortgpt import calibration_batches as batches

    cal = dict(method.get("calibration") or {})
    return list(
        batches(
            tokenizer,
            lee_articles(),
            max_length=int(cal.get("max_length", 256)),
            batch_size=int(cal.get("batch_size", 4)),
            max_texts=int(cal.get("texts", 32)),
        )
    )


def apply_method(
    model,
    method: dict[str, Any],
    *,
    tokenizer=None,
    ckpt: str | Path | None = None,
    skip: dict[str, Any] | None = None,
) -> AppliedMethod:
    """Turn `model` (a plain HF causal LM, modified in place) into the system `method` describes."""
    validate_method(method)
    name = method["name"]
    num_layers = model.config.num_hidden_layers
    k = resolve_k(method, num_layers)

    if name in TRAINED:
        if ckpt is None:
            raise MethodConfigError(
                f"method={name} is trained: pass ckpt_path=<its run or checkpoint folder>"
            )
        stored = checkpoint_method(ckpt)
        if stored != name:
            raise MethodConfigError(f"ckpt_path={str(ckpt)!r} holds a {stored} checkpoint, not method={name}")
        meta = read_checkpoint_config(ckpt)
        cfg = FlexiDepthConfig.from_dict(meta["flexidepth"])
        if name == "mindskip":
            inject_mindskip(model, cfg)
        load_flexidepth(model, ckpt)
        return AppliedMethod(name, name, None, flexi_cfg=cfg, details={"ckpt": str(ckpt)})

    if ckpt is not None and name != "random_skip":
        raise MethodConfigError(f"ckpt_path is not used by method={name} (nothing is trained)")
    if name == "early_exit":
        removed = early_exit_layers(num_layers, k)
        remove_layers(model, removed)
        return AppliedMethod(name, f"{name}_k{k}", k, removed)
    if name == "shortgpt":
        from .shortgpt import block_influence, shortgpt_layers

        if tokenizer is None:
            raise ValueError("method=shortgpt needs a tokenizer for its calibration text")
        bi = block_influence(model, calibration_batches(tokenizer, method))
        removed = shortgpt_layers(bi, k)
        remove_layers(model, removed)
        return AppliedMethod(name, f"{name}_k{k}", k, removed, details={"block_influence": bi})
    if name == "laco":
        from .laco import laco_prune

        if tokenizer is None:
            raise ValueError("method=laco needs a tokenizer for its calibration text")
        kwargs = {
            key: method[key]
            for key in ("merge_size", "interval", "threshold", "lowest_layer")
            if key in method
        }
        info = laco_prune(model, k, calibration_batches(tokenizer, method), **kwargs)
        remove_layers(model, info["removed"])
        details = {key: v for key, v in info.items() if key != "removed"}
        return AppliedMethod(name, f"{name}_k{k}", k, list(info["removed"]), details=_jsonable(details))
    # random_skip
    seed = int(method.get("seed", 0))
    if ckpt is not None:
        if checkpoint_method(ckpt) != "flexidepth":
            raise MethodConfigError(
                "method=random_skip takes a flexidepth checkpoint (its adapters and rates)"
            )
        load_flexidepth(model, ckpt)
        cfg = model.flexidepth.config
        layers = model.flexidepth.layer_indices
        if method.get("match_rates", True):
            if tokenizer is None:
                raise ValueError("method=random_skip with match_rates needs a tokenizer")
            rates = measured_run_rates(model, calibration_batches(tokenizer, method))
            label = f"{name}_matched"
        else:
            if k is None:
                raise MethodConfigError(
                    "method=random_skip with match_rates=false needs method.k or method.k32"
                )
            rates = uniform_run_rates(layers, k)
            label = f"{name}_k{k}"
    else:
        if k is None:
            raise MethodConfigError("method=random_skip without a checkpoint needs method.k or method.k32")
        cfg = FlexiDepthConfig(
            layers=(skip or {}).get("layers", "last_half"), adapter="none", router="linear"
        )
        inject(model, cfg)
        layers = model.flexidepth.layer_indices
        rates = uniform_run_rates(layers, k)
        label = f"{name}_k{k}"
    gate = RandomGate(rates, seed=seed)
    for layer in flexi_layers(model):
        layer.force_gate = gate
    expected = sum(1.0 - r for r in rates.values())
    return AppliedMethod(
        name,
        label,
        expected,
        flexi_cfg=cfg,
        details={"run_rates": rates, "seed": seed, "ckpt": str(ckpt) if ckpt else None},
    )


@torch.no_grad()
def measured_run_rates(model, batches) -> dict[int, float]:
    """Per routed layer: the fraction of real tokens whose gate ran it, over `batches`."""
    device = next(model.parameters()).device
    counts, tokens = None, 0
    for ids, mask in batches:
        out = routed_forward(model, ids.to(device), mask.to(device))
        c = out.routes.layer_run_counts.double().cpu()
        counts = c if counts is None else counts + c
        tokens += int(out.routes.n_valid)
    frac = (counts / max(tokens, 1)).tolist()
    return dict(zip(model.flexidepth.layer_indices, frac, strict=True))


@torch.no_grad()
def tau_for_k(model, batches, k: float) -> float:
    """The threshold at which a routed model skips k layers per token on average over `batches`.

    Skipped layers per token = sum over routed layers of [g <= tau], so its mean over tokens is
    R * P(g <= tau) over all (token, layer) gates: tau is the k / R quantile of the gates. Matching a trained
    router to a skip count this way keeps its ranking of tokens and changes only how many skip.
    """
    device = next(model.parameters()).device
    gates = []
    for ids, mask in batches:
        out = routed_forward(model, ids.to(device), mask.to(device))
        gates.append(out.routes.gates[out.routes.valid].float().cpu())  # [n_valid, R]
    flat = torch.cat(gates).flatten()
    routed = len(model.flexidepth.layer_indices)
    if not 0 <= k <= routed:
        raise ValueError(f"cannot skip k={k} of {routed} routed layers")
    return float(torch.quantile(flat.double(), k / routed)) if 0 < k < routed else (0.0 if k == 0 else 1.0)


def method_macs(config, applied: AppliedMethod, layers_skipped: float) -> dict[str, float]:
    """Analytic MACs per token of the system vs the base model (lm_head included), per the method's cost.

    static removal: a removed layer costs nothing; random skip / FlexiDepth: flops.py's routed-layer model
    (skipped: K/V + adapter; the random gate has no router cost, counted anyway as an upper bound);
    mindskip: a skipped attention saves q and o (K/V are still computed) and pays the router on every layer.
    """
    base = model_macs_per_token(config)
    if applied.name in STATIC:
        lay = layer_macs(config)
        cost = base - layers_skipped * lay.full
    elif applied.name == "mindskip":
        lay = layer_macs(config, applied.flexi_cfg)
        routed = len(applied.flexi_cfg.routed_layers(config.num_hidden_layers))
        cost = base + routed * lay.router - layers_skipped * (lay.q + lay.o)
    else:
        cost = model_macs_per_token(config, applied.flexi_cfg, layers_skipped)
    return {
        "layers_skipped_mean": float(layers_skipped),
        "macs_per_token_base": float(base),
        "macs_per_token": float(cost),
        "analytic_macs_saved_frac": 1.0 - cost / base,
        "flop_ideal_speedup": base / cost,
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


__all__ = [
    "METHODS",
    "STATIC",
    "TRAINED",
    "AppliedMethod",
    "MethodConfigError",
    "apply_method",
    "checkpoint_method",
    "measured_run_rates",
    "method_macs",
    "resolve_k",
    "tau_for_k",
    "validate_method",
]
