"""Turn a pretrained HF causal LM into a FlexiDepth model, in place.

    model = AutoModelForCausalLM.from_pretrained(...)
    inject(model, FlexiDepthConfig(tau=0.5))     # routed layers wrapped, base frozen
    out = routed_forward(model, input_ids, attention_mask, labels)   # routes.py

`model.flexidepth` (a plain attribute, not a submodule) holds the config, the routed layer indices and the
RouteRecorder that the layers write their gates into.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import FlexiDepthConfig, check_tau
from .families import Family, family_of
from .layer import FlexiDepthLayer
from .modules import build_adapter, build_router

TRAINABLE_MARKERS = (".router.", ".adapter.")


class RouteRecorder:
    """Collects each routed layer's gates [B, T] (fp32) and decisions [B, T] (bool) of the last forward."""

    def __init__(self, layer_indices: list[int]):
        self.layer_indices = list(layer_indices)
        self.gates: dict[int, torch.Tensor] = {}
        self.run: dict[int, torch.Tensor] = {}
        # [B, T] real-token mask of the current forward, set by routed_forward (None otherwise); layers that
        # pool over the sequence (the MindSkip baseline) read it to leave padding out
        self.token_mask: torch.Tensor | None = None

    def clear(self) -> None:
        self.gates.clear()
        self.run.clear()
        self.token_mask = None

    def record(self, layer_index: int, gates: torch.Tensor, run: torch.Tensor) -> None:
        # keyed, not appended: a gradient-checkpoint recompute overwrites with identical values
        self.gates[layer_index] = gates
        self.run[layer_index] = run

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates and decisions of all routed layers, each [B, T, R] in layer order."""
        missing = [i for i in self.layer_indices if i not in self.gates]
        if missing:
            raise RuntimeError(f"no routes recorded for layers {missing}: was the forward routed?")
        gates = torch.stack([self.gates[i] for i in self.layer_indices], dim=-1)
        run = torch.stack([self.run[i] for i in self.layer_indices], dim=-1)
        return gates, run


@dataclass
class FlexiDepthState:
    """What `inject` attaches to the model as `model.flexidepth`."""

    config: FlexiDepthConfig
    layer_indices: list[int]
    num_layers: int
    family: Family
    recorder: RouteRecorder = field(repr=False, default=None)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a *ForCausalLM (model.model.layers) or a bare decoder (model.layers)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder layer list at .model.layers")
    return layers


def inject(
    model: nn.Module, cfg: FlexiDepthConfig | None = None, layer_cls: type = FlexiDepthLayer
) -> nn.Module:
    """Wrap the routed layers of `model` with FlexiDepth layers and freeze everything else.

    `cfg`: the routing settings (None: FlexiDepthConfig's defaults; a stored mapping is read with
    `FlexiDepthConfig.from_dict` first). Config errors (FlexiDepthConfigError) and unsupported architectures
    are raised before any module is touched; ValueError when the model is already injected. `layer_cls`
    lets a variant (e.g. the MindSkip baseline, src/methods/mindskip.py) reuse the same wiring with another
    routed-layer class. Returns the same model object.
    """
    if cfg is None:
        cfg = FlexiDepthConfig()
    mc = model.config
    family = family_of(mc)
    if is_injected(model):
        raise ValueError("model already has FlexiDepth layers injected")
    cfg.validate_for(mc.num_hidden_layers, mc.hidden_size, mc.intermediate_size)
    cfg.check_always_skip(getattr(mc, "layer_types", None), mc.num_hidden_layers)
    indices = cfg.routed_layers(mc.num_hidden_layers)

    layers = decoder_layers(model)
    ref = next(model.parameters())
    dtype = getattr(torch, cfg.param_dtype)
    recorder = RouteRecorder(indices)
    hidden_spec = _hidden_state_spec(model)
    for i in indices:
        router = build_router(cfg, mc.hidden_size, mc.rms_norm_eps).to(ref.device, dtype)
        adapter = build_adapter(cfg, mc.hidden_size, mc.intermediate_size)
        if adapter is not None:
            adapter = adapter.to(ref.device, dtype)
        replaced = layers[i]
        layers[i] = layer_cls(replaced, router, adapter, i, cfg, recorder, family)
        # (index, capture_initial) of the hidden-state recorder the replaced layer had; installed on first use
        layers[i]._flexidepth_hidden_spec = hidden_spec(replaced)
    model.flexidepth = FlexiDepthState(cfg, indices, mc.num_hidden_layers, family, recorder)
    inner = getattr(model, "model", model)
    inner._flexidepth_recorder = recorder
    inner.register_forward_pre_hook(_before_forward, with_kwargs=True)
    freeze_base(model)
    return model


def _before_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the decoder stack (the module holding `.layers`).

    1. Its 2D `attention_mask` [B, T] (1 = real token) becomes the recorder's `token_mask`, so statistics
       over a sequence (the MindSkip gate's mean) leave padding out in every entry point: `routed_forward`,
       `generate`, HF `generate`, a plain `model(...)` call. A missing or non-2D mask (a prepared 4D mask)
       means "every position is real" (None).
    2. When the forward asks for hidden states, the routed layers get transformers' hidden-state recorder
       (see `_hidden_state_spec`), once, as transformers installs its own hooks: on first use.
    """
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    recorder = module._flexidepth_recorder
    recorder.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    wanted = kwargs.get("output_hidden_states")
    if wanted is None:
        wanted = getattr(getattr(module, "config", None), "output_hidden_states", False)
    if wanted is not None and wanted is not False:
        _install_hidden_state_hooks(module)


def _hidden_state_spec(model: nn.Module):
    """A function: replaced decoder layer -> (index, capture_initial_hidden_state) or None.

    transformers collects hidden states with forward hooks on the modules of the decoder-layer class named in
    the model's `_can_record_outputs`, installed lazily by class. An injected layer is not of that class, so
    without its own hook the routed layers' outputs would be missing from `hidden_states` (fewer entries,
    shifted indices). The spec says how the replaced layer would have been recorded (None: it would not).
    """
    try:
        from transformers.utils.output_capturing import OutputRecorder
    except ImportError:  # transformers without output recorders: hidden states come from the model loop
        return lambda replaced: None
    inner = getattr(model, "model", model)
    specs = (getattr(inner, "_can_record_outputs", None) or {}).get("hidden_states")
    specs = [] if specs is None else specs if isinstance(specs, list) else [specs]
    specs = [s if isinstance(s, OutputRecorder) else OutputRecorder(target_class=s) for s in specs]

    def spec_of(replaced: nn.Module):
        for spec in specs:
            if isinstance(spec.target_class, type) and isinstance(replaced, spec.target_class):
                return int(spec.index), bool(spec.capture_initial_hidden_state)
        return None

    return spec_of


def _install_hidden_state_hooks(stack: nn.Module) -> None:
    """Install transformers' hidden-state recorder on every routed layer of `stack` that lacks it."""
    pending = [
        layer
        for layer in getattr(stack, "layers", [])
        if getattr(layer, "_flexidepth_hidden_spec", None) is not None
        and not getattr(layer, "_flexidepth_hidden_hooked", False)
    ]
    if not pending:
        return
    from transformers.utils.output_capturing import install_output_capuring_hook

    for layer in pending:
        index, capture_initial = layer._flexidepth_hidden_spec
        install_output_capuring_hook(layer, "hidden_states", index, capture_initial)
        layer._flexidepth_hidden_hooked = True


def is_flexidepth_param(name: str) -> bool:
    return any(marker in f".{name}" for marker in TRAINABLE_MARKERS)


def freeze_base(model: nn.Module) -> None:
    """requires_grad only on router and adapter parameters (not on the routers of `always_skip` layers,
    which are never called)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_flexidepth_param(name))
    for layer in flexi_layers(model):
        if layer.always_skip:
            layer.router.requires_grad_(False)


def flexidepth_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Router and adapter tensors only, under the model's own (HF-style) keys."""
    return {k: v for k, v in model.state_dict().items() if is_flexidepth_param(k)}


def flexi_layers(model: nn.Module) -> list[FlexiDepthLayer]:
    return [m for m in decoder_layers(model) if isinstance(m, FlexiDepthLayer)]


def is_injected(model: nn.Module) -> bool:
    """True when `inject` has wrapped the model (it has a `model.flexidepth` state), routing on or off."""
    return hasattr(model, "flexidepth")


def routing_active(model: nn.Module) -> bool:
    """True when the model is injected and at least one FlexiDepth layer routes: such a model is run through
    `routed_forward` to read the layers each token used; any other model runs all of its layers."""
    return is_injected(model) and any(layer.routing for layer in flexi_layers(model))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total, trainable, router and adapter parameter counts (tied weights counted once)."""
    seen, counts = set(), {"total": 0, "trainable": 0, "router": 0, "adapter": 0}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        counts["total"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
        counts["router"] += p.numel() if ".router." in f".{name}" else 0
        counts["adapter"] += p.numel() if ".adapter." in f".{name}" else 0
    return counts


def set_routing(model: nn.Module, enabled: bool) -> None:
    """enabled=False makes every FlexiDepth layer compute exactly the base layer."""
    for layer in flexi_layers(model):
        layer.routing = enabled


@contextlib.contextmanager
def forced_gates(model: nn.Module, value):
    """Force every router's output (a constant g, or callable(z, layer_index) -> g [B, T])."""
    layers = flexi_layers(model)
    old = [layer.force_gate for layer in layers]
    for layer in layers:
        layer.force_gate = value
    try:
        yield
    finally:
        for layer, prev in zip(layers, old, strict=True):
            layer.force_gate = prev


def set_always_run(model: nn.Module, layers) -> None:
    """Make the routed layers `layers` (decoder indices) run every token, and every other routed layer route.

    An always-run layer takes g = 1 without calling its router, so it computes exactly the base layer (the
    routed layer with its gate forced to 1, in every gate mode) and saves the router's time; routes record
    it as run with g = 1. An inference option, not stored in checkpoints: it suits layers that the router
    rarely skips at the chosen tau (`calibrate.rarely_skipped_layers`). `set_always_run(model, [])` undoes it.

    Raises ValueError naming `always_run` for an index that is not a routed layer or is an `always_skip`
    layer, before any layer is changed.
    """
    layers_by_index = {layer.layer_index: layer for layer in flexi_layers(model)}
    wanted = list(layers)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in wanted):
        raise ValueError(f"always_run must be a list of layer indices, got {wanted!r}")
    bad = sorted({i for i in wanted if i not in layers_by_index})
    if bad:
        raise ValueError(f"always_run has {bad}, which are not routed layers ({sorted(layers_by_index)})")
    static = sorted({i for i in wanted if layers_by_index[i].always_skip})
    if static:
        raise ValueError(f"always_run has {static}, which are always_skip layers")
    for index, layer in layers_by_index.items():
        layer.always_run = index in wanted


def always_run_layers(model: nn.Module) -> list[int]:
    """The routed layers set to run every token (`set_always_run`), in layer order."""
    return [layer.layer_index for layer in flexi_layers(model) if layer.always_run]


def set_tau(model: nn.Module, tau: float) -> None:
    """Change the decision threshold (run iff g > tau) of every routed layer: the one writer of tau.

    tau has one owner, `model.flexidepth.config` (the FlexiDepthConfig that every routed layer holds and
    reads on each forward, and that checkpoints store), so this single assignment is seen by every layer,
    by `AppliedMethod.flexi_cfg` and by `save_flexidepth`. Raises FlexiDepthConfigError (a ValueError) outside
    [0, 1] (`check_tau`)."""
    model.flexidepth.config.tau = check_tau(tau, "tau")
