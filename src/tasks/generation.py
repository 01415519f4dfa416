"""Built-in offline task suite for layer-usage analysis, deterministic for a seed, with exact scoring.

| task | prompt (user turn) | reference | score |
|---|---|---|---|
| ``repeat`` | repeat a short phrase k times, comma-separated | the phrase k times | exact match (normalised) |
| ``copy`` | copy a sentence verbatim | that sentence | exact match (normalised) |
| ``addition`` | a + b | a + b (the number) | last integer of the completion == a + b |
| ``multiplication`` | a × b | a × b (the number) | last integer of the completion == a × b |
| ``continue`` | continue a news article | its next sentence(s) | token-level F1 |
| ``summarize`` | one-sentence summary of an excerpt | the lead sentence | ROUGE-L F1 |

Text comes from the 50 Lee *held-out* articles (`lee_heldout_articles`), disjoint from the background
articles the builtin training data is generated from, and the seeds are separate from training's, so the
suite is held out. Normalisation (`normalize`): lower case, typographic quotes folded, surrounding quotes and
trailing punctuation dropped, whitespace collapsed. Token F1 and ROUGE-L use `words` (lower-cased
alphanumeric runs) and are implemented here: F1 = 2PR / (P + R) over the multiset of words, ROUGE-L
F1 = 2PR / (P + R) with P = LCS / |prediction|, R = LCS / |reference| (word-level longest common subsequence).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass

from src.data.synthetic import split_sentences

TASKS = ("repeat", "copy", "addition", "multiplication", "continue", "summarize")
EXACT_TASKS = ("repeat", "copy", "addition", "multiplication")
METRICS = {
    "repeat": "exact_match",
    "copy": "exact_match",
    "addition": "exact_number",
    "multiplication": "exact_number",
    "continue": "token_f1",
    "summarize": "rouge_l_f1",
}


@dataclass
class TaskExample:
    """One evaluation prompt. `uid` is ``<task>-<index>``; `prompt` is the user turn (no chat template)."""

    task: str
    index: int
    prompt: str
    reference: str

    @property
    def uid(self) -> str:
        return f"{self.task}-{self.index}"

    def to_dict(self) -> dict:
        return {**asdict(self), "uid": self.uid}


# ---------------------------------------------------------------------------------------- generation
def make_task_examples(
    tasks: list[str] | tuple[str, ...] = TASKS,
    n_per_task: int = 8,
    seed: int = 1234,
    texts: list[str] | None = None,
) -> list[TaskExample]:
    """`n_per_task` examples of each task, in task order. Same (tasks, n, seed, texts) -> same examples.

    Each task draws from its own `random.Random(f"{seed}-{task}")`, so adding or removing a task does not
    change the others' examples. `texts` defaults to the Lee held-out articles.
    """

    def build(task: str, i: int, rng: random.Random, pool: _Pool) -> TaskExample:
        prompt, reference = _MAKERS[task](rng, pool)
        return TaskExample(task, i, prompt, reference)

    return draw_per_task(tasks, TASKS, "eval", n_per_task, seed, texts, _Pool, build)


def draw_per_task(
    tasks, available, kind: str, n_per_task: int, seed, texts: list[str] | None, make_pool, build
) -> list:
    """The draw shared by the generation and multiple-choice suites: `n_per_task` examples of each task, in
    task order, each task from its own `random.Random(f"{seed}-{task}")` (adding or removing a task does
    not change the others' examples).

    Args:
        available: the suite's task names; kind: its name in errors ("eval", "choice").
        texts: articles for `make_pool(texts)` (default: the Lee held-out articles).
        build: `build(task, index, rng, pool)` -> one example.

    Raises:
        ValueError: a task not in `available` (named, with the available ones).
    """
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ValueError(f"unknown {kind} task(s) {unknown}; available: {list(available)}")
    if texts is None:
        from src.data.corpora import lee_heldout_articles

        texts = lee_heldout_articles()
    pool = make_pool(texts)
    out = []
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")
        for i in range(int(n_per_task)):
            out.append(build(task, i, rng, pool))
    return out


class _Pool:
    def __init__(self, texts: list[str]):
        articles = [split_sentences(t) for t in texts]
        self.articles = [a for a in articles if len(a) >= 4]
        self.sentences = [s for a in articles for s in a if 5 <= len(s.split()) <= 30]
        if not self.articles or not self.sentences:
            raise ValueError("texts are too short for the eval suite: need articles of 4+ sentences")


def _repeat(rng: random.Random, pool: _Pool) -> tuple[str, str]:
    words = re.sub(r"[^\w\s'-]", "", rng.choice(pool.sentences)).split()
    size = rng.randint(2, min(4, len(words)))
    start = rng.randint(0, len(words) - size)
    phrase, times = " ".join(words[start : start + size]), rng.randint(2, 5)
    return f'Repeat the phrase "{phrase}" {times} times, separated by commas.', ", ".join([phrase] * times)


def _copy(rng: random.Random, pool: _Pool) -> tuple[str, str]:
    sentence = rng.choice(pool.sentences)
    return f"Copy the following sentence exactly:\n\n{sentence}", sentence


def _addition(rng: random.Random, pool: _Pool) -> tuple[str, str]:
    a, b = rng.randint(0, 10 ** rng.randint(1, 4) - 1), rng.randint(0, 10 ** rng.randint(1, 4) - 1)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _multiplication(rng: random.Random, pool: _Pool) -> tuple[str, str]:
    a, b = rng.randint(0, 10 ** rng.randint(1, 3) - 1), rng.randint(0, 10 ** rng.randint(1, 2) - 1)
    return f"What is {a} × {b}? Answer with the number only.", str(a * b)


def _continue(rng: random.Random, pool: _Pool) -> tuple[str, str]:
    article = rng.choice(pool.articles)
    n_context = rng.randint(2, min(3, len(article) - 1))
    context = " ".join(article[:n_context])
    return f"Continue this news article with the next sentence:\n\n{context}", article[n_context]


def _summarize(rng: random.Random, pool: _Pool) -> tuple[str, str]:
    article = rng.choice(pool.articles)
    excerpt = " ".join(article[: rng.randint(3, min(5, len(article)))])
    return f"Summarize the following news excerpt in one sentence.\n\n{excerpt}", article[0]


_MAKERS = {
    "repeat": _repeat,
    "copy": _copy,
    "addition": _addition,
    "multiplication": _multiplication,
    "continue": _continue,
    "summarize": _summarize,
}


# ---------------------------------------------------------------------------------------- scoring
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def normalize(text: str) -> str:
    """Lower case, fold typographic quotes, drop surrounding quotes / trailing punctuation, collapse spaces."""
    text = " ".join(text.translate(_QUOTES).lower().split())
    text = text.strip().strip("\"'`").strip()
    return text.rstrip(".!?;: ").strip()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def last_integer(text: str) -> int | None:
    """The last integer in `text` (thousands separators allowed, e.g. 12,345), or None."""
    found = re.findall(r"-?\d[\d,]*", text)
    for item in reversed(found):
        digits = item.replace(",", "")
        if digits.lstrip("-").isdigit():
            return int(digits)
    return None


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def answer_text(completion: str) -> str:
    """The part of a completion that is scored: text up to the first blank line, stripped."""
    return completion.strip().split("\n\n")[0].strip()


def score(task: str, completion: str, reference: str) -> float:
    """Score of one completion in [0, 1]; exact tasks give exactly 0.0 or 1.0."""
    answer = answer_text(completion)
    if task in ("repeat", "copy"):
        return float(normalize(answer) == normalize(reference))
    if task in ("addition", "multiplication"):  # whole completion: worked answers end with the result
        return float(last_integer(completion) == int(reference))
    if task == "continue":
        return token_f1(answer, reference)
    if task == "summarize":
        return rouge_l_f1(answer, reference)
    raise ValueError(f"unknown eval task {task!r}")


# ---------------------------------------------------------------------------------------- intervals
def _z(level: float) -> float:
    from statistics import NormalDist

    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n (the default for accuracies).

    With p = successes / n and z the standard normal quantile of (1 + level) / 2:
    centre = (p + z^2 / 2n) / (1 + z^2 / n), half width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n).
    Unlike the normal approximation it stays inside [0, 1] and is not empty at p = 0 or 1.

    Raises:
        ValueError: n < 1 or successes outside [0, n].
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got {successes} / {n}")
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends (no rounding residue)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def bootstrap_mean_interval(
    values: list[float], iters: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, `iters` times,
    numpy generator seeded by `seed`): the (1 - level) / 2 and (1 + level) / 2 quantiles of the means.

    Raises:
        ValueError: no values.
    """
    import numpy as np

    if len(values) == 0:
        raise ValueError("bootstrap of an empty sample")
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(int(iters), len(x)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def score_interval(values: list[float], level: float = 0.95, iters: int = 1000, seed: int = 0) -> dict:
    """95% (by default) interval of a task score = mean of per-example `values`.

    0/1 scores (accuracies, exact match): Wilson (`wilson_interval`); other scores (F1, ROUGE-L): percentile
    bootstrap over examples (`bootstrap_mean_interval`). Returns {"low", "high", "method", "level"}.
    """
    if values and all(v in (0.0, 1.0) for v in values):
        low, high = wilson_interval(sum(values), len(values), level)
        method = "wilson"
    else:
        low, high = bootstrap_mean_interval(values, iters, seed, level)
        method = "bootstrap"
    return {"low": low, "high": high, "method": method, "level": level}


def retention(
    scores: dict[str, float],
    base_scores: dict[str, float],
    example_scores: dict[str, dict[str, float]] | None = None,
    base_example_scores: dict[str, dict[str, float]] | None = None,
    iters: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """The paper's retention: mean over tasks of score / base score, with a paired bootstrap interval.

    Args:
        scores, base_scores: task -> score of the system and of the base model.
        example_scores, base_example_scores: task -> {example uid: score}; when both are given, `interval`
            is the percentile bootstrap over examples, *paired*: each resample draws the same example ids
            for the system and the base (per task, from the ids both have), recomputes every task's
            score / base score and their mean. Tasks without per-example scores (lm-eval tasks) enter every
            resample with their fixed ratio. Resamples where a base task score is 0 are dropped
            (`dropped_resamples`).
        iters, seed, level: resamples, numpy seed, confidence level.

    Returns:
        {"retention", "per_task": task -> ratio, "skipped_tasks": tasks with base score 0 (ratio undefined,
        left out), "interval": [low, high] or None, "per_task_interval": task -> [low, high],
        "dropped_resamples"}. `retention` is None when no task is left.
    """
    import numpy as np

    ratios, skipped = {}, []
    for task, base in base_scores.items():
        if task not in scores:
            continue
        if base <= 0:
            skipped.append(task)
            continue
        ratios[task] = scores[task] / base
    value = sum(ratios.values()) / len(ratios) if ratios else None
    out = {
        "retention": value,
        "per_task": ratios,
        "skipped_tasks": skipped,
        "interval": None,
        "per_task_interval": {},
        "dropped_resamples": 0,
    }
    if value is None or example_scores is None or base_example_scores is None:
        return out
    rng = np.random.default_rng(seed)
    q = [(1 - level) / 2, (1 + level) / 2]
    draws = np.zeros((int(iters), len(ratios)))
    for k, task in enumerate(ratios):
        sys_ex, base_ex = example_scores.get(task), base_example_scores.get(task)
        ids = sorted(set(sys_ex or {}) & set(base_ex or {}))
        if not ids:
            draws[:, k] = ratios[task]  # no per-example scores: a fixed ratio
            continue
        s = np.asarray([sys_ex[i] for i in ids], dtype=float)
        b = np.asarray([base_ex[i] for i in ids], dtype=float)
        pick = rng.integers(0, len(ids), size=(int(iters), len(ids)))
        num, den = s[pick].mean(1), b[pick].mean(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            draws[:, k] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        ok = draws[:, k][~np.isnan(draws[:, k])]
        if len(ok):
            out["per_task_interval"][task] = [float(v) for v in np.quantile(ok, q)]
    total = draws.mean(1)
    keep = total[~np.isnan(total)]
    out["dropped_resamples"] = int(len(total) - len(keep))
    if len(keep):
        out["interval"] = [float(v) for v in np.quantile(keep, q)]
    return out


__all__ = [
    "EXACT_TASKS",
    "METRICS",
    "TASKS",
    "TaskExample",
    "answer_text",
    "bootstrap_mean_interval",
    "last_integer",
    "make_task_examples",
    "normalize",
    "retention",
    "rouge_l_f1",
    "score",
    "score_interval",
    "token_f1",
    "wilson_interval",
    "words",
]
