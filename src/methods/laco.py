"""laco: LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse") as a static baseline.

**RDSC layer merge** (Reserving-Differences-while-Seeking-Common): collapsing layers l+1..l+m into layer l
sets, for every parameter θ of the layer,

    θ_l <- θ_l + Σ_{j=1..m} (θ_{l+j} - θ_l)

and removes layers l+1..l+m. As in LaCo, *all* parameters of the layer are merged: attention and MLP
weights, biases where the family has them (Qwen2 q/k/v), and the norm weights too (``input_layernorm``,
``post_attention_layernorm``, Qwen3's ``q_norm`` / ``k_norm``). Buffers are not merged (the supported decoder
layers hold none). The sum is formed in fp32 and cast back to the parameter's dtype.

**Search** (`laco_prune`), with C = ``merge_size``, I = ``interval``, T = ``threshold``, L = ``lowest_layer``
and positions counted in the *current* (already collapsed) layer stack, as in the paper:

    l = (number of layers) - C
    while l >= L and fewer than k layers removed:
        tentatively merge the C layers at positions l..l+C-1 into position l
        s = mean over calibration sentences of cos(rep_merged, rep_original)
        if s > T: accept, l -= I       else: undo, l -= 1
        (l is also capped so that l..l+C-1 stays inside the current stack)

A sentence's representation is the model's final hidden state (``last_hidden_state``, after the final norm)
averaged over the sentence's non-pad tokens; the original model's representations are computed once,
before any merge, and every candidate is compared against them. Layers merged away are made to act as
identity (`identity_layers`) while evaluating, never deleted: the ModuleList, the layer indices and the
state_dict keys stay as they are, and the caller turns the returned ``removed`` layers into identity blocks
with its own mechanism. A rejected merge restores the target layer's weights exactly (a saved copy).

Exactly ``k`` layers are removed: a merge of C layers removes C-1, and when fewer than C-1 remain to be
removed the last merge is smaller (C' = remaining + 1). **Fallback**: if the sweep reaches L with fewer than
k layers removed (the threshold rejected too many candidates), the remaining merges are chosen greedily:
every still-possible merge (any position >= L, current merge size) is evaluated and the one with the
highest similarity is accepted (ties: the higher position), repeated until k layers are removed. Such
merges are marked ``"phase": "fallback"`` in ``similarities``.

**Merging into a layer that has already absorbed layers** (only the fallback does this; the sweep's targets
move strictly down, so they are always original layers): the new differences are taken against the target's
*original* weights, θ_t <- θ_t' + Σ_s (θ_s - θ_t), so merging A and then B into t equals one merge of A ∪ B.
Taking them against the current θ_t' instead (the literal formula) would make a one-layer remainder merge
θ_t' + (θ_s - θ_t') = θ_s: it erases the earlier merge and turns "LaCo" into a plain removal. That is what
happened before 2026-12-02 at k = 4 on SmolLM2-135M (15 <- 16, 17, 18, then 15 <- 19 left layer 15 equal to
layer 19: layers 15-18 removed, ppl ~57 where real merges give 3e4-5e8; docs/baselines.md). A one-layer
merge into an original layer is still θ_t + (θ_{t+1} - θ_t) = θ_{t+1}, i.e. removing layer t, as the
formula says (k = 1, or a remainder merged into a fresh layer).

**Settings.** LaCo's paper (as we recall it; not verifiable offline) used C = 4, I = 2, T = 0.65 and merged only
within the upper half of the 32-layer Llama2-7B (L = 16), with a handful of calibration sentences. The
defaults here follow that, scaled by depth: C = 4, I = 2, T = 0.65, L = num_layers // 2 (15 for the
30-layer SmolLM2-135M, 16 for Llama-3-8B). k must be at most num_layers - 1 - L (layers strictly above L);
pass a lower ``lowest_layer`` for more. T is model-dependent: on a model where pooled final-state cosines
sit far above or below 0.65, the threshold accepts everything or nothing; the fallback keeps k exact
either way and ``similarities`` records what happened. On SmolLM2-135M it accepts nothing (best candidate
0.625 for a 3-layer and 0.165 for a 4-layer merge): every k there comes from the fallback (docs/baselines.md).

`LaCo` (method=laco) runs `laco_prune` on `calibration` text and removes the merged-away layers; no training.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..flexidepth.config import FlexiDepthConfig
from ..flexidepth.inject import decoder_layers
from .base import (
    AppliedMethod,
    Batch,
    Calibration,
    MethodConfigError,
    base_model,
    calibration_batches,
    jsonable,
)
from .removal import RemovalMethod, remove_layers

DEFAULT_MERGE_SIZE = 4
DEFAULT_INTERVAL = 2
DEFAULT_THRESHOLD = 0.65


# ------------------------------------------------------------------------------------------------- merge
def _merge_into_(
    layers: nn.ModuleList,
    target: int,
    sources: list[int],
    reference: dict[str, torch.Tensor] | None = None,
) -> None:
    """θ_target <- θ_target + Σ_s (θ_s - θ_ref) for every parameter, in place.

    ``reference`` (name -> tensor) is θ_ref, the weights the differences are taken against; None: the target's
    current weights (the RDSC formula). `laco_prune` passes a target's *original* weights when the target has
    already absorbed layers, so that merging A and then B into a layer equals merging A ∪ B at once.
    """
    if not sources:
        return
    params = dict(layers[target].named_parameters())
    others = [dict(layers[s].named_parameters()) for s in sources]
    for s, other in zip(sources, others, strict=True):
        if other.keys() != params.keys():
            raise ValueError(f"layers {target} and {s} have different parameters; cannot merge")
        for name, p in params.items():
            if other[name].shape != p.shape:
                raise ValueError(
                    f"{name}: shape {tuple(other[name].shape)} in layer {s}, {tuple(p.shape)} in {target}"
                )
    if reference is not None and reference.keys() != params.keys():
        raise ValueError(f"reference weights for layer {target} name other parameters than the layer's")
    with torch.no_grad():
        for name, p in params.items():
            current = p.detach().float()
            base = current if reference is None else reference[name].detach().float()
            merged = current.clone()
            for other in others:
                merged += other[name].detach().float() - base
            p.copy_(merged.to(p.dtype))


def rdsc_merge_(layers: nn.ModuleList, start: int, count: int) -> None:
    """RDSC-merge ``layers[start + 1 : start + count]`` into ``layers[start]``, in place.

    Every parameter of ``layers[start]`` becomes θ_start + Σ_{j=start+1}^{start+count-1} (θ_j - θ_start).
    The other layers are not modified or removed. ``count`` = 1 is a no-op.
    """
    if count < 1 or start < 0 or start + count > len(layers):
        raise ValueError(f"cannot merge {count} layers from {start} in a stack of {len(layers)}")
    _merge_into_(layers, start, list(range(start + 1, start + count)))


# ---------------------------------------------------------------------------------------------- identity
def _returns_tuple(layer: nn.Module) -> bool:
    """Whether the layer's forward is declared to return a tuple (transformers 4.x) rather than a tensor."""
    try:
        annotation = inspect.signature(type(layer).forward).return_annotation
    except (TypeError, ValueError):
        return False
    return "tuple" in str(annotation).lower()


@contextlib.contextmanager
def identity_layers(model: nn.Module, indices: Iterable[int]) -> Iterator[None]:
    """Within the block, the given decoder layers return their input hidden states unchanged.

    The layer's ``forward`` is replaced on the instance (nothing is computed, no weights change) and put back
    on exit, also on error. The replacement returns what the family's decoder layer returns: the hidden
    states tensor (transformers 5.x), or a 1-tuple ``(hidden_states,)`` when the layer's forward is declared
    to return a tuple (transformers 4.x). No KV cache entry is written for these layers, so use it with
    ``use_cache=False`` (as `laco_prune` does) or for whole-sequence forwards.
    """
    layers = decoder_layers(model)
    indices = sorted(set(int(i) for i in indices))
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for {len(layers)} layers")
    saved = []
    for i in indices:
        layer = layers[i]
        saved.append((layer, "forward" in layer.__dict__, layer.__dict__.get("forward")))
        as_tuple = _returns_tuple(layer)

        def identity(*args, _as_tuple=as_tuple, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if _as_tuple else hidden

        layer.forward = identity
    try:
        yield
    finally:
        for layer, had_own, previous in saved:
            if had_own:
                layer.forward = previous
            else:
                del layer.forward


# -------------------------------------------------------------------------------------------- similarity
def _pooled_final(model: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    """Per-sentence final hidden state averaged over non-pad tokens: one [B, d] fp32 tensor per batch."""
    out = []
    for input_ids, attention_mask in batches:
        hidden = base_model(model)(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return out


def _similarity(model: nn.Module, batches: list[Batch], reference: list[torch.Tensor]) -> float:
    """Mean over sentences of cos(pooled representation now, pooled representation of the original model)."""
    pooled = _pooled_final(model, batches)
    cos = torch.cat([F.cosine_similarity(a, b, dim=-1) for a, b in zip(pooled, reference, strict=True)])
    return float(cos.double().mean())


# ---------------------------------------------------------------------------------------------- the search
def laco_prune(
    model: nn.Module,
    k: int,
    batches: Iterable[Batch],
    merge_size: int = DEFAULT_MERGE_SIZE,
    interval: int = DEFAULT_INTERVAL,
    threshold: float = DEFAULT_THRESHOLD,
    lowest_layer: int | None = None,
) -> dict:
    """Collapse ``k`` decoder layers of ``model`` LaCo-style; merges the surviving layers' weights in place.

    Args:
        model: A HF causal LM with decoder layers at ``.model.layers``. Its layer list is not changed; the
            weights of the layers that absorb others are.
        k: Number of layers to remove, 0 <= k <= num_layers - 1 - lowest_layer.
        batches: Calibration ``(input_ids, attention_mask)`` pairs, right-padded (e.g.
            `src.methods.base.calibration_batches`); read once, kept on the model's device.
        merge_size: C, the layers combined per merge (removes C - 1 layers); >= 2.
        interval: I, how far l moves down after an accepted merge; >= 1.
        threshold: T, a merge is accepted when the similarity is > T.
        lowest_layer: L, the lowest position a merge may start at (layers <= L are never removed); None =
            num_layers // 2.

    Returns:
        ``merged_into``: {surviving layer: sorted original layers whose weights it absorbed, transitively},
        ``removed``: sorted removed layer indices (len k), ``merges``: accepted merges in order as
        {"into", "layers", "similarity", "phase"}, ``similarities``: every evaluated candidate as
        {"into", "layers", "similarity", "accepted", "phase"}, ``final_similarity``: similarity of the
        pruned model (nan when k = 0), ``settings``: the settings used.
    """
    layers = decoder_layers(model)
    n = len(layers)
    low = n // 2 if lowest_layer is None else int(lowest_layer)
    if merge_size < 2:
        raise ValueError(f"merge_size must be >= 2, got {merge_size}")
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if not 0 <= low < n:
        raise ValueError(f"lowest_layer must be in [0, {n - 1}], got {low}")
    if not 0 <= k <= n - 1 - low:
        raise ValueError(f"k={k}: at most {n - 1 - low} layers lie above lowest_layer={low} in {n} layers")
    settings = {
        "k": k,
        "merge_size": merge_size,
        "interval": interval,
        "threshold": threshold,
        "lowest_layer": low,
        "num_layers": n,
    }

    device = next(model.parameters()).device
    batches = [(ids.to(device), mask.to(device)) for ids, mask in batches]
    if not batches or sum(int(m.sum()) for _, m in batches) == 0:
        raise ValueError("laco_prune needs calibration batches with at least one non-pad token")
    settings["calibration_sentences"] = sum(int(ids.shape[0]) for ids, _ in batches)

    active = list(range(n))  # original indices of the surviving layers, in stack order
    absorbed: dict[int, list[int]] = {}
    removed: list[int] = []
    merges: list[dict] = []
    similarities: list[dict] = []
    originals: dict[int, dict[str, torch.Tensor]] = {}  # a target's weights before its first merge

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            reference = _pooled_final(model, batches)

        def evaluate(pos: int, count: int) -> tuple[float, dict[str, torch.Tensor]]:
            """Merge active[pos+1 : pos+count] into active[pos]; return (similarity, weights before)."""
            target, sources = active[pos], active[pos + 1 : pos + count]
            backup = {name: p.detach().clone() for name, p in layers[target].named_parameters()}
            _merge_into_(layers, target, sources, originals.get(target))
            with torch.inference_mode(), identity_layers(model, removed + sources):
                return _similarity(model, batches, reference), backup

        def restore(target: int, backup: dict[str, torch.Tensor]) -> None:
            with torch.no_grad():
                for name, p in layers[target].named_parameters():
                    p.copy_(backup[name])

        def accept(pos: int, count: int, sim: float, phase: str, before: dict[str, torch.Tensor]) -> None:
            """Record the merge already applied to the weights; ``before``: the target's weights before it."""
            target, sources = active[pos], active[pos + 1 : pos + count]
            originals.setdefault(target, before)
            absorbed.setdefault(target, [])
            for s in sources:
                absorbed[target] += [s] + absorbed.pop(s, [])
            removed.extend(sources)
            del active[pos + 1 : pos + count]
            merges.append({"into": target, "layers": list(sources), "similarity": sim, "phase": phase})

        # the LaCo sweep, top down
        pos = len(active) - merge_size
        while len(removed) < k:
            count = min(merge_size, k - len(removed) + 1)
            pos = min(pos, len(active) - count)
            if pos < low:
                break
            target, sources = active[pos], active[pos + 1 : pos + count]
            sim, backup = evaluate(pos, count)
            ok = sim > threshold
            record = {"into": target, "layers": list(sources), "similarity": sim, "accepted": ok}
            similarities.append({**record, "phase": "sweep"})
            if ok:
                accept(pos, count, sim, "sweep", backup)
                pos -= interval
            else:
                restore(target, backup)
                pos -= 1

        # fallback: greedy best-similarity merges until k layers are removed
        while len(removed) < k:
            count = min(merge_size, k - len(removed) + 1)
            best = None
            for cand in range(low, len(active) - count + 1):
                target, sources = active[cand], active[cand + 1 : cand + count]
                sim, backup = evaluate(cand, count)
                restore(target, backup)
                similarities.append(
                    {
                        "into": target,
                        "layers": list(sources),
                        "similarity": sim,
                        "accepted": False,
                        "phase": "fallback",
                    }
                )
                if best is None or sim >= best[0]:
                    best = (sim, cand, len(similarities) - 1)
            sim, cand, row = best
            target = active[cand]
            before = {name: p.detach().clone() for name, p in layers[target].named_parameters()}
            _merge_into_(layers, target, active[cand + 1 : cand + count], originals.get(target))
            similarities[row]["accepted"] = True
            accept(cand, count, sim, "fallback", before)

        final = float("nan")
        if removed:
            with torch.inference_mode(), identity_layers(model, removed):
                final = _similarity(model, batches, reference)
    finally:
        model.train(was_training)

    return {
        "merged_into": {t: sorted(s) for t, s in sorted(absorbed.items())},
        "removed": sorted(removed),
        "merges": merges,
        "similarities": similarities,
        "final_similarity": final,
        "settings": settings,
    }


@dataclass
class LaCo(RemovalMethod):
    """Options None fall back to `laco_prune`'s defaults (C = 4, I = 2, T = 0.65, L = num_layers // 2)."""

    name: str = "laco"
    k32: float | None = None  # conf/method/<name>.yaml sets it
    merge_size: int | None = None  # C: layers collapsed per merge
    interval: int | None = None  # I: step down after an accepted merge
    threshold: float | None = None  # T: accept a merge when similarity > T
    lowest_layer: int | None = None  # L: merges stay at or above it
    calibration: Calibration = field(default_factory=Calibration)

    def validate(self) -> None:
        super().validate()
        if self.merge_size is not None and self.merge_size < 2:
            raise MethodConfigError(f"method.merge_size must be >= 2, got {self.merge_size!r}")
        if self.interval is not None and self.interval < 1:
            raise MethodConfigError(f"method.interval must be >= 1, got {self.interval!r}")

    def apply(
        self, model, *, tokenizer=None, ckpt=None, skip: FlexiDepthConfig | None = None
    ) -> AppliedMethod:
        self.refuse_ckpt(ckpt)
        if tokenizer is None:
            raise ValueError("method=laco needs a tokenizer for its calibration text")
        k = self.resolve_k(model.config.num_hidden_layers)
        kwargs = {
            key: getattr(self, key)
            for key in ("merge_size", "interval", "threshold", "lowest_layer")
            if getattr(self, key) is not None
        }
        info = laco_prune(model, k, calibration_batches(tokenizer, self.calibration), **kwargs)
        remove_layers(model, info["removed"])
        details = {key: v for key, v in info.items() if key != "removed"}
        return self.removed(k, list(info["removed"]), jsonable(details))
