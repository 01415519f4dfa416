"""Data errors name the source file and the row as numbered in that file (not a position after shuffling or
splitting), in one clear ValueError; chat content given as a list of parts trains on its joined text."""

import json
import re

import pytest

from src.data.config import DataConfig
from src.data.datamodule import SFTDataModule
from src.data.sft import tokenize_dataset, tokenize_example


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def parts(*texts):
    return [{"type": "text", "text": t} for t in texts]


def write_lines(path, rows):
    """One JSON row per line; a string row is written verbatim (blank lines, broken JSON)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def module(smollm2_dir, path, **kw):
    return SFTDataModule(DataConfig(source=str(path), max_length=256, **kw), str(smollm2_dir))


def test_list_of_text_parts_equals_the_joined_string(tokenizer, smollm2_dir, tmp_path):
    plain = chat("What is 2 + 3?", "It is 5.")
    parted = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": parts("What is ", "2 + 3?")},
            {"role": "assistant", "content": ["It is ", {"text": "5."}]},  # plain strings, type-less text
        ]
    }
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, *plain["messages"]]}
    for loss_on in ("all", "assistant"):
        a = tokenize_example(tokenizer, parted, 256, loss_on=loss_on)
        b = tokenize_example(tokenizer, with_system, 256, loss_on=loss_on)
        assert a == b and a is not None
    path = write_lines(tmp_path / "parts.jsonl", [parted] * 5 + [with_system] * 5)
    dm = module(smollm2_dir, path, val_fraction=0.0)
    dm.setup()
    assert dm.filter_report["train"].kept == 10
    assert len({tuple(e["input_ids"]) for e in dm.train_examples}) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_non_text_part_names_file_line_and_part_type(smollm2_dir, tmp_path, seed):
    rows = [chat(f"q{i}", f"a{i}") for i in range(30)]
    bad = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": "x"}],
            },
            {"role": "assistant", "content": "ok"},
        ]
    }
    lines = rows[:10] + [""] + rows[10:20] + [bad] + rows[20:]  # blank line 11: the bad row is line 22
    path = write_lines(tmp_path / "mm.jsonl", lines)
    with pytest.raises(ValueError) as info:  # shuffled and split: the row is still named by its line
        module(smollm2_dir, path, val_fraction=0.2, seed=seed).setup()
    message = str(info.value)
    assert message.startswith(f"data.source={path} line 22: message 0: content part 1 has type 'image_url'")


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({"messages": ["hello", "hi"]}, r"message 0 is a str \('hello'\), expected an object"),
        ({"messages": [{"role": "human", "content": "hi"}]}, r"message 0 has role 'human'; allowed roles"),
        ({"messages": [{"content": "hi"}]}, r"message 0 has role None"),
        ({"messages": "hello"}, r"'messages' must be a list"),
        ({"messages": [{"role": "user", "content": 5}]}, r"message 0: content must be a string or a list"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            r"message 0: content part 0 is a text part without a string 'text'",
        ),
        ({"text": ["a", "b"]}, r"'text' must be a string"),
    ],
)
def test_malformed_rows_name_file_and_line(smollm2_dir, tmp_path, row, pattern):
    path = write_lines(tmp_path / "rows.jsonl", [chat("a", "b"), chat("c", "d"), row, chat("e", "f")])
    with pytest.raises(ValueError, match=re.escape(f"data.source={path} line 3") + ": " + pattern):
        module(smollm2_dir, path, val_fraction=0.0).setup()


def test_malformed_row_in_validation_source_and_json_array(smollm2_dir, tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [chat("a", "b")] * 4)
    val = tmp_path / "val.json"
    val.write_text(json.dumps([chat("a", "b"), {"messages": [{"role": "robot", "content": "x"}]}]))
    with pytest.raises(
        ValueError, match=re.escape(f"data.val_source={val} row 2: message 0 has role 'robot'")
    ):
        module(smollm2_dir, train, val_source=str(val)).setup()


def test_parquet_and_txt_rows_are_numbered_in_their_file(smollm2_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["one", "two", "three"], "messages": [None, None, "oops"]}), path)
    with pytest.raises(ValueError, match=re.escape(f"data.source={path} row 3: 'messages' must be a list")):
        module(smollm2_dir, path, val_fraction=0.0).setup()
    txt = tmp_path / "lines.txt"
    txt.write_text("first line\n\nthird line\n")
    dm = module(smollm2_dir, txt, val_fraction=0.0)
    dm.setup()
    assert (dm.filter_report["train"].kept, dm.filter_report["train"].dropped_empty) == (2, 1)


def test_empty_and_broken_files(smollm2_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=re.escape(f"data.source={empty}: no rows in {empty}")):
        module(smollm2_dir, empty).setup()
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no rows"):
        module(smollm2_dir, blank).setup()
    broken = write_lines(tmp_path / "broken.jsonl", [chat("a", "b"), '{"messages": [', chat("c", "d")])
    with pytest.raises(ValueError, match=re.escape(f"data.source={broken} line 2: invalid JSON")):
        module(smollm2_dir, broken).setup()
    arrays = write_lines(tmp_path / "arrays.jsonl", [chat("a", "b"), ["not", "an", "object"]])
    with pytest.raises(ValueError, match=re.escape(f"data.source={arrays} line 2: expected an object")):
        module(smollm2_dir, arrays).setup()


def test_local_data_without_source_is_refused(smollm2_dir):
    from src.config.commands import TrainCommand
    from src.config.schemas import load
    from tests.helpers.configs import compose_tiny

    data = load(compose_tiny("train", ["data=local"]), TrainCommand).data
    with pytest.raises(ValueError, match=r"data.source is required.*data=local"):
        SFTDataModule(data, tokenizer_path=str(smollm2_dir))


def test_row_names_default_and_given(tokenizer):
    rows = [chat("a", "b"), {"messages": [{"role": "x", "content": "y"}]}]
    with pytest.raises(ValueError, match=r"^src: row 1: message 0 has role 'x'"):
        tokenize_dataset(tokenizer, rows, 64, source="src")
    with pytest.raises(ValueError, match=r"^f.jsonl line 9: message 0 has role 'x'"):
        tokenize_dataset(tokenizer, rows, 64, source="src", row_names=["f.jsonl line 4", "f.jsonl line 9"])
