"""The method protocol: what every compared system (FlexiDepth, a baseline, a plug-in) provides.

A method is a dataclass whose fields are its options (the keys of its `conf/method/<name>.yaml`, typed), plus

    trains: ClassVar[bool]                      # does `src.train` train it (routers / adapters)?
    validate()                                  # value checks; raise MethodConfigError naming `method.<key>`
    inject(model, flexi_cfg)                    # trained methods: wrap the routed layers (LightningModule)
    prepare_training(settings, explicit)        # trained methods: check / adjust src.train's settings first
    training_record()                           # trained methods: what inject decided (-> checkpoints)
    apply(model, *, tokenizer, ckpt, skip)      # turn a base model into the system -> AppliedMethod
    cost(config, applied, layers_skipped)       # analytic MACs per token of the system (lm_head included)

Subclasses register themselves under their `name` default (see `registry.py`); nothing else lists them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..flexidepth import FlexiDepthConfig
from ..flexidepth.flops import model_macs_per_token
from ..utils.errors import MethodConfigError

Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids [B, T], attention_mask [B, T])

_REGISTRY: dict[str, type] = {}  # name -> Method subclass; looked up through registry.py


def register(name: str, cls: type) -> None:
    """Record `cls` under `name` (called by Method.__init_subclass__; the last definition wins)."""
    _REGISTRY[name] = cls


def registered() -> dict[str, type]:
    """The registered classes by name (the live mapping, in registration order)."""
    return _REGISTRY


@dataclass
class AppliedMethod:
    """What a method did to the model: its label in result tables and the facts needed to report it."""

    name: str
    label: str
    k: float | None = None  # target layers skipped (None: learned, measured at evaluation)
    removed: list[int] = field(default_factory=list)  # static methods: layers made identity
    flexi_cfg: FlexiDepthConfig | None = None  # routed systems: the model's own routing config (shared)
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


@dataclass
class Calibration:
    """Calibration text for methods that measure the base model (training-side Lee corpus, never held out)."""

    texts: int = 32  # articles
    max_length: int = 256  # tokens per article window
    batch_size: int = 4


@dataclass
class Method:
    """Base class of every method; see the module docstring for the protocol.

    Subclasses are dataclasses that set `name` (its default is the registry key) and `trains`, and override
    `apply` (and `inject` when they train, `cost` when removal or routing MACs do not describe them).
    """

    name: str = ""
    trains: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if isinstance(name, str) and name:
            register(name, cls)

    # ------------------------------------------------------------------ options
    @classmethod
    def from_config(cls, options: dict[str, Any]) -> Method:
        """Build from a `method` node (without `_target_`): unknown keys and wrong types raise
        MethodConfigError naming `method.<key>`; then `validate()` checks the values."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        options = dict(options)
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(options) - known)
        if bad:
            raise MethodConfigError(
                f"unknown key(s) {', '.join('method.' + k for k in bad)} for "
                f"method={cls.__dict__.get('name', cls.__name__)}; valid: {sorted(known)}"
            )
        try:
            method = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), options))
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            msg = str(getattr(err, "msg", err)).splitlines()[0]
            raise MethodConfigError(f"method.{key}: {msg}") from None
        own = cls.__dict__.get("name")
        if own and method.name != own:
            raise MethodConfigError(f"method.name={method.name!r} but {cls.__name__} is method={own!r}")
        method.validate()
        return method

    def validate(self) -> None:
        """Value checks; raise MethodConfigError naming `method.<key>`. Default: nothing to check."""

    # ------------------------------------------------------------------ the system
    def inject(self, model, flexi_cfg: FlexiDepthConfig):
        """Trained methods: wrap `model`'s routed layers for training (called by the LightningModule)."""
        raise MethodConfigError(
            f"method={self.name} has nothing to train (apply it with src.eval / src.compare)"
        )

    def prepare_training(self, settings, explicit: set[str]) -> list[str]:
        """Trained methods: check / adjust src.train's typed settings (`TrainCommand`, edited in place) before
        anything is loaded or the run folder is claimed. `explicit`: the dotted keys the user set (command
        line, an experiment preset). Returns notes for the log; raises MethodConfigError naming the key.
        Default: nothing to do."""
        return []

    def training_record(self) -> dict[str, Any]:
        """Trained methods: what `inject` decided from the loaded model (e.g. the layers it chose), written into
        Lightning checkpoints and the exported folder's config as `method_details`. Default: {}."""
        return {}

    def apply(
        self,
        model,
        *,
        tokenizer=None,
        ckpt: str | Path | None = None,
        skip: FlexiDepthConfig | None = None,
    ) -> AppliedMethod:
        """Turn `model` (a plain HF causal LM, modified in place) into the system; returns what it did.

        tokenizer: for calibration text; ckpt: a checkpoint folder (trained methods: required);
        skip: the typed `skip` settings (`SkipSchema.flexidepth()`; its routed layers, for methods that draw
        over them; None: FlexiDepthConfig's defaults). Raises MethodConfigError."""
        raise NotImplementedError

    def cost(self, config, applied: AppliedMethod, layers_skipped: float) -> float:
        """Analytic MACs per token of the system (lm_head included) when `layers_skipped` layers are skipped
        per token on average. Default: flops.py's routed-layer model (skipped layers pay K/V + adapter)."""
        return model_macs_per_token(config, applied.flexi_cfg, layers_skipped)

    def macs(self, config, applied: AppliedMethod, layers_skipped: float) -> dict[str, float]:
        """MACs per token of the system vs the base model: layers_skipped_mean, macs_per_token_base,
        macs_per_token, analytic_macs_saved_frac (fraction), flop_ideal_speedup (ratio)."""
        base = model_macs_per_token(config)
        cost = self.cost(config, applied, layers_skipped)
        return {
            "layers_skipped_mean": float(layers_skipped),
            "macs_per_token_base": float(base),
            "macs_per_token": float(cost),
            "analytic_macs_saved_frac": 1.0 - cost / base,
            "flop_ideal_speedup": base / cost,
        }

    # ------------------------------------------------------------------ helpers for subclasses
    def refuse_ckpt(self, ckpt) -> None:
        if ckpt is not None:
            raise MethodConfigError(f"ckpt_path is not used by method={self.name} (nothing is trained)")


def calibration_batches(
    tokenizer, calibration: Calibration | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration text (the training-side Lee corpus, never the held-out articles), tokenised:
    [(input_ids [B, T], attention_mask [B, T])]; None: `Calibration()`'s defaults."""
    calibration = calibration or Calibration()
    return list(
        text_batches(
            tokenizer,
            calibration_texts(),
            max_length=int(calibration.max_length),
            batch_size=int(calibration.batch_size),
            max_texts=int(calibration.texts),
        )
    )


def calibration_texts(max_texts: int | None = None) -> list[str]:
    """Training-side calibration text: the Lee background articles (disjoint from the held-out set)."""
    from ..data.corpora import lee_articles

    texts = lee_articles()
    return texts if max_texts is None else texts[:max_texts]


def text_batches(
    tokenizer,
    texts: list[str],
    max_length: int = 256,
    batch_size: int = 4,
    max_texts: int | None = None,
) -> Iterator[Batch]:
    """Tokenise texts (truncated to ``max_length`` tokens) into right-padded ``(input_ids, attention_mask)``.

    Texts are kept in order and grouped ``batch_size`` at a time; empty texts (or texts that tokenise to
    nothing) are dropped. Padding uses the tokenizer's pad id, else its eos id, else 0; the mask is what
    marks pads, so the id only has to be a valid token. Tensors are int64 on the CPU.
    """
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
    texts = [t for t in texts if t and t.strip()]
    if max_texts is not None:
        texts = texts[:max_texts]
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    for start in range(0, len(texts), batch_size):
        rows = [
            list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])[:max_length]
            for text in texts[start : start + batch_size]
        ]
        rows = [r for r in rows if r]
        if not rows:
            continue
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        yield input_ids, attention_mask


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a *ForCausalLM (``model.model``): running it skips the LM head."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def jsonable(obj):
    """Tensors to lists, keys to strings (for results.json)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj
