"""Step-window sampling: loss normalisation that does not depend on accumulation or world size.

Averaging the loss per micro-batch and then over micro-batches weights tokens unequally whenever micro-batches
hold different numbers of supervised tokens, so the gradient would change with the micro-batch/accumulation
split. Instead, each optimizer step's examples (a *window* of ``micro_batch_size * accumulate * world_size``
examples) are fixed up front, and every micro-batch carries its window's token counts divided by the number of
micro-batches in the window (``accumulate * world_size``)::

    lm_denom  = window supervised positions / (accumulate * world_size)
    tok_denom = window valid tokens        / (accumulate * world_size)

The training step returns ``summed_loss / lm_denom``. Lightning divides by ``accumulate`` and DDP averages over
``world_size`` ranks, so the accumulated gradient is exactly ``window summed loss / window count``: the global
per-token mean, identical for any split of the same window.

Usage::

    sampler = StepBatchSampler(lengths, supervised, micro_batch_size=2, accumulate=2)
    loader = DataLoader(StepDataset(examples, pad_id), sampler=sampler, batch_size=None)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, DistributedSampler

from src.data.batching import pad_batch
from src.data.sft import IGNORE_INDEX, supervised_count


class MicroBatchKey(NamedTuple):
    """What `StepBatchSampler` yields and `StepDataset` turns into a padded micro-batch."""

    indices: tuple[int, ...]  # example indices, in order
    lm_denom: float  # window supervised positions / micro-batches per window
    tok_denom: float  # window valid tokens / micro-batches per window


def example_lengths(examples: Sequence[dict]) -> list[int]:
    """Valid (non-pad) token count of each tokenised example."""
    return [len(e["input_ids"]) for e in examples]


def example_supervised(examples: Sequence[dict]) -> list[int]:
    """Supervised next-token positions of each example (labels at ``p >= 1`` that are not ignored)."""
    return [supervised_count(e["labels"]) for e in examples]


# Subclassing DistributedSampler is only a marker: Lightning then leaves this sampler in place instead of
# wrapping it in another DistributedSampler, which would shard the already rank-sharded keys a second time.
class StepBatchSampler(DistributedSampler):
    """Yield this rank's micro-batch keys, grouped into optimizer-step windows.

    Per epoch the example indices are permuted (the same permutation on every rank), cut into windows of
    ``micro_batch_size * accumulate * world_size`` examples, and each window into ``accumulate * world_size``
    consecutive micro-batches; rank r takes micro-batches r, r + world_size, ... of each window. With
    ``drop_last=False`` a final partial window is kept and split as evenly as possible (wrapping around to the
    first examples only if it has fewer examples than micro-batches), so every rank still gets the same number
    of micro-batches: DDP and ZeRO-3 need every rank to run the same number of steps.

    Args:
        lengths: Valid token count per example.
        supervised: Supervised position count per example (see `example_supervised`).
        micro_batch_size: Examples per micro-batch.
        accumulate: Gradient-accumulation steps per optimizer step.
        world_size: Number of data-parallel ranks.
        rank: This rank.
        seed: Base seed; epoch e uses ``seed + e``.
        shuffle: Permute examples each epoch (otherwise keep dataset order).
        drop_last: Drop the final incomplete window.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        supervised: Sequence[int],
        micro_batch_size: int,
        accumulate: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if len(lengths) != len(supervised):
            raise ValueError(f"lengths ({len(lengths)}) and supervised ({len(supervised)}) differ in size")
        if min(micro_batch_size, accumulate, world_size) < 1:
            raise ValueError("micro_batch_size, accumulate and world_size must be >= 1")
        super().__init__(range(len(lengths)), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.supervised = torch.as_tensor(supervised, dtype=torch.long)
        self.micro_batch_size, self.accumulate, self.world_size = micro_batch_size, accumulate, world_size
        self.drop_last = drop_last
        self._start = 0
        # Called at each new iteration for the number of micro-batches to skip (mid-epoch resume: the
        # DataModule points it at the trainer's restored batch progress).
        self.start_fn: Callable[[], int] | None = None

    @property
    def micro_batches_per_window(self) -> int:
        return self.accumulate * self.world_size

    @property
    def window_size(self) -> int:
        return self.micro_batch_size * self.micro_batches_per_window

    def __len__(self) -> int:
        """Micro-batches per rank per epoch (unaffected by `set_start`, as Lightning's epoch length must be)."""
        return self._num_windows() * self.accumulate

    def set_start(self, k: int) -> None:
        """Skip the first ``k`` micro-batches of the next iteration only (mid-epoch resume).

        Call it after `set_epoch` and before the DataLoader creates its iterator.
        """
        if not 0 <= k <= len(self):
            raise ValueError(f"start must be in [0, {len(self)}], got {k}")
        self._start = k

    def __iter__(self) -> Iterator[MicroBatchKey]:
        start, self._start = self._start, 0  # one-shot
        if not start and self.start_fn is not None:
            start = int(self.start_fn())
        keys = (key for window in self._windows() for key in self._rank_keys(window))
        for position, key in enumerate(keys):
            if position >= start:
                yield key

    def epoch_keys(self) -> list[MicroBatchKey]:
        """All ranks' keys of the current epoch, window by window (for inspection and tests)."""
        return [key for window in self._windows() for key in self._window_keys(window)]

    def _num_windows(self) -> int:
        full, rest = divmod(len(self.lengths), self.window_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.lengths)))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def _windows(self) -> Iterator[list[int]]:
        order = self._order()
        for w in range(self._num_windows()):
            window = order[w * self.window_size : (w + 1) * self.window_size]
            # A short final window needs at least one example per micro-batch: wrap around to the start.
            while len(window) < self.micro_batches_per_window:
                window += order[: self.micro_batches_per_window - len(window)]
            yield window

    def _window_keys(self, window: list[int]) -> list[MicroBatchKey]:
        """Split a window into its micro-batches, each carrying the window's normalisers."""
        ids = torch.tensor(window)
        parts = self.micro_batches_per_window
        # Clamp so a window without supervised tokens gives 0/1 rather than 0/0.
        lm_denom = max(int(self.supervised[ids].sum()), 1) / parts
        tok_denom = max(int(self.lengths[ids].sum()), 1) / parts
        return [
            MicroBatchKey(tuple(chunk.tolist()), lm_denom, tok_denom)
            for chunk in torch.tensor_split(ids, parts)
        ]

    def _rank_keys(self, window: list[int]) -> list[MicroBatchKey]:
        return self._window_keys(window)[self.rank :: self.world_size]


def collate(
    examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Args:
        examples: ``{"input_ids": list[int], "labels": list[int]}`` dicts.
        pad_id: Token id written into padding positions (masked out by ``attention_mask`` and labels).
        pad_to_multiple_of: Round the padded length up to a multiple of this (e.g. 8 for tensor cores).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` as long tensors of shape [B, T]; labels are
        ``IGNORE_INDEX`` on padding.
    """
    width = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], pad_id, "right", width)
    labels, _ = pad_batch([e["labels"] for e in examples], IGNORE_INDEX, "right", width)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class StepDataset(Dataset):
    """Map-style dataset indexed by `MicroBatchKey`, returning collated micro-batches.

    Collation happens in ``__getitem__`` so DataLoader workers do it in parallel; use the DataLoader with
    ``batch_size=None``. Besides the `collate` tensors, each batch has 0-dim float tensors ``lm_denom`` and
    ``tok_denom`` copied from the key.

    Args:
        examples: Tokenised examples.
        pad_id: Padding token id (callers fall back to EOS when the tokenizer has no pad token).
        pad_to_multiple_of: See `collate`.
    """

    def __init__(self, examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None):
        self.examples = examples
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: MicroBatchKey) -> dict[str, torch.Tensor]:
        batch = collate([self.examples[i] for i in key.indices], self.pad_id, self.pad_to_multiple_of)
        batch["lm_denom"] = torch.tensor(key.lm_denom, dtype=torch.float32)
        batch["tok_denom"] = torch.tensor(key.tok_denom, dtype=torch.float32)
        return batch
