"""The `data` config group (conf/data/*.yaml; conf/data/builtin.yaml documents each key) as a typed schema:
the settings `SFTDataModule` (src/data/datamodule.py, which checks the values that need its sources) is
built from, its counts, whether its sources can be reached without loading them, and its length against a
model's position window.

    data = DataConfig(source="builtin").validate()
    data.access_problems()                   # [] or one message per unreachable file / hub dataset
    SFTDataModule(data, tokenizer_path=...)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.hub import datasets_offline, hub_access_message, hub_dataset_cached, looks_like_path
from ..utils.errors import check_count

NAMED_SOURCES = ("builtin", "mixture", "lee_heldout")  # generated or shipped: nothing to reach
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv")


@dataclass
class DataConfig:
    """SFTDataModule's settings (conf/data/builtin.yaml describes each too).

    Attributes:
        source: ``builtin``, ``mixture``, a local file or directory, or a hub dataset name
            (src/data/datamodule.py's module docstring); null is refused by the data module (data=local).
        hub_split: Split of a hub dataset.
        max_length: Longest sequence; longer chat rows are dropped, text rows are chunked.
        loss_on: ``all`` (every token, the paper's setting) or ``assistant`` (assistant turns only).
        micro_batch_size: Examples per micro-batch (per rank).
        val_fraction: Fraction of the source rows held out for validation when ``val_source`` is null.
        val_source: null (split the source), ``lee_heldout`` (the 50 ``lee.cor`` articles as text) or a
            local file or directory.
        max_train_examples: Use at most this many training rows (a random subset; counted before tokenising).
        n_synthetic: Number of synthetic instruction examples in the ``builtin`` source (and the mixture's
            ``instructions`` source).
        synthetic_tasks: Which synthetic tasks those examples draw from (`src.data.synthetic.TASKS`); null is
            all of them.
        synthetic_max_digits: Cap on the arithmetic operands' digits in those examples; null keeps the
            generator's ranges.
        seed: Seed for the validation split, the subset, the mixture draw and the per-epoch shuffles.
        num_workers: DataLoader workers (collation happens in the workers).
        shuffle: Shuffle training examples each epoch.
        mixture: ``data.source=mixture``: per-source weights (src/data/mixture.py TRAIN_SOURCES).
        mixture_examples: Training examples drawn for the mixture.
        heldout: Held-out evaluation sets (src/data/mixture.py HELDOUT_SETS); evaluation text only.
        conversation_roles: ShareGPT ``from`` value -> chat role (or null: drop the turn) for
            ``conversations`` rows; the default is the released mapping (human -> user, gpt -> assistant,
            others dropped).
    """

    source: str | None = "builtin"
    hub_split: str = "train"
    max_length: int = 128
    loss_on: str = "all"
    micro_batch_size: int = 4
    val_fraction: float = 0.05
    val_source: str | None = None
    max_train_examples: int | None = None
    n_synthetic: int = 2000
    synthetic_tasks: list[str] | None = None
    synthetic_max_digits: int | None = None
    seed: int = 42
    num_workers: int = 0
    shuffle: bool = True
    mixture: dict[str, float] | None = None
    mixture_examples: int = 20000
    heldout: list[str] = field(default_factory=lambda: ["lee"])
    conversation_roles: dict[str, str | None] = field(
        default_factory=lambda: {"human": "user", "gpt": "assistant"}
    )

    def validate(self) -> DataConfig:
        """The counts and sizes, each a whole number in its range (>= 1 where 0 means nothing to do, null
        only where it means "all"); ConfigError naming `data.<key>`. Returns self."""
        counts = (("max_length", 8, False), ("micro_batch_size", 1, False), ("max_train_examples", 1, True),
                  ("n_synthetic", 1, False), ("mixture_examples", 1, False), ("num_workers", 0, False))  # fmt: skip
        for key, low, nullable in counts:
            check_count(f"data.{key}", getattr(self, key), low, nullable)
        return self

    def access_problems(self) -> list[str]:
        """`source` / `val_source` that cannot be reached without loading them: a local file or folder that
        does not exist, a hub dataset that is not cached while the hub is offline."""
        problems = []
        for key in ("source", "val_source"):
            source = getattr(self, key)
            if source in (None, "", *NAMED_SOURCES):
                continue
            path = Path(source).expanduser()
            if path.exists():
                continue
            if looks_like_path(source) or path.suffix in FILE_SUFFIXES:
                problems.append(f"data.{key}={source!r}: no such file or folder ({path.resolve()})")
            elif datasets_offline() and not hub_dataset_cached(source):
                problems.append(hub_access_message(f"data.{key}", source, "dataset"))
        return problems

    def window_problems(self, window: Any) -> list[str]:
        """`max_length` against the model's position window (`max_position_embeddings`; None or not a
        number: unknown, not checked): rows longer than the window would be trained on positions the model
        never learned."""
        if isinstance(window, int) and self.max_length > window:
            return [
                f"data.max_length={self.max_length} exceeds the model's position window "
                f"(max_position_embeddings={window}); set data.max_length <= {window}"
            ]
        return []


__all__ = ["DataConfig"]
