"""The `data` config group (conf/data/*.yaml; conf/data/builtin.yaml documents each key) as a typed schema:
the keyword arguments of `SFTDataModule` (src/data/datamodule.py, which checks the values that need its
sources), its counts, whether its sources can be reached without loading them, and its length against a
model's position window.

    data = DataConfig(source="builtin").validate()
    data.access_problems()                   # [] or one message per unreachable file / hub dataset
    SFTDataModule(tokenizer_path=..., **data.to_dict())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..models.hub import datasets_offline, hub_access_message, hub_dataset_cached, looks_like_path
from ..utils.errors import check_count

NAMED_SOURCES = ("builtin", "mixture", "lee_heldout")  # generated or shipped: nothing to reach
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv")


@dataclass
class DataConfig:
    """SFTDataModule's settings (its docstring and conf/data/builtin.yaml describe each)."""

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

    def to_dict(self) -> dict[str, Any]:
        """SFTDataModule's keyword arguments."""
        return asdict(self)

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
