"""Input row formats (src/data/formats.py): ShareGPT `conversations` next to `messages` and `text`."""

import json

import pytest

from src.data.config import DataConfig
from src.data.datamodule import SFTDataModule
from src.data.formats import RELEASED_ROLES, check_roles, normalise_row, normalise_rows, sharegpt_to_messages

SHAREGPT = [
    {"from": "system", "value": "You are terse."},
    {"from": "human", "value": "What is 2 + 3?"},
    {"from": "gpt", "value": "5"},
    {"from": "tool", "value": "ignored"},
    {"from": "human", "value": "And 4 + 4?"},
    {"from": "gpt", "value": "8"},
]


def test_released_mapping_keeps_human_and_gpt_only():
    messages = sharegpt_to_messages(SHAREGPT, RELEASED_ROLES, "unit")
    assert messages == [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"},
    ]


def test_custom_mapping_keeps_system_and_drops_null():
    roles = check_roles({"system": "system", "human": "user", "gpt": "assistant", "tool": None})
    messages = sharegpt_to_messages(SHAREGPT, roles, "unit")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "You are terse."
    assert sharegpt_to_messages([{"from": "gpt", "value": None}], roles, "unit") == [
        {"role": "assistant", "content": ""}
    ]


def test_normalise_row_leaves_messages_and_text_alone():
    chat = {"messages": [{"role": "user", "content": "hi"}], "conversations": None}
    assert normalise_row(chat, RELEASED_ROLES, "r") is chat
    text = {"text": "plain"}
    assert normalise_row(text, RELEASED_ROLES, "r") is text
    converted = normalise_row({"conversations": SHAREGPT[1:3], "source": "x"}, RELEASED_ROLES, "r")
    assert converted["source"] == "x" and [m["role"] for m in converted["messages"]] == ["user", "assistant"]


@pytest.mark.parametrize(
    "roles, match",
    [
        ({"human": "person", "gpt": "assistant"}, r"data\.conversation_roles\.human='person'"),
        ({"human": "user"}, "no 'from' value maps to 'assistant'"),
        ({"": "user", "gpt": "assistant"}, r"data\.conversation_roles: keys must be non-empty strings"),
    ],
)
def test_bad_role_mappings_are_named(roles, match):
    with pytest.raises(ValueError, match=match):
        check_roles(roles)


def test_bad_sharegpt_turn_names_row_and_turn():
    rows = [{"conversations": SHAREGPT}, {"conversations": [{"role": "user", "content": "x"}]}]
    with pytest.raises(
        ValueError, match=r"my\.jsonl: row 1, turn 0: .*'from' and 'value'.*\['content', 'role'\]"
    ):
        list(normalise_rows(rows, RELEASED_ROLES, "my.jsonl"))
    with pytest.raises(ValueError, match=r"row 0: 'conversations' must be a list"):
        list(normalise_rows([{"conversations": "hello"}], RELEASED_ROLES, "f"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(n):
    return [(f"Question {i}: what is {i} + {i}?", f"The answer is {2 * i}.") for i in range(n)]


def test_datamodule_sharegpt_file_equals_messages_file(smollm2_dir, tmp_path):
    """The same conversations as ShareGPT rows (with a system turn the released mapping drops) and as
    `messages` rows give identical tokenised examples, in .jsonl and in .parquet (hub-like struct lists)."""
    import datasets

    pairs = _pairs(12)
    sharegpt = [
        {
            "conversations": [
                {"from": "system", "value": "Be helpful."},
                {"from": "human", "value": q},
                {"from": "gpt", "value": a},
            ],
            "source": "unit",
        }
        for q, a in pairs
    ]
    messages = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]
    share_file = _write_jsonl(tmp_path / "share.jsonl", sharegpt)
    parquet_file = tmp_path / "share.parquet"
    datasets.Dataset.from_list(sharegpt).to_parquet(str(parquet_file))
    chat_file = _write_jsonl(tmp_path / "chat.jsonl", messages)

    def examples(path, **kwargs):
        data = DataConfig(source=str(path), max_length=128, loss_on="assistant", val_fraction=0.0, **kwargs)
        dm = SFTDataModule(data, str(smollm2_dir))
        dm.setup()
        return dm.train_examples, dm

    reference, dm_chat = examples(chat_file)
    from_jsonl, _ = examples(share_file)
    from_parquet, _ = examples(parquet_file)
    assert len(reference) == 12
    assert from_jsonl == reference and from_parquet == reference
    # keeping the system turn changes the rendering (the system prompt is in the input, not supervised)
    kept, dm = examples(
        share_file, conversation_roles={"system": "system", "human": "user", "gpt": "assistant"}
    )
    assert "Be helpful." in dm.tokenizer.decode(kept[0]["input_ids"])
    assert "Be helpful." not in dm_chat.tokenizer.decode(reference[0]["input_ids"])
    assert [len(e["input_ids"]) for e in kept] != [len(e["input_ids"]) for e in reference]


def test_datamodule_rejects_unknown_columns_naming_formats(smollm2_dir, tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}])
    dm = SFTDataModule(DataConfig(source=str(bad), max_length=64), str(smollm2_dir))
    with pytest.raises(
        ValueError, match=r"bad\.jsonl: needs a 'conversations' \(ShareGPT\), a 'messages' or a 'text' column"
    ):
        dm.setup()
    with pytest.raises(ValueError, match=r"data\.conversation_roles\.gpt='bot'"):
        roles = {"human": "user", "gpt": "bot"}
        SFTDataModule(DataConfig(source=str(bad), conversation_roles=roles), str(smollm2_dir))
