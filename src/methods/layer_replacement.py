"""layer_replacement: static layer replacement, a trained baseline (no router); not FlexiDepth.

In the manner of LLM-Streamline (Chen et al., "Streamlining Redundant Layers to Compress Large Language
Models", ICLR 2025, arXiv 2403.19135), which prunes low-importance layers and trains a lightweight module in
their place. This is a baseline for "what does per-token routing buy": the same adapters at fixed layers, every
token skipping them, so a static point is never reported as FlexiDepth (its checkpoints say
`method: layer_replacement`).

What it does, once, before training (`inject`, called by the LightningModule on the loaded base model):
  1. Block Influence of every decoder layer on the calibration text (ShortGPT, Men et al. 2024, arXiv
     2403.03853: `shortgpt.block_influence` on `base.calibration_batches(tokenizer, calibration)`, the
     training-side Lee background articles, never the held-out text);
  2. the k lowest-BI layers (`shortgpt.shortgpt_layers`) among the replaceable ones (every layer but the first
     of each attention type, whose K/V the cache reads its length from: `FlexiDepthConfig.check_always_skip`;
     layer 0 in a model without `layer_types`);
  3. skip.layers = skip.always_skip = those layers: each is replaced by FlexiDepth's SwiGLU adapter,
     y = x + Adapter(N_f(x)) for every token (no router call, no attention, no K/V; docs/method.md §3.10).
Only the k adapters train (L_lm of the `loss` group: ce / kd / mix); there is no skip loss and no budget.
The chosen layers, the BI values and k are recorded (`training_record`) in the Lightning checkpoints and in the
exported folder's flexidepth_config.json (`method_details`), next to `method: layer_replacement`.

Differences from LLM-Streamline: it replaces one *contiguous* block of layers, chosen by the cosine similarity
of the block's input and output, by *one* lightweight network (a transformer layer or an FFN) trained to mimic
the block's output (MSE), and then optionally fine-tunes. Here each of the k (not necessarily contiguous)
lowest-Block-Influence layers gets its own adapter (width intermediate / skip.adapter_reduction), trained
end to end on the LM objective of the `loss` group with the base frozen. Hence "in the manner of".

Shapes: hidden states [B, T, d]; an adapter maps N_f(x) [B, T, d] -> [B, T, d] through width m.
Errors (MethodConfigError, each naming the key): method.k not an integer in [1, num_layers - 1] (checked
against model.arch before anything is loaded, and again against the loaded model); a
loss.target_layers_skipped budget, a non-zero loss.alpha, skip.layers / skip.always_skip or init_from set by
the user (`prepare_training`); at evaluation, a checkpoint of another method (`apply`).

    python -m src.train method=layer_replacement method.k=4
    python -m src.eval method=layer_replacement ckpt_path=<run folder>
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..flexidepth import FlexiDepthConfig, inject, load_flexidepth
from ..flexidepth.checkpoint import read_checkpoint_config
from ..models.config import ModelConfig
from .base import AppliedMethod, Calibration, MethodConfigError, calibration_batches
from .flexidepth import FlexiDepth
from .shortgpt import block_influence, shortgpt_layers

CREDIT = (
    "layer replacement in the manner of LLM-Streamline (Chen et al., ICLR 2025, arXiv 2403.19135); "
    "layers: ShortGPT's Block Influence (arXiv 2403.03853); replacement: FlexiDepth's SwiGLU adapter"
)
# keys the method sets itself; a user value for one contradicts it
_OWN_KEYS = ("skip.layers", "skip.always_skip", "loss.target_layers_skipped", "loss.alpha", "init_from")


def replaceable_layers(config) -> list[int]:
    """Layers that may be replaced: all but the first layer of each attention type (`check_always_skip`)."""
    n = int(config.num_hidden_layers)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * n)
    firsts = {types.index(t) for t in dict.fromkeys(types)}
    return [i for i in range(n) if i not in firsts]


@dataclass
class LayerReplacement(FlexiDepth):
    """ShortGPT's k lowest-BI layers, each replaced by a trained adapter for every token (module docstring)."""

    name: str = "layer_replacement"
    trains = True
    k: int = 4
    calibration: Calibration = field(default_factory=Calibration)

    def __post_init__(self) -> None:
        # the calibration text's tokenizer: set by the caller, or loaded at inject from the `model` node that
        # prepare_training (src.train) notes
        self.tokenizer = None
        self._model: ModelConfig | None = None
        self._record: dict[str, Any] = {}

    # ------------------------------------------------------------------ options
    def validate(self) -> None:
        if self.k < 1:  # the dataclass types it (Method.from_config)
            raise MethodConfigError(f"method.k must be an integer >= 1 (layers replaced), got {self.k!r}")
        for key in ("texts", "max_length", "batch_size"):
            value = getattr(self.calibration, key)
            if value < 1:
                raise MethodConfigError(f"method.calibration.{key} must be an integer >= 1, got {value!r}")

    def check_k(self, num_layers: int) -> None:
        """MethodConfigError naming method.k unless 1 <= k <= num_layers - 1."""
        if not 1 <= self.k <= num_layers - 1:
            raise MethodConfigError(
                f"method.k={self.k} must be in [1, {num_layers - 1}] for a {num_layers}-layer model "
                "(layers replaced; the first layer keeps its K/V)"
            )

    def prepare_training(self, settings, explicit: set[str]) -> list[str]:
        """Check k against model.arch, refuse user settings that contradict the method, clear the recipe's
        budget / alpha (nothing is routed), and note the tokenizer for the calibration text."""
        arch = (settings.model.arch or {}).get("num_hidden_layers")
        if arch is not None:
            self.check_k(int(arch))
        for key in _OWN_KEYS:
            if key not in explicit:
                continue
            value = settings
            for part in key.split("."):
                value = getattr(value, part)
            if key == "loss.target_layers_skipped" and value is not None:
                why = "a layers-skipped budget; it skips exactly method.k layers, set it to null"
            elif key == "loss.alpha" and value not in (None, 0, 0.0):
                why = "a skip-loss weight; nothing is routed, so it trains with loss.alpha=0"
            elif key in ("skip.layers", "skip.always_skip") and value not in ("last_half", [], None):
                why = "layers of its own; it replaces ShortGPT's method.k lowest-Block-Influence layers"
            elif key == "init_from" and value:
                why = "a warm start from another checkpoint; its adapters start fresh at the chosen layers"
            else:
                continue
            raise MethodConfigError(f"{key}={value!r} contradicts method=layer_replacement: {why}")
        notes = []
        loss = settings.loss
        cleared = {
            k: v
            for k, v in (("target_layers_skipped", loss.target_layers_skipped), ("alpha", loss.alpha))
            if v not in (None, 0, 0.0)
        }
        if cleared:
            notes.append(
                "method=layer_replacement routes nothing: "
                + ", ".join(f"loss.{k}={v}" for k, v in cleared.items())
                + " of the model's recipe / defaults not used (null budget, alpha 0)"
            )
        loss.target_layers_skipped = None
        loss.alpha = 0.0
        self._model = settings.model  # the calibration text's tokenizer, loaded at inject
        return notes

    # ------------------------------------------------------------------ training
    def choose_layers(self, model, tokenizer) -> tuple[list[int], list[float]]:
        """(layers, BI): ShortGPT's k lowest-Block-Influence replaceable layers of the plain `model` on the
        calibration text, and every layer's BI."""
        self.check_k(model.config.num_hidden_layers)
        bi = block_influence(model, calibration_batches(tokenizer, self.calibration))
        return shortgpt_layers(bi, self.k, candidates=replaceable_layers(model.config)), bi

    def inject(self, model, flexi_cfg: FlexiDepthConfig):
        """Choose the layers on the loaded base `model`, set flexi_cfg.layers = flexi_cfg.always_skip = them
        (the caller's config object, which the model then shares), inject; only their adapters train."""
        tokenizer = self.tokenizer
        if tokenizer is None and self._model is not None:
            from ..models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self._model)
        if tokenizer is None:
            raise MethodConfigError(
                "method=layer_replacement needs a tokenizer for its calibration text: set .tokenizer, or let "
                "src.train's prepare_training note the model's"
            )
        if flexi_cfg.adapter == "none":
            raise MethodConfigError(
                "skip.adapter=none contradicts method=layer_replacement: the adapter is what replaces a layer"
            )
        layers, bi = self.choose_layers(model, tokenizer)
        flexi_cfg.layers = list(layers)
        flexi_cfg.always_skip = list(layers)
        self._record = {
            "k": self.k,
            "layers": list(layers),
            "block_influence": [float(b) for b in bi],
            "candidates": replaceable_layers(model.config),
            "calibration": asdict(self.calibration),
            "credit": CREDIT,
        }
        return inject(model, flexi_cfg)

    def training_record(self) -> dict[str, Any]:
        return dict(self._record)

    # ------------------------------------------------------------------ evaluation
    def load(self, model, ckpt, cfg: FlexiDepthConfig) -> None:
        inject(model, cfg)  # the stored config: skip.layers = skip.always_skip = the chosen layers
        load_flexidepth(model, ckpt)

    def apply(
        self, model, *, tokenizer=None, ckpt=None, skip: FlexiDepthConfig | None = None
    ) -> AppliedMethod:
        """Load a layer_replacement checkpoint (`ckpt`, required): its recorded layers, not `method.k`."""
        applied = super().apply(model, tokenizer=tokenizer, ckpt=ckpt, skip=skip)
        details = dict(read_checkpoint_config(ckpt).get("method_details") or {})
        layers = list(model.flexidepth.config.always_skip)
        applied.k = float(len(layers))
        applied.details.update(
            layers=layers,
            block_influence=details.get("block_influence"),
            credit=details.get("credit", CREDIT),
        )
        return applied
