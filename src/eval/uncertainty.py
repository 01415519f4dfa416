"""The base model's uncertainty at every DepthMap token: its predictive entropy and its loss on the token.

For a row whose token x_t sits at position t of its example's sequence (prompt followed by the generated or
choice tokens, DepthMap positions 0..n-1):

    base_entropy = H(p_base(. | x_<t)) = -sum_v p log p        (nats; the distribution that predicted x_t)
    base_loss    = -log p_base(x_t | x_<t)                      (nats)

both None at t = 0 (nothing predicts the first token). p_base is the frozen base model, full depth (for an
injected model: `set_routing(model, False)`, which makes every FlexiDepth layer the base layer exactly). These
are properties of the token and the base model only, never of the routes, so they can be compared across
checkpoints. The forward that produced x_t is the one at position t - 1: for a generated token that is the
forward whose routes its row carries (src/eval/depthmap.py).

    add_base_stats(model, records, batch_size, pad_id)   fills records' "base_entropy" / "base_loss" in place
"""

from __future__ import annotations

from collections import defaultdict

import torch

from src.data.batching import pad_batch
from src.flexidepth import flexi_layers, is_injected

# methods whose application changes the base weights in place (the base distribution is then lost)
WEIGHT_CHANGING_METHODS = ("laco",)


def example_sequences(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Records grouped by (model, example_id), each group sorted by position.

    Raises ValueError when an example's positions are not exactly 0..n-1 (a DepthMap example is one
    contiguous sequence)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        groups[(str(rec["model"]), str(rec["example_id"]))].append(rec)
    for key, recs in groups.items():
        recs.sort(key=lambda r: int(r["position"]))
        positions = [int(r["position"]) for r in recs]
        if positions != list(range(len(recs))):
            raise ValueError(
                f"DepthMap example {key}: positions are not 0..{len(recs) - 1}: {positions[:8]}..."
            )
    return dict(groups)


def token_stats(
    model, sequences: list[list[int]], batch_size: int = 8, pad_id: int = 0
) -> list[tuple[list[float | None], list[float | None]]]:
    """(entropy, loss) per token of every sequence under `model` as it runs now (see the module docstring).

    Args:
        sequences: token-id lists (any lengths >= 1), right padded into batches of `batch_size`.
    Returns:
        Per sequence, two lists of its length: entropy and loss (nats, float), None at position 0.
    """
    device = next(model.parameters()).device
    out: list[tuple[list[float | None], list[float | None]]] = [None] * len(sequences)  # type: ignore[list-item]
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    with torch.inference_mode():
        for start in range(0, len(order), int(batch_size)):
            idx = order[start : start + int(batch_size)]
            ids, mask = pad_batch([list(sequences[i]) for i in idx], pad_id, side="right")
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)  # [B, T-1, V]: position t-1 predicts token t
            entropy = -(logp.exp() * logp).sum(-1)  # [B, T-1]
            loss = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
            for b, i in enumerate(idx):
                n = len(sequences[i])
                out[i] = (
                    [None] + [float(v) for v in entropy[b, : n - 1].cpu()],
                    [None] + [float(v) for v in loss[b, : n - 1].cpu()],
                )
    return out


def add_base_stats(
    model, records: list[dict], batch_size: int = 8, pad_id: int = 0, method: str | None = None
) -> bool:
    """Fill every record's "base_entropy" / "base_loss" from the base model, in place.

    `model` is the base model itself (`method` None), or a model a method has been applied to in place: an
    injected model (FlexiDepth, MindSkip, layer removal, early exit, random skip) is run with routing off for
    this pass and restored after. A method that changes the base weights (`WEIGHT_CHANGING_METHODS`: LaCo's
    merges) cannot give the base's distribution: the fields are set to None and False is returned.
    Returns True when the fields were computed. Raises ValueError for non-contiguous positions."""
    groups = example_sequences(records)
    if method in WEIGHT_CHANGING_METHODS:
        for rec in records:
            rec["base_entropy"] = rec["base_loss"] = None
        return False
    layers = flexi_layers(model) if is_injected(model) else []
    previous = [layer.routing for layer in layers]
    for layer in layers:
        layer.routing = False
    try:
        keys = list(groups)
        stats = token_stats(
            model, [[int(r["token_id"]) for r in groups[k]] for k in keys], batch_size, pad_id
        )
    finally:
        for layer, prev in zip(layers, previous, strict=True):
            layer.routing = prev
    for key, (entropy, loss) in zip(keys, stats, strict=True):
        for rec, h, nll in zip(groups[key], entropy, loss, strict=True):
            rec["base_entropy"], rec["base_loss"] = h, nll
    return True


__all__ = ["WEIGHT_CHANGING_METHODS", "add_base_stats", "example_sequences", "token_stats"]
