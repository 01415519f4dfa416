"""`SFTDataModule`: rows from a source, tokenised and served in step windows (see `src.data.sampler`).

Sources (``data.source``):

- ``builtin``: fully offline; ``n_synthetic`` synthetic instruction examples (`src.data.synthetic`) plus the 300
  Lee news articles as plain text rows.
- a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.txt`` file, or a directory of them. JSON and Parquet rows
  need a ``messages``, a ShareGPT ``conversations`` or a ``text`` column (`src.data.formats`,
  docs/data-formats.md); a ``.txt`` file gives one text row per line.
- anything else is a Hugging Face hub dataset name (e.g. ``allenai/tulu-3-sft-mixture``), loaded with
  ``datasets.load_dataset(name, split=hub_split)``; this needs network access.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader

from src.data.config import DataConfig
from src.data.corpora import lee_articles, lee_heldout_articles
from src.data.formats import check_roles, has_row_column, normalise_row
from src.data.mixture import check_heldout, check_mixture, draw, mixture_rows
from src.data.sampler import StepBatchSampler, StepDataset, example_lengths, example_supervised
from src.data.sft import LOSS_ON, FilterReport, tokenize_dataset
from src.data.synthetic import check_max_digits, check_tasks, make_instruction_examples
from src.utils.errors import DataError, PreflightError

log = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
VAL_SOURCES = ("lee_heldout",)


class SFTDataModule(L.LightningDataModule):
    """Tokenised SFT data with accumulation-invariant loss normalisers.

    Train batches come from a `StepBatchSampler` (windows of ``micro_batch_size * accumulate_grad_batches *
    world_size`` examples, reshuffled each epoch); validation batches are sequential. Every batch holds
    ``input_ids``, ``attention_mask``, ``labels`` ([B, T] long) and the 0-dim float normalisers ``lm_denom`` and
    ``tok_denom``.

    Args:
        data: The `data` settings (`DataConfig`, src/data/config.py; conf/data/builtin.yaml describes each
            key), typed by the schema; their values are checked here (`_validate`) before any work.
        tokenizer_path: Local HF folder (or the embedded model's name) to load the tokenizer from.
        accumulate_grad_batches: Must equal the Trainer's ``accumulate_grad_batches``.
        pad_to_multiple_of: Round padded lengths up to a multiple of this (e.g. 8 on GPUs); None pads to the
            longest example.

    Raises:
        ConfigError / DataError / MixtureError: a value out of range or unknown (naming ``data.<key>``), a
            local source that does not exist.
    """

    def __init__(
        self,
        data: DataConfig,
        tokenizer_path: str,
        accumulate_grad_batches: int = 1,
        pad_to_multiple_of: int | None = None,
    ):
        super().__init__()
        self.data = replace(data)  # a copy: `_validate` normalises it, the caller's settings stay as given
        self.tokenizer_path = tokenizer_path
        self.accumulate_grad_batches, self.pad_to_multiple_of = accumulate_grad_batches, pad_to_multiple_of
        self._validate()
        self.tokenizer = None
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] = []
        self.filter_report: dict[str, FilterReport] = {}
        self.train_sampler: StepBatchSampler | None = None

    # ------------------------------------------------------------------ validation

    def _validate(self) -> None:
        """Reject bad values before any expensive work, naming the config key (the types are the schema's:
        `DataConfig` loaded with `src.config.schemas.load`). Raises ConfigError (counts: `DataConfig.validate`),
        DataError or MixtureError."""
        data = self.data.validate()
        if data.loss_on not in LOSS_ON:
            raise DataError(f"data.loss_on must be one of {LOSS_ON}, got {data.loss_on!r}")
        if not 0 <= data.val_fraction < 1:
            raise DataError(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")
        if self.accumulate_grad_batches < 1:
            raise DataError(f"data.accumulate_grad_batches must be >= 1, got {self.accumulate_grad_batches}")
        if data.synthetic_tasks is not None:
            data.synthetic_tasks = list(check_tasks(data.synthetic_tasks))
        check_max_digits(data.synthetic_max_digits)
        data.conversation_roles = check_roles(data.conversation_roles)
        if not data.source:
            raise DataError(
                f"data.source is required, got {data.source!r}: data=local reads "
                "data.source=<file.jsonl|.json|.parquet|.txt or a folder>; data=builtin needs no file"
            )
        if data.source == "mixture":
            data.mixture = check_mixture(data.mixture)
        check_heldout(data.heldout)
        if data.source not in ("builtin", "mixture") and _looks_local(data.source):
            _check_local(data.source, "data.source")
        if data.val_source is not None and data.val_source not in VAL_SOURCES:
            _check_local(data.val_source, "data.val_source")

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenizer, read the rows, split them and tokenise both splits (once)."""
        if self.train_examples is not None:
            return
        from src.models.tokenizer import open_tokenizer

        self.tokenizer = open_tokenizer(self.tokenizer_path)
        if self.data.source == "mixture":
            self._setup_mixture()
            return
        rows = self._load(self.data.source, "data.source")
        train_ids, val_ids = self._split(len(rows))
        name = f"data.source={self.data.source}"
        self.train_examples = self._tokenize(rows, train_ids, "train", name)
        if self.data.val_source is not None:
            val_rows = self._load(self.data.val_source, "data.val_source")
            val_name = f"data.val_source={self.data.val_source}"
            self.val_examples = self._tokenize(val_rows, range(len(val_rows)), "val", val_name)
        elif val_ids:
            self.val_examples = self._tokenize(rows, val_ids, "val", name)

    def _setup_mixture(self) -> None:
        """Per source: split rows into train/val (`val_fraction`), tokenise, then draw the weighted mixture."""
        by_source, val = {}, []
        for name, weight in self.data.mixture.items():
            if not weight:
                continue
            data = self.data
            rows = mixture_rows(
                name, data.n_synthetic, data.seed, data.synthetic_tasks, data.synthetic_max_digits
            )
            train_ids, val_ids = self._split(len(rows))
            key = f"data.mixture.{name}"
            by_source[name] = self._tokenize(rows, train_ids, "train", key)
            if self.data.val_source is None and val_ids:
                val += self._tokenize(rows, val_ids, "val", key)
        self.train_examples = draw(by_source, self.data.mixture, self.data.mixture_examples, self.data.seed)
        if self.data.max_train_examples is not None:
            self.train_examples = self.train_examples[: self.data.max_train_examples]
        if self.data.val_source is not None:
            val_rows = self._load(self.data.val_source, "data.val_source")
            val = self._tokenize(val_rows, range(len(val_rows)), "val", "data.val_source")
        random.Random(self.data.seed).shuffle(val)  # every source in the first validation batches
        self.val_examples = val

    def _split(self, n: int) -> tuple[list[int], list[int]]:
        """Seeded random split of row indices into train and validation, then the training cap."""
        order = list(range(n))
        random.Random(self.data.seed).shuffle(order)
        n_val = 0
        if self.data.val_source is None and self.data.val_fraction > 0 and n > 1:
            n_val = min(max(1, math.ceil(self.data.val_fraction * n)), n - 1)
        train, val = order[n_val:], order[:n_val]
        return train[: self.data.max_train_examples], val

    def _tokenize(self, rows, ids, split: str, source: str) -> list[dict]:
        """Tokenise ``rows[i] for i in ids``; errors name each row by its origin (file and row in it)."""
        source = f"{source} ({split})"
        ids = list(ids)
        names = [_row_name(rows, i, source) for i in ids]
        data = self.data
        picked = (  # ShareGPT rows -> messages, each named by its origin in errors
            normalise_row(rows[i], data.conversation_roles, name) for i, name in zip(ids, names, strict=True)
        )
        examples, report = tokenize_dataset(
            self.tokenizer, picked, data.max_length, data.loss_on, source=source, row_names=iter(names)
        )
        self.filter_report[split] = report
        _log_info(str(report))
        return examples

    def _load(self, source: str, key: str) -> Sequence[dict]:
        """Rows of a source: a list for the built-in corpora, a ``datasets.Dataset`` otherwise."""
        if source == "builtin":
            data = self.data
            synthetic = make_instruction_examples(
                data.n_synthetic, data.seed, tasks=data.synthetic_tasks, max_digits=data.synthetic_max_digits
            )
            return synthetic + [{"text": article} for article in lee_articles()]
        if source == "lee_heldout":
            return [{"text": article} for article in lee_heldout_articles()]
        if _looks_local(source) or Path(source).expanduser().exists():
            dataset = _load_local(Path(source).expanduser(), key)
        else:
            dataset = _load_hub(source, self.data.hub_split, key)
        _check_columns(dataset.column_names, f"{key}={source}")
        return dataset

    # ------------------------------------------------------------------ loaders

    @property
    def pad_id(self) -> int:
        """Padding id: the tokenizer's pad token, else EOS, else 0 (`src.models.tokenizer.pad_token_id`;
        padding is masked out either way)."""
        from src.models.tokenizer import pad_token_id

        return pad_token_id(self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        """Shuffled step-window micro-batches for this rank."""
        world_size, rank = self._world()
        self.train_sampler = StepBatchSampler(
            example_lengths(self.train_examples),
            example_supervised(self.train_examples),
            micro_batch_size=self.data.micro_batch_size,
            accumulate=self.accumulate_grad_batches,
            world_size=world_size,
            rank=rank,
            seed=self.data.seed,
            shuffle=self.data.shuffle,
        )
        self.train_sampler.start_fn = self._completed_in_epoch
        return self._loader(self.train_examples, self.train_sampler)

    def _completed_in_epoch(self) -> int:
        """Micro-batches of the current epoch already trained (non-zero only when resuming mid-epoch)."""
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)

    def val_dataloader(self) -> DataLoader | list:
        """Sequential micro-batches of the validation set (an empty list when there is none).

        On one rank the normalisers are each batch's own counts. On several ranks a "window" is one batch per
        rank, so the rank-averaged loss is that window's exact per-token mean; the last window is completed
        by wrapping around, so every rank runs the same number of batches.
        """
        if not self.val_examples:
            return []
        world_size, rank = self._world()
        sampler = StepBatchSampler(
            example_lengths(self.val_examples),
            example_supervised(self.val_examples),
            micro_batch_size=self.data.micro_batch_size,
            world_size=world_size,
            rank=rank,
            shuffle=False,
            drop_last=False,
        )
        return self._loader(self.val_examples, sampler)

    def _loader(self, examples: list[dict], sampler: StepBatchSampler) -> DataLoader:
        return DataLoader(
            StepDataset(examples, self.pad_id, self.pad_to_multiple_of),
            sampler=sampler,
            batch_size=None,  # the dataset returns whole micro-batches
            num_workers=self.data.num_workers,
            persistent_workers=self.data.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


# ---------------------------------------------------------------------- helpers


@rank_zero_only
def _log_info(message: str) -> None:
    log.info(message)


def _looks_local(source: str) -> bool:
    """Whether a source string is meant as a local path (hub names have no leading ./~ and no file suffix)."""
    return source.startswith(("/", ".", "~")) or Path(source).suffix in BUILDERS


def _check_local(source: str, key: str) -> None:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{key}={source}: file or directory {path} does not exist")
    if path.is_file() and path.suffix not in BUILDERS:
        raise DataError(
            f"{key}={source}: unsupported file type {path.suffix!r}; use one of {sorted(BUILDERS)}"
        )
    if path.is_dir() and not _data_files(path):
        raise DataError(f"{key}={source}: directory {path} holds no {sorted(BUILDERS)} files")


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in BUILDERS)


class LocalRows(Sequence):
    """Rows of local files in file order, each with its origin: the file and the row as numbered in it.

    Numbering: ``line N`` (from 1) for .jsonl / .txt files and JSON Lines in a .json file, ``row N`` (from 1)
    for the records of a JSON array and for Parquet rows.
    """

    def __init__(self):
        self.rows: list = []
        self.origins: list[str] = []

    def add(self, row, origin: str) -> None:
        self.rows.append(row)
        self.origins.append(origin)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def origin(self, index: int) -> str:
        return self.origins[index]

    @property
    def column_names(self) -> list[str]:
        """Every key that some row (an object) has."""
        return sorted({k for row in self.rows if isinstance(row, dict) for k in row})


def _row_name(rows, index: int, source: str) -> str:
    """How errors name row ``index`` of ``rows``: its file and row in it, else its position in the source."""
    if isinstance(rows, LocalRows):
        return rows.origin(index)
    return f"{source}: row {index}"


def _load_local(path: Path, key: str) -> LocalRows:
    """Read a local file or directory (one file type per directory) into `LocalRows`.

    Raises:
        ValueError: naming the key and file: mixed file types, invalid JSON (with its line), a JSON value
            that is not a list of rows, an unreadable Parquet file, or no rows at all (empty files).
    """
    files = _data_files(path) if path.is_dir() else [path]
    kinds = {BUILDERS[f.suffix] for f in files}
    if len(kinds) != 1:
        raise DataError(f"{key}={path}: mixes file types {sorted(kinds)}; keep one type per directory")
    rows = LocalRows()
    for file in files:
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".txt": _read_txt}
        reader[file.suffix](file, key, rows)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{rows.origin(index)}: expected an object with 'messages' or 'text', got {row!r:.60}"
            )
    if not len(rows):
        names = ", ".join(str(f) for f in files)
        raise DataError(f"{key}={path}: no rows in {names} (empty file); give a file with at least one row")
    return rows


def read_utf8(file: Path, key: str) -> str:
    """The text of a data file, which must be UTF-8 (a leading byte-order mark is accepted and dropped).

    Raises DataError naming `key`, the file and the line of the first byte that is not UTF-8, or saying the
    file is UTF-16/UTF-32 (by its byte-order mark), with what to do."""
    data = file.read_bytes()
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):  # fmt: skip
        if data.startswith(bom):
            raise DataError(f"{key}={file}: the file is {name} (byte-order mark); data files must be UTF-8: "
                            "re-save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")  # fmt: skip
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{key}={file} line {line}: byte 0x{data[error.start]:02x} at offset {error.start} is not UTF-8 "
            "(a latin-1 or Windows-1252 file?); data files must be UTF-8: re-save it as UTF-8 "
            "(e.g. iconv -f latin1 -t UTF-8)"
        ) from None


def _read_jsonl(file: Path, key: str, rows: LocalRows, text: str | None = None) -> None:
    """One JSON value per non-blank line; blank lines are skipped but still counted in the numbering."""
    text = read_utf8(file, key) if text is None else text
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.add(json.loads(line), f"{key}={file} line {number}")
        except json.JSONDecodeError as error:
            raise DataError(f"{key}={file} line {number}: invalid JSON ({error.msg})") from error


def _read_json(file: Path, key: str, rows: LocalRows) -> None:
    """A JSON array of rows, an object of equal-length columns, or JSON Lines in a .json file."""
    text = read_utf8(file, key)
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":
            raise DataError(f"{key}={file} line {error.lineno}: invalid JSON ({error.msg})") from error
        _read_jsonl(file, key, rows, text)  # several values: JSON Lines
        return
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) != 1:
            raise DataError(f"{key}={file}: columns of different lengths {sorted(lengths)}")
        value = [dict(zip(value, values, strict=True)) for values in zip(*value.values(), strict=True)]
    elif isinstance(value, dict):
        value = [value]  # a single row
    if not isinstance(value, list):
        raise DataError(f"{key}={file}: expected a JSON array of rows, got a {type(value).__name__}")
    for number, row in enumerate(value, start=1):
        rows.add(row, f"{key}={file} row {number}")


def _read_parquet(file: Path, key: str, rows: LocalRows) -> None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as error:  # any reader failure: name the file, keep the original as cause
        raise DataError(
            f"{key}={file}: cannot read it as Parquet ({type(error).__name__}: {error})"
        ) from error
    for number, row in enumerate(table.to_pylist(), start=1):
        rows.add(row, f"{key}={file} row {number}")


def _read_txt(file: Path, key: str, rows: LocalRows) -> None:
    """One text row per line (blank lines are empty rows, counted as dropped)."""
    lines = read_utf8(file, key).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start another
    for number, line in enumerate(lines, start=1):
        rows.add({"text": line.rstrip("\r")}, f"{key}={file} line {number}")


def _load_hub(name: str, split: str, key: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # any loader failure: say which setting caused it, keep the original as cause
        raise PreflightError(
            f"{key}={name!r}: could not load it as a Hugging Face hub dataset (split {split!r}); hub datasets "
            "need network access, use data.source=builtin or a local file offline. "
            f"{type(error).__name__}: {error}"
        ) from error


def _check_columns(columns: list[str], source: str) -> None:
    if not has_row_column(columns):
        raise DataError(
            f"{source}: needs a 'conversations' (ShareGPT), a 'messages' or a 'text' column, found {columns}"
        )
