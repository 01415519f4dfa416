"""Input row formats and their normalisation to what `src.data.sft` tokenises.

Three row formats are accepted, for hub datasets and local files alike (docs/data-formats.md):

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: chat rows, used as they are;
- ``{"conversations": [{"from": ..., "value": ...}, ...]}``: ShareGPT-style chat rows (e.g.
  ``mlabonne/open-perfectblend``, stage 2 of the released recipe), converted here to ``messages`` with a
  configurable role mapping;
- ``{"text": ...}``: plain documents, used as they are.

The released recipe's conversion (its ``tokenize_perfectblend.py``) maps ``human`` to ``user`` and ``gpt`` to
``assistant`` and drops every other turn (system prompts included); `RELEASED_ROLES` is that mapping and the
default. A mapping sends a ShareGPT ``from`` value to a chat role, or to None to drop the turn explicitly;
``from`` values missing from the mapping are dropped too, as in the release.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from src.utils.errors import DataError

ROW_COLUMNS = ("messages", "conversations", "text")
CHAT_ROLES = ("system", "user", "assistant")
RELEASED_ROLES: dict[str, str | None] = {"human": "user", "gpt": "assistant"}


def check_roles(
    roles: Mapping[str, str | None], key: str = "data.conversation_roles"
) -> dict[str, str | None]:
    """Check the values of a ShareGPT role mapping (its types are the schema's, `DataConfig`) and return it
    as a plain dict.

    Args:
        roles: ``{from_value: chat_role or None}``; chat roles are ``system``, ``user``, ``assistant``.
        key: Config key named in errors.

    Raises:
        DataError: On an empty ``from`` value, a target that is not a chat role or null, or no target
            ``assistant``; the message names ``key`` and the entry.
    """
    out: dict[str, str | None] = {}
    for source, target in roles.items():
        if not source:
            raise DataError(f"{key}: keys must be non-empty strings ('from' values), got {source!r}")
        if target is not None and target not in CHAT_ROLES:
            raise DataError(
                f"{key}.{source}={target!r}: must be one of {list(CHAT_ROLES)} or null (drop the turn)"
            )
        out[source] = target
    if "assistant" not in out.values():
        raise DataError(
            f"{key}={out}: no 'from' value maps to 'assistant', so no converted row would have an answer"
        )
    return out


def sharegpt_to_messages(conversations: list, roles: Mapping[str, str | None], where: str) -> list[dict]:
    """Convert one ShareGPT ``conversations`` list to chat ``messages``.

    Args:
        conversations: ``[{"from": str, "value": str}, ...]`` in turn order.
        roles: A mapping checked by `check_roles`; turns whose ``from`` maps to None or is absent are dropped.
        where: Row description for errors (e.g. ``"data.source=x.jsonl: row 3"``).

    Returns:
        ``[{"role": str, "content": str}, ...]`` (a None ``value`` becomes ``""``).

    Raises:
        ValueError: If ``conversations`` is not a list or a turn lacks ``from`` / ``value``.
    """
    if not isinstance(conversations, list):
        raise DataError(
            f"{where}: 'conversations' must be a list of {{'from', 'value'}} turns, "
            f"got {type(conversations).__name__}"
        )
    messages = []
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            found = sorted(turn) if isinstance(turn, Mapping) else type(turn).__name__
            raise DataError(
                f"{where}, turn {turn_index}: ShareGPT turns need 'from' and 'value' keys, found {found}"
            )
        role = roles.get(turn["from"])
        if role is not None:
            messages.append({"role": role, "content": turn["value"] if turn["value"] is not None else ""})
    return messages


def normalise_row(row: Mapping, roles: Mapping[str, str | None], where: str) -> Mapping:
    """A row in the ``messages`` / ``text`` form that `src.data.sft.tokenize_dataset` reads.

    ``messages`` rows and ``text`` rows are returned unchanged; a row whose ``messages`` is missing or null and
    whose ``conversations`` is set gets ``messages`` from `sharegpt_to_messages`. Other rows are returned
    unchanged too, so the tokeniser's own error (naming the row and its columns) reports them.
    """
    if row.get("messages") is not None or row.get("conversations") is None:
        return row
    return {**row, "messages": sharegpt_to_messages(row["conversations"], roles, where)}


def normalise_rows(
    rows: Iterable[Mapping], roles: Mapping[str, str | None], source: str
) -> Iterator[Mapping]:
    """`normalise_row` over ``rows`` (lazily); ``source`` and the row index name a bad row in errors."""
    for index, row in enumerate(rows):
        yield normalise_row(row, roles, f"{source}: row {index}")


def has_row_column(columns: Iterable[str]) -> bool:
    """Whether a table with these columns holds rows of a known format (`ROW_COLUMNS`)."""
    return any(column in ROW_COLUMNS for column in columns)
