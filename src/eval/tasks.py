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
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown eval task(s) {unknown}; available: {list(TASKS)}")
    if texts is None:
        from src.data.corpora import lee_heldout_articles

        texts = lee_heldout_articles()
    pool = _Pool(texts)
    out = []
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")
        for i in range(int(n_per_task)):
            prompt, reference = _MAKERS[task](rng, pool)
            out.append(TaskExample(task, i, prompt, reference))
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


def retention(scores: dict[str, float], base_scores: dict[str, float]) -> dict:
    """The paper's retention: mean over tasks of score / base score.

    Tasks whose base score is 0 (the ratio is undefined) are left out and listed in `skipped_tasks`;
    `retention` is None when no task is left.
    """
    ratios, skipped = {}, []
    for task, base in base_scores.items():
        if task not in scores:
            continue
        if base <= 0:
            skipped.append(task)
            continue
        ratios[task] = scores[task] / base
    value = sum(ratios.values()) / len(ratios) if ratios else None
    return {"retention": value, "per_task": ratios, "skipped_tasks": skipped}


__all__ = [
    "EXACT_TASKS",
    "METRICS",
    "TASKS",
    "TaskExample",
    "answer_text",
    "last_integer",
    "make_task_examples",
    "normalize",
    "retention",
    "rouge_l_f1",
    "score",
    "token_f1",
    "words",
]
