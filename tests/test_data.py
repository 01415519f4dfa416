"""Tests for src/data: corpora, synthetic examples, tokenisation, step-window sampling and the DataModule."""

import os

# Offline before any Hugging Face import (tests/conftest.py may already have set these).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")

import json
import re

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from src.config.schemas import typed
from src.data.config import DataConfig
from src.data.corpora import lee_articles, lee_heldout_articles, shakespeare_plays, strip_gutenberg
from src.data.datamodule import SFTDataModule
from src.data.sampler import (
    MicroBatchKey,
    StepBatchSampler,
    StepDataset,
    collate,
    example_lengths,
    example_supervised,
)
from src.data.sft import (
    IGNORE_INDEX,
    supervised_count,
    tokenize_dataset,
    tokenize_example,
    tokenize_text,
)
from src.data.synthetic import TASKS, make_instruction_examples, split_sentences
from src.utils.errors import ConfigError

# ---------------------------------------------------------------------------- fixtures
# `smollm2_dir` (the converted embedded model, session-scoped) comes from tests/conftest.py.


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def supervised_text(tokenizer, example):
    ids = [
        i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX
    ]
    return tokenizer.decode(ids)


# ---------------------------------------------------------------------------- corpora


def test_lee_corpora_sizes_and_disjoint():
    background, heldout = lee_articles(), lee_heldout_articles()
    assert len(background) == 300 and len(heldout) == 50
    assert background[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert not set(background) & set(heldout)


def test_shakespeare_selection_and_headers():
    plays = shakespeare_plays()
    assert len(plays) == 42
    hamlet, macbeth = shakespeare_plays(["hamlet", "macbeth"])
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    assert macbeth.startswith("MACBETH")
    assert len(shakespeare_plays(max_plays=3)) == 3
    assert not any("Project Gutenberg" in p for p in plays)
    with pytest.raises(FileNotFoundError, match="no_such_play"):
        shakespeare_plays(["no_such_play"])


def test_strip_gutenberg_markers():
    raw = (
        "Licence blah\n*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nThe play.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nMore licence"
    )
    assert strip_gutenberg(raw) == "The play."
    assert strip_gutenberg("  no markers here \n") == "no markers here"


# ---------------------------------------------------------------------------- synthetic


def test_split_sentences():
    text = 'Mr. Smith went to the U.S. on Jan. 5. He said "Hello." Then J. Bloggs left! 20 people died. Why?'
    assert split_sentences(text) == [
        "Mr. Smith went to the U.S. on Jan. 5.",
        'He said "Hello."',
        "Then J. Bloggs left!",
        "20 people died.",
        "Why?",
    ]


def test_synthetic_deterministic_and_seed_dependent():
    a, b = make_instruction_examples(60, seed=3), make_instruction_examples(60, seed=3)
    assert a == b
    assert make_instruction_examples(60, seed=4) != a
    assert {row["task"] for row in make_instruction_examples(200, seed=0)} == set(TASKS)


def test_synthetic_task_subset_and_errors(smollm2_dir):
    rows = make_instruction_examples(120, seed=5, tasks=["copy", "continue"])
    assert {row["task"] for row in rows} == {"copy", "continue"}
    # None is every task, drawn exactly as before the option existed (the default data is unchanged)
    assert make_instruction_examples(50, seed=5, tasks=None) == make_instruction_examples(50, seed=5)
    assert make_instruction_examples(50, seed=5, tasks=list(TASKS)) == make_instruction_examples(50, seed=5)
    for bad, match in (
        (["copy", "divide"], r"data\.synthetic_tasks: unknown task\(s\) \['divide'\]"),
        ([], r"data\.synthetic_tasks must be a non-empty list"),
    ):
        with pytest.raises(ValueError, match=match):
            make_instruction_examples(5, seed=0, tasks=bad)
        with pytest.raises(ValueError, match=match):  # refused by the data module before any tokenising
            SFTDataModule(DataConfig(synthetic_tasks=bad), str(smollm2_dir))
    with pytest.raises(ConfigError, match=r"data\.synthetic_tasks: .*not a ListConfig"):  # a name, not a list
        typed({"synthetic_tasks": "copy"}, DataConfig, "data")


def test_synthetic_max_digits_caps_operands(smollm2_dir):
    rows = make_instruction_examples(300, seed=2, tasks=["addition", "multiplication"], max_digits=2)
    operands = []
    for row in rows:
        a, op, b, _, result = row["messages"][1]["content"].split()
        assert int(result) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        operands += [int(a), int(b)]
    assert max(operands) <= 99 and max(operands) >= 10  # capped, and two-digit operands do occur
    uncapped = make_instruction_examples(300, seed=2, tasks=["addition"])
    assert max(int(r["messages"][1]["content"].split()[0]) for r in uncapped) >= 1000
    assert make_instruction_examples(40, seed=2, max_digits=None) == make_instruction_examples(40, seed=2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"data\.synthetic_max_digits must be an integer >= 1 or null"):
            make_instruction_examples(5, seed=0, max_digits=bad)
        with pytest.raises(ValueError, match=r"data\.synthetic_max_digits must be an integer >= 1 or null"):
            SFTDataModule(DataConfig(synthetic_max_digits=bad), str(smollm2_dir))
    for bad in (True, 1.5):  # not an integer: refused by the schema, naming the key
        with pytest.raises(ConfigError, match=r"data\.synthetic_max_digits: .*converted to Integer"):
            typed({"synthetic_max_digits": bad}, DataConfig, "data")


def test_synthetic_answers_are_correct():
    articles = [split_sentences(t) for t in lee_articles()]
    for row in make_instruction_examples(300, seed=1):
        user, assistant = (m["content"] for m in row["messages"])
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert user.strip() and assistant.strip()
        task = row["task"]
        if task in ("addition", "multiplication"):
            a, op, b, _, result = assistant.split()
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) * int(b))
            assert a in user and b in user
        elif task == "repeat":
            phrase, times = re.search(r'"(.+)".*?(\d+) times', user).groups()
            assert assistant == ", ".join([phrase] * int(times))
        elif task == "copy":
            assert user.endswith("\n\n" + assistant)
        elif task == "summarize":  # extractive: the article's lead sentence, which the excerpt starts with
            excerpt = user.split("\n\n", 1)[1]
            assert excerpt.startswith(assistant) and any(a[0] == assistant for a in articles)
        elif task == "continue":  # the target is what follows the context in the same article
            context = user.split("\n\n", 1)[1]
            assert any(" ".join(a).startswith(context + " " + assistant) for a in articles)


# ---------------------------------------------------------------------------- tokenisation


def test_chat_template_ids_match_tokenize_true(tokenizer):
    row = chat("What is 2 + 2?", "2 + 2 = 4")
    example = tokenize_example(tokenizer, row, max_length=512)
    direct = tokenizer.apply_chat_template(row["messages"], tokenize=True)
    direct = direct["input_ids"] if hasattr(direct, "keys") else direct
    assert example["input_ids"] == list(direct)
    # One <|im_start|> per turn (system, user, assistant): the template's own, no extra BOS.
    assert example["input_ids"].count(tokenizer.bos_token_id) == 3
    assert example["labels"] == example["input_ids"]  # loss_on="all"


def test_assistant_masking_labels_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Copy: the cat sat."},
        {"role": "assistant", "content": "the cat sat."},
        {"role": "user", "content": "Now say hello twice."},
        {"role": "assistant", "content": "hello, hello"},
    ]
    example = tokenize_example(tokenizer, {"messages": messages}, max_length=512, loss_on="assistant")
    ids, labels = example["input_ids"], example["labels"]
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    # Two contiguous runs, one per assistant turn, each = content + end-of-turn tokens.
    runs = [[supervised[0]]]
    for position in supervised[1:]:
        runs[-1].append(position) if position == runs[-1][-1] + 1 else runs.append([position])
    decoded = [tokenizer.decode([ids[p] for p in run]) for run in runs]
    assert decoded == ["the cat sat.<|im_end|>\n", "hello, hello<|im_end|>\n"]
    assert all(labels[p] == ids[p] for p in supervised)
    assert supervised_count(labels) == len(supervised)


def test_assistant_masking_survives_bpe_merge_at_boundary(tokenizer):
    # The template's "assistant\n" + an answer starting with "\n\n" tokenise as "assistant", "\n\n", "\n", ...:
    # the prompt's last token is merged away, so the boundary moves back and the merged token is supervised.
    example = tokenize_example(tokenizer, chat("Hi", "\n\nHello there"), max_length=512, loss_on="assistant")
    assert supervised_text(tokenizer, example) == "\n\n\nHello there<|im_end|>\n"


def test_non_prefix_stable_template_raises(tokenizer):
    class CountingTemplate:  # renders the number of messages first, so prefixes are not prefixes
        eos_token_id = tokenizer.eos_token_id

        def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
            return f"{len(messages)}:" + tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )

        def __call__(self, text, add_special_tokens):
            return tokenizer(text, add_special_tokens=add_special_tokens)

    with pytest.raises(ValueError, match="not prefix-stable"):
        tokenize_example(CountingTemplate(), chat("a", "b"), 512, loss_on="assistant")
    assert tokenize_example(CountingTemplate(), chat("a", "b"), 512, loss_on="all") is not None


def test_too_long_rows_are_filtered_not_truncated(tokenizer):
    row = chat("word " * 100, "ok")
    length = len(tokenize_example(tokenizer, row, max_length=10_000)["input_ids"])
    assert tokenize_example(tokenizer, row, max_length=length - 1) is None
    assert len(tokenize_example(tokenizer, row, max_length=length)["input_ids"]) == length


def test_text_rows_are_chunked(tokenizer):
    text = lee_articles()[0]
    blocks = tokenize_text(tokenizer, text, max_length=64)
    full = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for b in blocks for t in b["input_ids"]] == full[: sum(len(b["input_ids"]) for b in blocks)]
    assert all(len(b["input_ids"]) == 64 for b in blocks[:-1]) and 2 <= len(blocks[-1]["input_ids"]) <= 64
    assert len(full) - sum(len(b["input_ids"]) for b in blocks) <= 1  # only a 1-token tail may be dropped
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert tokenize_text(tokenizer, "   ", 64) == []


def test_tokenize_dataset_counts(tokenizer):
    rows = [
        chat("short", "answer"),
        chat("long " * 300, "answer"),
        {"messages": []},
        {"messages": [{"role": "user", "content": "question without answer"}]},
        {"text": ""},
        {"text": "A plain document. " * 40},
    ]
    examples, report = tokenize_dataset(tokenizer, rows, max_length=128, loss_on="assistant", source="unit")
    # 1 chat + the text row in 2 blocks; the answerless row has nothing to supervise under loss_on=assistant.
    assert (report.kept, report.dropped_too_long, report.dropped_empty) == (3, 1, 3)
    assert len(examples) == 3
    assert str(report) == "unit: kept 3 of 7 examples (dropped 1 longer than max_length, 3 empty)"
    _, report_all = tokenize_dataset(tokenizer, rows, max_length=128, loss_on="all")
    assert (report_all.kept, report_all.dropped_empty) == (4, 2)


def test_tokenize_dataset_errors(tokenizer):
    with pytest.raises(
        ValueError, match=r"my.jsonl: row 1 has neither a 'messages' nor a 'text' column.*prompt"
    ):
        tokenize_dataset(tokenizer, [chat("a", "b"), {"prompt": "x"}], 64, source="my.jsonl")
    with pytest.raises(ValueError, match=r"src: no examples left after filtering .*dropped 2 longer"):
        tokenize_dataset(tokenizer, [chat("x " * 100, "y")] * 2, 16, source="src")
    with pytest.raises(ValueError, match="loss_on"):
        tokenize_dataset(tokenizer, [chat("a", "b")], 64, loss_on="prompt")


# ---------------------------------------------------------------------------- sampler


def fake_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 40, (n,), generator=g).tolist()
    supervised = [int(torch.randint(0, length, (1,), generator=g)) for length in lengths]
    return lengths, supervised


def keys_of(sampler):
    return list(iter(sampler))


def test_sampler_denominators_reproduce_global_counts():
    lengths, supervised = fake_data(48)
    sampler = StepBatchSampler(lengths, supervised, micro_batch_size=3, accumulate=2, world_size=2, seed=5)
    keys = sampler.epoch_keys()
    assert len(keys) == 48 // 3 and sorted(i for k in keys for i in k.indices) == list(range(48))
    per_window = 2 * 2
    for w in range(0, len(keys), per_window):
        window = keys[w : w + per_window]
        members = [i for k in window for i in k.indices]
        assert {k.lm_denom for k in window} == {sum(supervised[i] for i in members) / per_window}
        assert {k.tok_denom for k in window} == {sum(lengths[i] for i in members) / per_window}
    assert sum(k.lm_denom for k in keys) == pytest.approx(sum(supervised))
    assert sum(k.tok_denom for k in keys) == pytest.approx(sum(lengths))


def test_sampler_windows_independent_of_accumulation_split():
    lengths, supervised = fake_data(40)
    a = StepBatchSampler(lengths, supervised, micro_batch_size=4, accumulate=1, seed=7)
    b = StepBatchSampler(lengths, supervised, micro_batch_size=2, accumulate=2, seed=7)
    assert len(a) == 10 and len(b) == 20
    for key, (first, second) in zip(keys_of(a), zip(*[iter(keys_of(b))] * 2, strict=True), strict=True):
        assert key.indices == first.indices + second.indices
        assert key.lm_denom == pytest.approx(2 * first.lm_denom) and first.lm_denom == second.lm_denom
        assert key.tok_denom == pytest.approx(2 * first.tok_denom) and first.tok_denom == second.tok_denom


def _window_gradient(per_token, weights, keys_by_rank, accumulate):
    """Gradient of a toy loss as Lightning + DDP would accumulate it from the sampler's keys.

    The "model" is a weight vector w; example i's token losses are w · per_token[i][t] for its supervised
    tokens. Each micro-batch's loss is summed / lm_denom, Lightning divides it by `accumulate`, and DDP
    averages the ranks' gradients.
    """
    grads = []
    for keys in keys_by_rank:
        w = weights.clone().requires_grad_(True)
        for key in keys:
            summed = sum((per_token[i] @ w).sum() for i in key.indices)
            (summed / key.lm_denom / accumulate).backward()
        grads.append(w.grad)
    return torch.stack(grads).mean(0)


@pytest.mark.parametrize(
    ("micro", "accumulate", "world"), [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)]
)
def test_sampler_gradient_is_exact_global_mean(micro, accumulate, world):
    n = 8  # one window of 8 examples for every split above, times 2 windows
    lengths, supervised = fake_data(2 * n, seed=1)
    g = torch.Generator().manual_seed(2)
    per_token = [torch.randn(s, 3, generator=g, dtype=torch.float64) for s in supervised]
    weights = torch.randn(3, dtype=torch.float64, generator=g)
    samplers = [
        StepBatchSampler(
            lengths,
            supervised,
            micro_batch_size=2 * micro,
            accumulate=accumulate,
            world_size=world,
            rank=r,
            seed=3,
        )
        for r in range(world)
    ]
    steps = [keys_of(s) for s in samplers]
    assert len({len(s) for s in steps}) == 1
    for step in range(len(steps[0]) // accumulate):
        window_keys = [keys[step * accumulate : (step + 1) * accumulate] for keys in steps]
        members = [i for keys in window_keys for k in keys for i in k.indices]
        expected = torch.cat([per_token[i] for i in members]).mean(0)  # d/dw of the window's token mean
        got = _window_gradient(per_token, weights, window_keys, accumulate)
        torch.testing.assert_close(got, expected)


def test_sampler_rank_split_is_disjoint_and_covers():
    lengths, supervised = fake_data(36)
    ranks = [
        keys_of(
            StepBatchSampler(
                lengths, supervised, micro_batch_size=3, accumulate=2, world_size=2, rank=r, seed=1
            )
        )
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 6
    seen = [[i for k in keys for i in k.indices] for keys in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(36))
    # Same window order on both ranks: step s of each rank comes from the same window, with equal normalisers.
    assert [k.lm_denom for k in ranks[0]] == [k.lm_denom for k in ranks[1]]


def test_sampler_drops_incomplete_window_and_len_matches():
    lengths, supervised = fake_data(23)
    for micro, accumulate, world in [(2, 2, 1), (3, 1, 2), (1, 4, 2), (5, 1, 1)]:
        sampler = StepBatchSampler(lengths, supervised, micro, accumulate=accumulate, world_size=world)
        keys = keys_of(sampler)
        assert len(keys) == len(sampler) == (23 // (micro * accumulate * world)) * accumulate
        assert all(len(k.indices) == micro for k in keys)


def test_sampler_keep_last_pads_ranks_evenly():
    lengths, supervised = fake_data(9)
    ranks = [
        keys_of(StepBatchSampler(lengths, supervised, 2, accumulate=2, world_size=2, rank=r, drop_last=False))
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 4  # one full window of 8, one wrapped tail window
    assert set(i for keys in ranks for k in keys for i in k.indices) == set(range(9))
    single = StepBatchSampler(lengths, supervised, 4, shuffle=False, drop_last=False)
    assert [k.indices for k in keys_of(single)] == [(0, 1, 2, 3), (4, 5, 6, 7), (8,)]
    assert [k.lm_denom for k in keys_of(single)] == [float(sum(supervised[i : i + 4])) for i in (0, 4, 8)]


def test_sampler_set_start_is_one_shot():
    lengths, supervised = fake_data(32)
    sampler = StepBatchSampler(lengths, supervised, 2, accumulate=2, seed=9)
    sampler.set_epoch(3)
    full = keys_of(sampler)
    sampler.set_start(5)
    assert keys_of(sampler) == full[5:]
    assert len(sampler) == len(full)  # the epoch length Lightning sees is unchanged
    assert keys_of(sampler) == full
    with pytest.raises(ValueError):
        sampler.set_start(len(full) + 1)


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths, supervised = fake_data(32)

    def order(seed, epoch=0, shuffle=True):
        sampler = StepBatchSampler(lengths, supervised, 4, seed=seed, shuffle=shuffle)
        sampler.set_epoch(epoch)
        return [k.indices for k in keys_of(sampler)]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert order(1, epoch=0) != order(1, epoch=1) == order(1, epoch=1)
    assert order(1, shuffle=False) == [tuple(range(i, i + 4)) for i in range(0, 32, 4)]


def test_sampler_is_a_distributed_sampler_for_lightning():
    # Lightning only leaves a DistributedSampler in place; anything else it would shard a second time.
    lengths, supervised = fake_data(8)
    assert isinstance(StepBatchSampler(lengths, supervised, 2), DistributedSampler)
    with pytest.raises(ValueError):
        StepBatchSampler(lengths, supervised, 2, world_size=2, rank=2)


def test_collate_pads_right_and_masks_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate(examples, pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_step_dataset_through_dataloader():
    examples = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (3, 5, 2, 4)]
    sampler = StepBatchSampler(example_lengths(examples), example_supervised(examples), 2, shuffle=False)
    batches = list(DataLoader(StepDataset(examples, pad_id=0), sampler=sampler, batch_size=None))
    assert [b["input_ids"].shape for b in batches] == [(2, 5), (2, 4)]
    assert batches[0]["lm_denom"].shape == () and batches[0]["lm_denom"].dtype == torch.float32
    assert float(batches[0]["lm_denom"]) == (2 + 4) and float(batches[1]["tok_denom"]) == (2 + 4)
    assert isinstance(sampler.epoch_keys()[0], MicroBatchKey)


# ---------------------------------------------------------------------------- datamodule


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def chat_file(tmp_path):
    rows = [chat(f"Question {i}?", f"Answer number {i}.") for i in range(40)]
    rows += [chat("long " * 200, "too long")] * 2
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def test_datamodule_on_jsonl(smollm2_dir, chat_file):
    data = DataConfig(
        source=str(chat_file),
        max_length=64,
        loss_on="assistant",
        micro_batch_size=2,
        val_fraction=0.1,
        seed=0,
    )
    dm = SFTDataModule(data, str(smollm2_dir), accumulate_grad_batches=2)
    dm.setup("fit")
    train, val = dm.filter_report["train"], dm.filter_report["val"]
    assert train.total + val.total == 42 and val.total == 5  # ceil(0.1 * 42) rows held out
    assert train.dropped_too_long + val.dropped_too_long == 2
    assert dm.tokenizer is not None and dm.tokenizer.pad_token_id == 2
    loader = dm.train_dataloader()
    assert len(loader) == (train.kept // 4) * 2
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "lm_denom", "tok_denom"}
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 64
    text = dm.tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])
    assert re.fullmatch(r"Answer number \d+\.<\|im_end\|>\n", text)
    val_batches = list(dm.val_dataloader())
    assert sum(b["input_ids"].shape[0] for b in val_batches) == val.kept
    assert [float(b["lm_denom"]) for b in val_batches] == [
        float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in val_batches
    ]


def test_datamodule_max_train_examples_and_no_val(smollm2_dir, chat_file):
    data = DataConfig(
        source=str(chat_file), max_length=512, val_fraction=0.0, max_train_examples=10, micro_batch_size=3
    )
    dm = SFTDataModule(data, str(smollm2_dir))
    dm.setup()
    assert dm.filter_report["train"].kept == 10 and "val" not in dm.filter_report
    assert dm.val_dataloader() == [] and len(dm.train_dataloader()) == 3


def test_datamodule_txt_source_and_lee_heldout(smollm2_dir, tmp_path):
    path = tmp_path / "plays.txt"
    path.write_text(
        "To be, or not to be, that is the question.\n\nWhether 'tis nobler in the mind to suffer.\n"
    )
    data = DataConfig(source=str(path), val_source="lee_heldout", max_length=128, micro_batch_size=1)
    dm = SFTDataModule(data, str(smollm2_dir))
    dm.setup()
    report = dm.filter_report["train"]
    assert (report.kept, report.dropped_empty) == (2, 1)  # one row per line; the blank line is empty
    assert dm.tokenizer.decode(dm.train_examples[0]["input_ids"]) == (
        "To be, or not to be, that is the question.<|im_end|>"
    )
    assert dm.filter_report["val"].kept >= 50  # 50 articles, long ones in several 128-token blocks


def test_datamodule_builtin(smollm2_dir):
    dm = SFTDataModule(DataConfig(n_synthetic=40, max_length=256, val_fraction=0.1), str(smollm2_dir))
    dm.setup()
    n_rows = dm.filter_report["train"].total + dm.filter_report["val"].total
    assert n_rows >= 340  # 40 chat rows + 300 articles, some articles split into several blocks
    assert sum("messages" in r for r in make_instruction_examples(40, 42)) == 40


def test_datamodule_validates_settings(smollm2_dir, tmp_path):
    def module(**kw):
        return SFTDataModule(DataConfig(**kw), str(smollm2_dir))

    with pytest.raises(ValueError, match="data.loss_on"):
        module(loss_on="prompt")
    with pytest.raises(ValueError, match="data.max_length"):
        module(max_length=4)
    with pytest.raises(ValueError, match="data.val_fraction"):
        module(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"data.source=.*missing.jsonl.*does not exist"):
        module(source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="data.val_source"):
        module(val_source="nope.jsonl")


def test_datamodule_missing_column_and_empty(smollm2_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y"}] * 3)
    with pytest.raises(ValueError, match=r"bad.jsonl.*'messages' or a 'text' column.*completion"):
        SFTDataModule(DataConfig(source=str(bad)), str(smollm2_dir)).setup()
    long_rows = write_jsonl(tmp_path / "long.jsonl", [chat("long " * 50, "x")] * 4)
    with pytest.raises(ValueError, match=r"long.jsonl \(train\): no examples left.*dropped 3 longer"):
        data = DataConfig(source=str(long_rows), max_length=16, val_fraction=0.25)
        SFTDataModule(data, str(smollm2_dir)).setup()


def test_datamodule_hub_source_error_names_setting(smollm2_dir):
    dm = SFTDataModule(DataConfig(source="allenai/tulu-3-sft-mixture"), str(smollm2_dir))
    with pytest.raises(RuntimeError, match=r"data.source='allenai/tulu-3-sft-mixture'.*network"):
        dm.setup()
