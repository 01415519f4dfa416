"""Tokenisation of SFT rows into ``{"input_ids", "labels"}`` examples.

Two row formats are accepted:

- chat rows ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template. Roles are ``system``, ``user``, ``assistant`` or ``tool``; ``content`` is a string, null (empty)
  or a list of parts (``[{"type": "text", "text": ...}, ...]`` or plain strings), whose text parts are
  joined; a non-text part (image, audio, ...) is an error. With ``loss_on="all"`` every token is supervised (the paper's setting: its pipeline builds no label
  mask); with ``loss_on="assistant"`` only the assistant turns are (content plus the template's end-of-turn
  tokens, so the model still learns to stop). Rows longer than ``max_length`` are dropped, not truncated,
  as in the paper.
- plain text rows ``{"text": ...}``: tokenised, an end-of-sequence token appended, and cut into consecutive
  blocks of at most ``max_length`` tokens. Every block is supervised. Documents are never packed together,
  so no attention crosses a document boundary.

Every malformed row raises a ValueError naming where the row comes from (``row_names``: the file and the
row as numbered in that file) and what is wrong with it.

Labels follow the Hugging Face convention: unshifted copies of ``input_ids`` with ``IGNORE_INDEX`` where no
loss is taken; the model shifts them internally.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from src.utils.errors import DataError

IGNORE_INDEX = -100
LOSS_ON = ("all", "assistant")
# How many trailing prompt tokens BPE may merge with the start of the answer (SmolLM2: the template's "\n"
# before an answer that starts with "\n\n"); a larger mismatch means the template is not prefix-stable.
_MAX_BOUNDARY_MERGE = 2
ROLES = ("system", "user", "assistant", "tool")


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
        ValueError: On a bad ``loss_on``, malformed messages (see `normalize_messages`) or a chat template that
            is not prefix-stable (see `assistant_spans`).
    """
    _check_loss_on(loss_on)
    messages = normalize_messages(example.get("messages"), "example")
    input_ids = _encode(tokenizer, _render(tokenizer, messages))
    if len(input_ids) > max_length:
        return None
    labels = _chat_labels(tokenizer, messages, input_ids, loss_on)
    return {"input_ids": input_ids, "labels": labels} if supervised_count(labels) else None


def normalize_messages(messages, where: str) -> list[dict]:
    """Check a row's ``messages`` and return them as ``[{"role": str, "content": str}, ...]``.

    ``content`` may be a string, None (empty) or a list of parts: strings or ``{"type": "text", "text": str}``
    dicts (a dict without ``type`` but with ``text`` counts as text); text parts are joined without a
    separator. Other keys of a message (e.g. ``name``) are kept.

    Args:
        messages: The row's ``messages`` value.
        where: Where the row comes from, for errors (e.g. ``"data/chat.jsonl row 12"``).

    Raises:
        ValueError: naming ``where``, the message and the problem: not a list, a message that is not an
            object, a missing or unknown role (allowed: `ROLES`), a non-text part (naming its type) or a
            content of another type.
    """
    if not isinstance(messages, list | tuple):
        raise DataError(
            f"{where}: 'messages' must be a list of {{role, content}} objects, got {_kind(messages)}"
        )
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: message {j} is {_kind(message)}, expected an object {{'role': ..., 'content': ...}}"
            )
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {j} has role {role!r}; allowed roles are {list(ROLES)}")
        out.append({**message, "content": _content_text(message.get("content"), f"{where}: message {j}")})
    return out


def _content_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list | tuple):
        raise DataError(f"{where}: content must be a string or a list of parts, got {_kind(content)}")
    texts = []
    for k, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise DataError(f"{where}: content part {k} is {_kind(part)}, expected a string or an object")
        kind = part.get("type", "text" if "text" in part else None)
        if kind != "text":
            raise DataError(
                f"{where}: content part {k} has type {kind!r}; only text parts can be trained on "
                "(remove or describe non-text parts)"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise DataError(
                f"{where}: content part {k} is a text part without a string 'text', got {_kind(text)}"
            )
        texts.append(text)
    return "".join(texts)


def _kind(value) -> str:
    return "null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"


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
        raise DataError(
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
        raise DataError(
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
    row_names: Iterable[str] | None = None,
) -> tuple[list[dict], FilterReport]:
    """Tokenise chat and text rows, dropping over-long and empty ones.

    Args:
        tokenizer: A Hugging Face tokenizer (with a chat template if there are chat rows).
        rows: Dicts with a ``messages`` or a ``text`` key.
        max_length: Longest allowed sequence (chat rows are filtered, text rows chunked).
        loss_on: ``"all"`` or ``"assistant"``; text rows are always fully supervised.
        source: Name of the rows' origin (file, hub dataset), used in the report and in errors.
        row_names: Where each row comes from, in the order of ``rows`` (e.g. ``"chat.jsonl row 12"``: the file
            and the row as numbered in it, whatever shuffling or splitting came before); errors name the row
            with it. None: ``"{source}: row {i}"`` with i the position in ``rows`` (from 0).

    Returns:
        The tokenised examples and a `FilterReport`.

    Raises:
        ValueError: On a malformed row (neither ``messages`` nor ``text``, not an object, bad messages or
            text), naming the row, or if nothing survives filtering.
    """
    _check_loss_on(loss_on)
    examples, report = [], FilterReport(source=source)
    names = iter(row_names) if row_names is not None else None
    for index, row in enumerate(rows):
        where = next(names) if names is not None else f"{source}: row {index}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with 'messages' or 'text', got {_kind(row)}")
        if row.get("messages") is not None:
            _tokenize_chat_row(tokenizer, row, max_length, loss_on, examples, report, where)
        elif "text" in row:
            text = row["text"]
            if text is not None and not isinstance(text, str):
                raise DataError(f"{where}: 'text' must be a string, got {_kind(text)}")
            blocks = tokenize_text(tokenizer, text or "", max_length)
            examples.extend(blocks)
            report.kept += len(blocks)
            report.dropped_empty += not blocks
        else:
            raise DataError(
                f"{where} has neither a 'messages' nor a 'text' column "
                f"(columns: {sorted(row)}); chat rows need 'messages', plain text rows need 'text'."
            )
    if not examples:
        raise DataError(
            f"{source}: no examples left after filtering ({report}); raise max_length or check the data."
        )
    return examples, report


def _tokenize_chat_row(
    tokenizer, row: dict, max_length: int, loss_on: str, out: list, report: FilterReport, where: str = "row"
) -> None:
    """Tokenise one chat row into ``out`` and count it in ``report`` (``where`` names the row in errors)."""
    messages = normalize_messages(row["messages"], where)
    if not messages or not any(m["content"].strip() for m in messages):
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
    check_chat_template(tokenizer)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def check_chat_template(tokenizer) -> None:
    """DataError naming the tokenizer and the keys to change when it has no chat template (chat rows, rows
    with `messages`, are rendered with it): one without `apply_chat_template`, or a Hugging Face tokenizer
    whose `chat_template` is empty. An object that renders chat itself without that attribute passes."""
    renders = callable(getattr(tokenizer, "apply_chat_template", None))
    if not renders or (hasattr(tokenizer, "chat_template") and not tokenizer.chat_template):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"the tokenizer {name!r} has no chat template, so chat data (rows with 'messages') cannot be "
            "rendered: set model.tokenizer to a tokenizer with a chat template, or use text data (rows with "
            "'text')"
        )


def _encode(tokenizer, text: str) -> list[int]:
    # The template already writes any BOS/special tokens as text; adding them again would duplicate BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _check_loss_on(loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise DataError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
