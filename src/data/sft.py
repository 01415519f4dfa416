"""Tokenisation of SFT rows into ``{"input_ids", "labels"}`` examples.

Two row formats are accepted:

- chat rows ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template. With ``loss_on="all"`` every token is supervised (the paper's setting: its pipeline builds no label
  mask); with ``loss_on="assistant"`` only the assistant turns are (content plus the template's end-of-turn
  tokens, so the model still learns to stop). Rows longer than ``max_length`` are dropped, not truncated,
  as in the paper.
- plain text rows ``{"text": ...}``: tokenised, an end-of-sequence token appended, and cut into consecutive
  blocks of at most ``max_length`` tokens. Every block is supervised. Documents are never packed together,
  so no attention crosses a document boundary.

Labels follow the Hugging Face convention: unshifted copies of ``input_ids`` with ``IGNORE_INDEX`` where no
loss is taken; the model shifts them internally.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

IGNORE_INDEX = -100
LOSS_ON = ("all", "assistant")
# How many trailing prompt tokens BPE may merge with the start of the answer (SmolLM2: the template's "\n"
# before an answer that starts with "\n\n"); a larger mismatch means the template is not prefix-stable.
_MAX_BOUNDARY_MERGE = 2


@dataclass
class FilterReport:
    """Counts of what tokenisation kept and dropped; examples are counted after text chunking."""

    kept: int = 0
    dropped_too_long: int = 0
    dropped_empty: int = 0
    source: str = "<rows>"

    @property
    def total(self) -> int:
        return self.kept + self.dropped_too_long + self.dropped_empty

    def __str__(self) -> str:
        return (
            f"{self.source}: kept {self.kept} of {self.total} examples "
            f"(dropped {self.dropped_too_long} longer than max_length, {self.dropped_empty} empty)"
        )


def tokenize_example(tokenizer, example: dict, max_length: int, loss_on: str = "all") -> dict | None:
    """Tokenise one chat row.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        example: ``{"messages": [{"role": str, "content": str}, ...]}``; other keys are ignored.
        max_length: Longest allowed sequence in tokens.
        loss_on: ``"all"`` (every token) or ``"assistant"`` (assistant turns only).

    Returns:
        ``{"input_ids": list[int], "labels": list[int]}``, or None if the row is longer than ``max_length``
        or has no supervised token.

    Raises:
        ValueError: On a bad ``loss_on`` or a chat template that is not prefix-stable (see `assistant_spans`).
    """
    _check_loss_on(loss_on)
    input_ids = _encode(tokenizer, _render(tokenizer, example["messages"]))
    if len(input_ids) > max_length:
        return None
    labels = _chat_labels(tokenizer, example["messages"], input_ids, loss_on)
    return {"input_ids": input_ids, "labels": labels} if supervised_count(labels) else None


def _chat_labels(tokenizer, messages: list[dict], input_ids: list[int], loss_on: str) -> list[int]:
    if loss_on == "all":
        return list(input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in assistant_spans(tokenizer, messages, input_ids):
        labels[start:end] = input_ids[start:end]
    return labels


def assistant_spans(tokenizer, messages: list[dict], input_ids: list[int]) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the assistant turns in the rendered conversation.

    For assistant message i, ``start`` is the token length of the conversation before it rendered with the
    generation prompt (so the "assistant" header is excluded) and ``end`` the token length of the conversation
    through it (so its end-of-turn tokens are included). This requires the template to be prefix-stable: each
    rendered prefix must be a string prefix of the full rendering.

    Raises:
        ValueError: If the template is not prefix-stable for this conversation.
    """
    full_text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        start = _prefix_tokens(tokenizer, before, full_text, input_ids)
        end = _prefix_tokens(tokenizer, through, full_text, input_ids)
        spans.append((start, end))
    return spans


def _prefix_tokens(tokenizer, prefix: str, full_text: str, input_ids: list[int]) -> int:
    """Number of leading tokens of ``input_ids`` that encode the string ``prefix`` of ``full_text``.

    BPE may merge the last prefix token with the next one (a template newline followed by an answer that
    starts with a newline); the boundary then moves back to the last shared token, so that merged token counts
    as supervised. Larger mismatches mean the template renders prefixes differently and raise.
    """
    if not full_text.startswith(prefix):
        raise ValueError(
            "The chat template is not prefix-stable (rendering the first messages does not give a prefix of the "
            "whole conversation), so assistant-only masking cannot be computed; use data.loss_on=all or a "
            f"template without history-dependent rendering. Prefix ends with: {prefix[-80:]!r}"
        )
    prefix_ids = _encode(tokenizer, prefix)
    shared = 0
    for a, b in zip(prefix_ids, input_ids, strict=False):
        if a != b:
            break
        shared += 1
    if len(prefix_ids) - shared > _MAX_BOUNDARY_MERGE:
        raise ValueError(
            "The chat template's prefix tokenisation is not a prefix of the full tokenisation "
            f"({len(prefix_ids)} prefix tokens, only {shared} shared); assistant-only masking is unreliable "
            "for this tokenizer, use data.loss_on=all."
        )
    return shared


def tokenize_text(tokenizer, text: str, max_length: int) -> list[dict]:
    """Tokenise a plain document and cut it into blocks of at most ``max_length`` tokens.

    An end-of-sequence token is appended so the model sees where documents end. A final block of fewer than
    2 tokens is dropped (it has no next-token target).

    Returns:
        ``[{"input_ids": list[int], "labels": list[int]}, ...]``, empty for an empty document.
    """
    if not text or not text.strip():
        return []
    ids = _encode(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    blocks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) >= 2]


def tokenize_dataset(
    tokenizer,
    rows: Iterable[dict],
    max_length: int,
    loss_on: str = "all",
    source: str = "<rows>",
) -> tuple[list[dict], FilterReport]:
    """Tokenise chat and text rows, dropping over-long and empty ones.

    Args:
        tokenizer: A Hugging Face tokenizer (with a chat template if there are chat rows).
        rows: Dicts with a ``messages`` or a ``text`` key.
        max_length: Longest allowed sequence (chat rows are filtered, text rows chunked).
        loss_on: ``"all"`` or ``"assistant"``; text rows are always fully supervised.
        source: Name of the rows' origin (file, hub dataset), used in the report and in errors.

    Returns:
        The tokenised examples and a `FilterReport`.

    Raises:
        ValueError: On a row with neither ``messages`` nor ``text``, or if nothing survives filtering.
    """
    _check_loss_on(loss_on)
    examples, report = [], FilterReport(source=source)
    for index, row in enumerate(rows):
        if row.get("messages") is not None:
            _tokenize_chat_row(tokenizer, row, max_length, loss_on, examples, report)
        elif "text" in row:
            blocks = tokenize_text(tokenizer, row["text"] or "", max_length)
            examples.extend(blocks)
            report.kept += len(blocks)
            report.dropped_empty += not blocks
        else:
            raise ValueError(
                f"{source}: row {index} has neither a 'messages' nor a 'text' column "
                f"(columns: {sorted(row)}); chat rows need 'messages', plain text rows need 'text'."
            )
    if not examples:
        raise ValueError(
            f"{source}: no examples left after filtering ({report}); raise max_length or check the data."
        )
    return examples, report


def _tokenize_chat_row(
    tokenizer, row: dict, max_length: int, loss_on: str, out: list, report: FilterReport
) -> None:
    """Tokenise one chat row into ``out`` and count it in ``report``."""
    messages = row["messages"]
    if not messages or not any((m.get("content") or "").strip() for m in messages):
        report.dropped_empty += 1
        return
    input_ids = _encode(tokenizer, _render(tokenizer, messages))
    if len(input_ids) > max_length:
        report.dropped_too_long += 1
        return
    labels = _chat_labels(tokenizer, messages, input_ids, loss_on)
    if not supervised_count(labels):  # e.g. loss_on="assistant" and no assistant turn
        report.dropped_empty += 1
        return
    out.append({"input_ids": input_ids, "labels": labels})
    report.kept += 1


def supervised_count(labels: list[int]) -> int:
    """Number of positions ``p >= 1`` with a label, i.e. the number of next-token predictions scored."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer, text: str) -> list[int]:
    # The template already writes any BOS/special tokens as text; adding them again would duplicate BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_loss_on(loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
