"""FlexiDepth hyper-parameters and their validation.

Everything here is plain Python so that a config can be checked against a model's *config* (sizes, depth)
before any weight is loaded or moved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ROUTERS = ("mlp", "linear")
ADAPTERS = ("swiglu", "none")
GATE_MODES = ("released", "ste", "difference")
INITS = ("near_base", "released")
TRAIN_DECISIONS = ("threshold", "sample")


class FlexiDepthConfigError(ValueError):
    """A FlexiDepth setting is invalid; the message names the key (as `skip.<key>`)."""


def check_tau(tau: Any, key: str = "skip.tau", allow_none: bool = False) -> float | None:
    """The decision threshold as a float in [0, 1] (a token runs a routed layer iff g > tau); the one range
    check of tau, used by every entry point and `set_tau`. Raises FlexiDepthConfigError naming `key` for a
    bool, a non-number, NaN or a value outside [0, 1] (None only with `allow_none`)."""
    if tau is None and allow_none:
        return None
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
        what = "null or a number" if allow_none else "a number"
        raise FlexiDepthConfigError(f"{key} must be {what} in [0, 1], got {tau!r}")
    return float(tau)


@dataclass
class FlexiDepthConfig:
    """Settings of the injected routers and adapters (the `skip` config group mirrors these fields).

    Attributes:
        tau: decision threshold; a token runs a routed layer iff g > tau (strict, as released).
        router: "mlp" (the paper's bottleneck router) or "linear" (g = sigmoid(w.z), Table 3 ablation).
        router_reduction: bottleneck width d_r = hidden_size / router_reduction.
        router_bias: add a learnable scalar to the router logit (our init choice, see `router_init_bias`).
            The released checkpoint has no bias; loading it sets the bias to 0, which is the same function.
        router_init_bias: initial logit bias; with the head initialised to zero every gate starts at
            sigmoid(router_init_bias) (0.953 for 3.0), so the fresh model runs every layer, close to the base.
        adapter: "swiglu" (the paper's skip-path FFN replacement) or "none" (skip path = identity, ablation).
        adapter_reduction: adapter width m = intermediate_size / adapter_reduction.
        adapter_rank: explicit adapter width m; overrides adapter_reduction when set.
        layers: routed layers: "last_half" (floor(L/2) last layers), "start:end" (Python range), or a list.
        kv_for_skipped: skipped tokens still write K/V (the method); False = ablation where later tokens
            cannot attend to a token at a layer it skipped.
        gate_mode: "released" scales FFN by g and adapter by (1-g); "ste" uses weight 1 on both branches
            with a straight-through gradient to g through the taken branch; "difference" serves like "ste"
            (unit weights: a running token gets exactly the base layer) but trains the gate with the gradient
            of the soft mixture, dL/dg = <dL/dy, y_run - y_skip>, both branches computed for every token
            (docs/method.md §3.6). Stored in checkpoints: serving with another mode is wrong.
        param_dtype: dtype of router/adapter parameters (fp32 master weights by default; "bfloat16" is the
            released recipe's choice, docs/released-differences.md).
        init: "near_base" (ours): router head 0 + bias `router_init_bias` (gates start high) and adapter
            output projection 0, so the fresh model is the base with its FFNs scaled by the initial gate;
            "released": every projection random (nn.Linear's default), bias (if any) 0, so gates start near
            0.5 and the adapter is random from the start (docs/method.md, "Initialisation").
        train_decisions: how a token's branch is chosen while training (autograd on): "threshold" (g > tau,
            as at inference) or "sample" (run with probability g, a fresh draw per token and layer, as
            SparseMixer samples its expert in training; gate_mode="difference" only). With the threshold the
            difference estimator is evaluated at the taken branch only, so gates hover at tau; sampling makes
            the expected gradient weigh both branches (docs/method.md §3.6). Inference always thresholds.
        always_skip: routed layers that every token skips, by construction (an option on top of the method,
            docs/method.md §3.10): no router decision, no query, no attention and no K/V (no token ever runs
            the layer, so its keys and values would never be read); y = x + Adapter(N_f(x)). This is static
            layer removal whose FFN is replaced by a trained adapter instead of the identity, e.g. at the
            layers ShortGPT would delete. Indices must be routed layers, and not the first layer of an
            attention type (`check_always_skip`).
    """

    tau: float = 0.5
    router: str = "mlp"
    router_reduction: int = 16
    router_bias: bool = True
    router_init_bias: float = 3.0
    adapter: str = "swiglu"
    adapter_reduction: int = 16
    adapter_rank: int | None = None
    layers: Any = "last_half"
    kv_for_skipped: bool = True
    gate_mode: str = "released"
    param_dtype: str = "float32"
    init: str = "near_base"
    train_decisions: str = "threshold"
    always_skip: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlexiDepthConfig:
        """Build from a mapping, rejecting unknown keys by name (typos must not pass silently)."""
        reject_unknown_keys("skip", data, cls, FlexiDepthConfigError)
        unresolved = sorted(k for k, v in data.items() if isinstance(v, str) and v.startswith("${"))
        if unresolved:  # e.g. OmegaConf.to_container(cfg.skip) without resolve=True
            raise FlexiDepthConfigError(
                f"unresolved interpolation in {', '.join('skip.' + k for k in unresolved)} "
                f"({data[unresolved[0]]!r}): pass the resolved config (OmegaConf.to_container(..., resolve=True))"
            )
        cfg = cls(**dict(data))
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not isinstance(out["layers"], str):
            out["layers"] = [int(i) for i in out["layers"]]
        out["always_skip"] = [int(i) for i in out["always_skip"]]
        return out

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Checks that need no model."""
        check_tau(self.tau)
        _choice("router", self.router, ROUTERS)
        _choice("adapter", self.adapter, ADAPTERS)
        _choice("gate_mode", self.gate_mode, GATE_MODES)
        _choice("param_dtype", self.param_dtype, ("float32", "bfloat16", "float16"))
        _choice("init", self.init, INITS)
        _choice("train_decisions", self.train_decisions, TRAIN_DECISIONS)
        if self.train_decisions == "sample" and self.gate_mode != "difference":
            raise FlexiDepthConfigError(
                "skip.train_decisions=sample needs skip.gate_mode=difference (the gate's gradient must not "
                f"depend on which branch was drawn), got skip.gate_mode={self.gate_mode!r}"
            )
        _positive_int("router_reduction", self.router_reduction)
        _positive_int("adapter_reduction", self.adapter_reduction)
        if self.adapter_rank is not None:
            _positive_int("adapter_rank", self.adapter_rank)
        if not isinstance(self.kv_for_skipped, bool):
            raise FlexiDepthConfigError(
                f"skip.kv_for_skipped must be true/false, got {self.kv_for_skipped!r}"
            )
        if isinstance(self.layers, str) and self.layers != "last_half":
            _parse_range(self.layers)  # raises with the key name
        skip = self.always_skip
        if (
            isinstance(skip, (str, bytes))
            or not hasattr(skip, "__iter__")
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in skip)
        ):
            raise FlexiDepthConfigError(f"skip.always_skip must be a list of layer indices, got {skip!r}")
        if len(set(skip)) != len(list(skip)):
            raise FlexiDepthConfigError(f"skip.always_skip has duplicates: {list(skip)!r}")

    def validate_for(self, num_layers: int, hidden_size: int, intermediate_size: int) -> None:
        """Checks against a model's sizes; call before touching weights."""
        self.validate()
        if hidden_size % self.router_reduction:
            raise FlexiDepthConfigError(
                f"skip.router_reduction={self.router_reduction} does not divide hidden_size={hidden_size}"
            )
        if self.adapter_rank is None and intermediate_size % self.adapter_reduction:
            raise FlexiDepthConfigError(
                f"skip.adapter_reduction={self.adapter_reduction} does not divide "
                f"intermediate_size={intermediate_size}; set skip.adapter_rank explicitly"
            )
        routed = self.routed_layers(num_layers)
        outside = sorted(set(self.always_skip) - set(routed))
        if outside:
            raise FlexiDepthConfigError(
                f"skip.always_skip has {outside}, which are not routed layers (skip.layers={self.layers!r} "
                f"routes {_spans(routed)})"
            )

    def trainable_problems(self, num_layers: int) -> list[str]:
        """Whether a model of `num_layers` layers with this config has anything to train: not when every
        routed layer is in `always_skip` (no router is trained) and `adapter` is none (no adapter). One
        message naming both keys, [] otherwise."""
        routed = self.routed_layers(num_layers)
        if self.adapter == "none" and set(routed) <= {i % num_layers for i in self.always_skip}:
            return [
                f"nothing to train: every routed layer ({routed}) is in skip.always_skip, so no router is "
                "trained, and skip.adapter=none has no adapter; take layers out of skip.always_skip or set "
                "skip.adapter=swiglu"
            ]
        return []

    def check_always_skip(self, layer_types: list[str] | None, num_layers: int) -> None:
        """`always_skip` against the model's attention layout: the first layer of each attention type
        (layer 0 in a model without `layer_types`) must keep its K/V, since transformers reads the KV cache's
        length and mask sizes from it. FlexiDepthConfigError naming the layer."""
        types = list(layer_types) if layer_types else ["full_attention"] * num_layers
        firsts = {types.index(t): t for t in dict.fromkeys(types)}
        bad = sorted(set(self.always_skip) & set(firsts))
        if bad:
            raise FlexiDepthConfigError(
                f"skip.always_skip cannot hold layer(s) {bad}: the first layer of each attention type "
                f"({', '.join(f'{i}: {t}' for i, t in sorted(firsts.items()))}) keeps its K/V, because the KV "
                "cache's length and the attention masks are read from it"
            )

    # ------------------------------------------------------------------ derived sizes
    def routed_layers(self, num_layers: int) -> list[int]:
        """Resolve `layers` to a sorted list of layer indices, validated against the model depth."""
        if self.layers in (None, "last_half"):
            return list(range(num_layers - num_layers // 2, num_layers))
        if isinstance(self.layers, str):
            start, end = _parse_range(self.layers)
            idx = list(
                range(start if start >= 0 else num_layers + start, end if end is not None else num_layers)
            )
        else:
            try:
                idx = [int(i) for i in self.layers]
            except (TypeError, ValueError) as err:
                raise FlexiDepthConfigError(
                    f"skip.layers must be 'last_half', 'a:b' or a list, got {self.layers!r}"
                ) from err
        bad = [i for i in idx if not 0 <= i < num_layers]
        if bad:
            raise FlexiDepthConfigError(f"skip.layers has indices {bad} outside [0, {num_layers - 1}]")
        if not idx:
            raise FlexiDepthConfigError(f"skip.layers={self.layers!r} selects no layer")
        if len(set(idx)) != len(idx):
            raise FlexiDepthConfigError(f"skip.layers has duplicates: {self.layers!r}")
        return sorted(idx)

    def router_width(self, hidden_size: int) -> int:
        return max(1, hidden_size // self.router_reduction)

    def adapter_width(self, intermediate_size: int) -> int:
        if self.adapter_rank is not None:
            return int(self.adapter_rank)
        return max(1, intermediate_size // self.adapter_reduction)


def reject_unknown_keys(section: str, data: dict[str, Any], schema: type, error: type[Exception]) -> None:
    """Raise `error` naming every key of `data` that is not a field of the dataclass `schema`, as
    `<section>.<key>`, with the valid keys (typos in a config group must not pass silently)."""
    known = {f.name for f in fields(schema)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(
            f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; valid keys: {sorted(known)}"
        )


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise FlexiDepthConfigError(f"skip.{key} must be one of {list(allowed)}, got {value!r}")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FlexiDepthConfigError(f"skip.{key} must be an integer >= 1, got {value!r}")


def _spans(indices: list[int]) -> str:
    """[15, 16, 17, 20] -> '15-17, 20'."""
    out, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


def _parse_range(text: str) -> tuple[int, int | None]:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start = int(parts[0]) if parts[0] else 0
        end = int(parts[1]) if parts[1] else None
    except ValueError as err:
        raise FlexiDepthConfigError(f"skip.layers range must look like '15:30', got {text!r}") from err
    return start, end


__all__ = ["FlexiDepthConfig", "FlexiDepthConfigError"]
