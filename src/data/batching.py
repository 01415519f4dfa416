"""Padding token-id lists into a batch: the one helper every batching site uses (training collate,
held-out perplexity, multiple-choice scoring, the lm-eval adapter)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

SIDES = ("right", "left")


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists into `(input_ids, attention_mask)`, both long tensors of shape [B, T] on the CPU.

    Args:
        seqs: B lists of token ids (at least one list; an empty list is an all-padding row).
        pad_id: id written into padding positions (`src.models.tokenizer.pad_token_id`).
        side: "right" (tokens first; training, perplexity) or "left" (tokens last, so every row ends in the
            last column; scoring with `logits_to_keep`, and `generate`, which expects left padding).
        width: T; default the longest sequence. Must be at least that.

    Returns:
        input_ids [B, T] (pad_id on padding) and attention_mask [B, T] (1 on tokens, 0 on padding).

    Raises:
        ValueError: no sequences, an unknown side, or a width shorter than the longest sequence.
    """
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    longest = max(len(s) for s in seqs)
    width = longest if width is None else int(width)
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest sequence ({longest} tokens)")
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if n == 0:
            continue
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


__all__ = ["SIDES", "pad_batch"]
