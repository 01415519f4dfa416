"""Offline instruction-style SFT examples, generated deterministically from a seed.

The tasks mirror the paper's layer-usage analysis (repetition and copying should need few layers, arithmetic
results and open continuation more), so the same generator feeds training and CI-level evaluation:

| task | user asks | assistant answers |
|---|---|---|
| ``repeat`` | repeat a short phrase k times | the phrase k times, comma-separated |
| ``copy`` | copy a corpus sentence verbatim | that sentence |
| ``addition`` | a + b | ``a + b = c`` (exact) |
| ``multiplication`` | a × b | ``a × b = c`` (exact) |
| ``continue`` | continue the first sentences of a news article | the article's next 1-2 sentences |
| ``summarize`` | summarise the first sentences of an article | the article's lead (first) sentence |

``summarize`` is *extractive*: the reference summary is the lead sentence, the classic "lead-1" news summary
(news articles put the gist first), not a written abstract.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

from src.data.corpora import lee_articles
from src.utils.errors import DataError

TASKS = ("repeat", "copy", "addition", "multiplication", "continue", "summarize")

# Sentence ends: ., ! or ? (plus closing quotes/brackets), whitespace, then something that can open a sentence.
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
# A period after these does not end a sentence.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr gen col lt sgt capt gov sen rep inc ltd co corp vs etc no mt fig "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)


def split_sentences(text: str) -> list[str]:
    """Split English prose into sentences with a regular expression.

    A boundary is sentence-final punctuation followed by whitespace and a capital letter, digit or opening
    quote. Periods after common abbreviations ("Mr.", "Dr.", "Jan."), single-letter initials ("J.") and dotted
    acronyms ("U.S.") are not boundaries.

    Args:
        text: A paragraph or article.

    Returns:
        Stripped, non-empty sentences in order; joining them with spaces restores the text up to whitespace.
    """
    sentences, start = [], 0
    for match in _BOUNDARY.finditer(text):
        if text[match.start()] == "." and _is_abbreviation(text[start : match.start()]):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _is_abbreviation(before: str) -> bool:
    """Whether the word right before a period is an abbreviation, an initial or a dotted acronym."""
    words = before.split()
    if not words:
        return False
    word = words[-1].lstrip("\"'([")
    return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or "." in word


def make_instruction_examples(
    n: int,
    seed: int,
    texts: list[str] | None = None,
    tasks: Sequence[str] | None = None,
    max_digits: int | None = None,
) -> list[dict]:
    """Generate ``n`` single-turn chat examples over the tasks in `TASKS`.

    Args:
        n: Number of examples.
        seed: Random seed; the same seed (and texts) gives identical output.
        texts: Source articles for the text tasks; defaults to the Lee background news corpus.
        tasks: The tasks to draw from (uniformly), a non-empty subset of `TASKS`; None is all of them. The
            config key is ``data.synthetic_tasks`` (`check_tasks`).
        max_digits: Cap on the digits of each arithmetic operand (``data.synthetic_max_digits``); None keeps
            the generator's ranges (addition up to 6 + 6 digits, multiplication 4 x 3). Each operand's digit
            count is drawn uniformly from 1 to its cap, so a small cap gives sums a small model can compute.

    Returns:
        Rows ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "task": name}``.

    Raises:
        DataError: `tasks` is empty or names a task not in `TASKS`; `max_digits` is < 1.
    """
    tasks = check_tasks(tasks)
    check_max_digits(max_digits)
    corpus = _Corpus(lee_articles() if texts is None else texts)
    rng = random.Random(seed)
    makers: dict[str, Callable[[random.Random, _Corpus], tuple[str, str]]] = {
        "repeat": _repeat,
        "copy": _copy,
        "addition": lambda r, c: _addition(r, c, max_digits),
        "multiplication": lambda r, c: _multiplication(r, c, max_digits),
        "continue": _continue,
        "summarize": _summarize,
    }
    rows = []
    for _ in range(n):
        task = rng.choice(tasks)
        user, assistant = makers[task](rng, corpus)
        rows.append({"messages": _chat(user, assistant), "task": task})
    return rows


def check_tasks(tasks: Sequence[str] | None, key: str = "data.synthetic_tasks") -> tuple[str, ...]:
    """Check a task subset's values (None: all of `TASKS`, in their order; a list of names is the schema's
    type, `DataConfig`): DataError naming `key` and the valid tasks for an empty list or an unknown task."""
    if tasks is None:
        return TASKS
    if not tasks:
        raise DataError(
            f"{key} must be a non-empty list of tasks from {list(TASKS)} (or null: all), got {tasks!r}"
        )
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(f"{key}: unknown task(s) {unknown}; valid: {list(TASKS)}")
    return tuple(dict.fromkeys(tasks))


def check_max_digits(max_digits: int | None, key: str = "data.synthetic_max_digits") -> None:
    """Check an operand digit cap (an integer or None: the schema's type, `DataConfig`): >= 1 or None;
    DataError naming `key` otherwise."""
    if max_digits is not None and max_digits < 1:
        raise DataError(f"{key} must be an integer >= 1 or null, got {max_digits!r}")


class _Corpus:
    """Sentence-split articles, with the subsets each task can draw from."""

    def __init__(self, texts: list[str]):
        self.articles = [split_sentences(t) for t in texts]
        # continue/summarize need a few context sentences plus a target.
        self.long_articles = [a for a in self.articles if len(a) >= 4]
        # Very short or very long sentences make poor copy/repeat material.
        self.sentences = [s for a in self.articles for s in a if 5 <= len(s.split()) <= 40]
        if not self.long_articles or not self.sentences:
            raise ValueError("texts are too short for synthetic examples: need articles of 4+ sentences")


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def _repeat(rng: random.Random, corpus: _Corpus) -> tuple[str, str]:
    words = re.sub(r"[^\w\s'-]", "", rng.choice(corpus.sentences)).split()
    size = rng.randint(2, min(5, len(words)))
    start = rng.randint(0, len(words) - size)
    phrase, times = " ".join(words[start : start + size]), rng.randint(2, 6)
    prompt = rng.choice(
        [
            'Repeat the phrase "{p}" {k} times, separated by commas.',
            'Please write "{p}" {k} times in a row, separated by commas.',
            'Say "{p}" exactly {k} times. Use commas between the repetitions.',
        ]
    )
    return prompt.format(p=phrase, k=times), ", ".join([phrase] * times)


def _copy(rng: random.Random, corpus: _Corpus) -> tuple[str, str]:
    sentence = rng.choice(corpus.sentences)
    prompt = rng.choice(
        [
            "Copy the following sentence exactly:\n\n{s}",
            "Repeat this sentence word for word:\n\n{s}",
            "Write out the sentence below without changing anything.\n\n{s}",
        ]
    )
    return prompt.format(s=sentence), sentence


def _operands(rng: random.Random, max_digits_a: int, max_digits_b: int) -> tuple[int, int]:
    """Draw operands with a random number of digits each, so small and large numbers both occur."""
    a = rng.randint(0, 10 ** rng.randint(1, max_digits_a) - 1)
    b = rng.randint(0, 10 ** rng.randint(1, max_digits_b) - 1)
    return a, b


def _cap(digits: int, max_digits: int | None) -> int:
    return digits if max_digits is None else min(digits, max_digits)


def _addition(rng: random.Random, corpus: _Corpus, max_digits: int | None = None) -> tuple[str, str]:
    a, b = _operands(rng, _cap(6, max_digits), _cap(6, max_digits))
    prompt = rng.choice(["What is {a} + {b}?", "Add {a} and {b}.", "Calculate the sum of {a} and {b}."])
    return prompt.format(a=a, b=b), f"{a} + {b} = {a + b}"


def _multiplication(rng: random.Random, corpus: _Corpus, max_digits: int | None = None) -> tuple[str, str]:
    a, b = _operands(rng, _cap(4, max_digits), _cap(3, max_digits))
    prompt = rng.choice(
        ["What is {a} × {b}?", "Multiply {a} by {b}.", "Calculate the product of {a} and {b}."]
    )
    return prompt.format(a=a, b=b), f"{a} × {b} = {a * b}"


def _continue(rng: random.Random, corpus: _Corpus) -> tuple[str, str]:
    article = rng.choice(corpus.long_articles)
    n_context = rng.randint(2, min(4, len(article) - 1))
    n_target = min(rng.randint(1, 2), len(article) - n_context)
    context = " ".join(article[:n_context])
    target = " ".join(article[n_context : n_context + n_target])
    prompt = rng.choice(
        [
            "Continue this news article with the next sentence or two:\n\n{c}",
            "Here is the beginning of a news story. Write what comes next.\n\n{c}",
            "What happens next in this article? Continue it.\n\n{c}",
        ]
    )
    return prompt.format(c=context), target


def _summarize(rng: random.Random, corpus: _Corpus) -> tuple[str, str]:
    article = rng.choice(corpus.long_articles)
    excerpt = " ".join(article[: rng.randint(3, min(6, len(article)))])
    prompt = rng.choice(
        [
            "Summarize the following news excerpt in one sentence.\n\n{x}",
            "Give a one-sentence summary of this article:\n\n{x}",
            "What is the main point of this news report? Answer in one sentence.\n\n{x}",
        ]
    )
    return prompt.format(x=excerpt), article[0]
