"""shortgpt: ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect").

Static layer pruning by Block Influence: for decoder layer i with input hidden states ``x_in`` and output
hidden states ``x_out`` (both [B, T, d]),

    BI_i = 1 - mean over non-pad tokens t of cos(x_in[t], x_out[t])

and the k layers with the lowest BI are removed. BI lies in [0, 2]; a layer that leaves its input unchanged
has BI 0.

    texts = calibration_texts(max_texts=64)                       # training-side Lee background articles
    bi = block_influence(model, text_batches(tokenizer, texts))   # both in src/methods/base.py
    drop = shortgpt_layers(bi, k=6)                               # sorted layer indices

Design choices:

- ``x_in`` / ``x_out`` are captured with forward hooks on the decoder layers themselves, not with
  ``output_hidden_states``: Hugging Face's last entry of ``hidden_states`` has the final norm applied, so it
  is not the last layer's output. Hooks handle layers that return a tensor (transformers 5.x) or a tuple
  whose first element is the hidden states (transformers 4.x).
- Cosines are computed in fp32 and summed in fp64 over all non-pad tokens of all batches, so a token-weighted
  mean over the whole calibration set (a row's pad positions never count; with right padding and causal
  attention they cannot influence the real tokens either).
- `shortgpt_layers` considers every layer by default, as ShortGPT does (layer 0 usually has a high BI and
  is not chosen anyway); pass ``candidates`` to restrict the choice. Ties go to the higher layer index.
- Calibration text (src/methods/base.py): `calibration_texts` returns the 300 Lee *background* articles (the text the builtin
  training data is made from), never the 50 held-out articles used for evaluation.

`ShortGPT` (method=shortgpt) removes the k lowest-BI layers measured on `calibration` text; no training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..flexidepth.config import FlexiDepthConfig
from ..flexidepth.inject import decoder_layers
from .base import AppliedMethod, Batch, Calibration, base_model, calibration_batches
from .removal import RemovalMethod, prune_layers, remove_layers


def hidden_of(output) -> torch.Tensor:
    """The hidden states of a decoder layer's output: the tensor itself, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find hidden states in a decoder layer output of type {type(output).__name__}")


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states passed to a decoder layer (first positional argument or ``hidden_states=``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise TypeError("decoder layer called without hidden states as first argument or hidden_states=")


def block_influence(model: nn.Module, batches: Iterable[Batch]) -> list[float]:
    """ShortGPT Block Influence of every decoder layer, token-averaged over the non-pad tokens of `batches`.

    Args:
        model: A HF causal LM (or its decoder stack) with decoder layers at ``.model.layers``.
        batches: ``(input_ids, attention_mask)`` pairs, [B, T] each (1 = real token); moved to the model's
            device here.

    Returns:
        One BI per decoder layer, in layer order, each in [0, 2] (up to rounding).
    """
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64, device=device)
    count = 0
    state: dict[str, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            x_in = layer_input(args, kwargs).float()
            x_out = hidden_of(output).float()
            cos = F.cosine_similarity(x_in, x_out, dim=-1)  # [B, T]
            sums[index] += cos.masked_select(state["keep"]).sum(dtype=torch.float64)

        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for input_ids, attention_mask in batches:
                input_ids = input_ids.to(device)
                attention_mask = attention_mask.to(device)
                state["keep"] = attention_mask.bool()
                n = int(state["keep"].sum())
                if n == 0:
                    continue
                base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                count += n
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("block_influence needs at least one non-pad token")
    return [1.0 - float(s) / count for s in sums.cpu()]


def shortgpt_layers(bi: list[float], k: int, candidates: list[int] | None = None) -> list[int]:
    """The k layers with the lowest Block Influence, sorted ascending.

    Args:
        bi: One BI per decoder layer (`block_influence`).
        k: How many layers to remove.
        candidates: Layer indices that may be chosen; None = every layer (ShortGPT's own setting).

    Ties in BI go to the higher layer index (deeper layers are removed first).
    """
    pool = list(range(len(bi))) if candidates is None else sorted(set(candidates))
    bad = [i for i in pool if not 0 <= i < len(bi)]
    if bad:
        raise ValueError(f"candidate layers {bad} out of range for {len(bi)} layers")
    if not 0 <= k <= len(pool):
        raise ValueError(f"k={k} must be in [0, {len(pool)}] (the number of candidate layers)")
    ranked = sorted(pool, key=lambda i: (bi[i], -i))
    return sorted(ranked[:k])


@dataclass
class ShortGPT(RemovalMethod):
    """Block Influence 1 - cos(layer input, layer output), measured on `calibration` text; no training."""

    name: str = "shortgpt"
    k32: float | None = None  # conf/method/<name>.yaml sets it
    calibration: Calibration = field(default_factory=Calibration)
    prune: bool = (
        False  # delete the layers (`prune_layers`, what a deployment runs) instead of identity layers
    )

    def apply(
        self, model, *, tokenizer=None, ckpt=None, skip: FlexiDepthConfig | None = None
    ) -> AppliedMethod:
        """Remove the k lowest-BI layers of the plain `model` in place: identity FlexiDepth layers (the quality
        comparison's wiring, route statistics included), or with `prune` deleted from the model (no call, no
        K/V for them; `src.speed` times this). The logits of both are equal (tests/test_speed.py)."""
        self.refuse_ckpt(ckpt)
        if tokenizer is None:
            raise ValueError("method=shortgpt needs a tokenizer for its calibration text")
        k = self.resolve_k(model.config.num_hidden_layers)
        bi = block_influence(model, calibration_batches(tokenizer, self.calibration))
        removed = shortgpt_layers(bi, k)
        (prune_layers if self.prune else remove_layers)(model, removed)
        return self.removed(k, removed, {"block_influence": bi})
