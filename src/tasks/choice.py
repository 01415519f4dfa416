"""Log-likelihood multiple-choice tasks of the built-in suite: deterministic for a seed, offline, exact scoring.

A 135M model cannot *generate* exact answers to most prompts (it scored 0 on repeat / addition /
multiplication), but it can *rank* a correct continuation above close wrong ones. Each example is a plain-text
prompt (no chat template: short prompts, the same text for every model) and 4 choices, each a continuation of
the prompt (starting with its space). Each choice is scored from log p(choice | prompt), the sum over the
choice's tokens of the model's log-softmax (nats), by the task's rule (`SCORING`, `choice_scores`):

- ``char``: log p(choice | prompt) / number of characters of the choice (length normalisation per character:
  fair between choices split into different numbers of tokens; for numbers it ranks like per token);
- ``pmi``: log p(choice | prompt) - log p(choice | newline) (the choice's pointwise mutual information with the
  prompt: frequent generic sentences are not favoured; no length normalisation needed).

The model's answer is the highest-scoring choice; the task score is the accuracy (chance 1/4).

| task | prompt | correct choice | 3 distractors | scoring |
|---|---|---|---|---|
| ``next_sentence`` | a held-out article sentence | the sentence after it | sentences of other held-out articles | pmi |
| ``cloze`` | a held-out sentence up to a word (4+ words in) | that word | 4+ letter words of other held-out articles | char |
| ``add_choice`` | ``Compute: a + b =`` (1 <= a, b <= 99) | a + b | a + b shifted by three of +-1, +-2, +-10 | char |
| ``mul_choice`` | ``Compute: a x b =`` (2 <= a <= 99, 2 <= b <= 9) | a * b | a * b shifted by three of +-1, +-b, +-10 | char |
| ``copy_choice`` | "Copy the sentence exactly." + a held-out sentence | that sentence | it with two adjacent words swapped, one word dropped, one word replaced | char |

Text comes only from the 50 Lee *held-out* articles (`lee_heldout_articles`), never from the training
articles; numbers are drawn from the seed. Each task draws from its own `random.Random(f"{seed}-{task}")`, so
adding or removing a task does not change the others' examples; the correct choice's position is uniform.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from src.data.synthetic import split_sentences

from .generation import draw_per_task

CHOICE_TASKS = ("next_sentence", "cloze", "add_choice", "mul_choice", "copy_choice")
N_CHOICES = 4
SCORING = {  # how a choice is scored (`choice_scores`); the model picks the highest
    "next_sentence": "pmi",
    "cloze": "char",
    "add_choice": "char",
    "mul_choice": "char",
    "copy_choice": "char",
}


@dataclass
class ChoiceExample:
    """One multiple-choice prompt. `uid` is ``<task>-<index>``; `choices` are continuations of `prompt`
    (each starts with its separating space); `label` is the index of the correct one."""

    task: str
    index: int
    prompt: str
    choices: list[str] = field(default_factory=list)
    label: int = 0

    @property
    def uid(self) -> str:
        return f"{self.task}-{self.index}"

    @property
    def reference(self) -> str:
        return self.choices[self.label]

    def to_dict(self) -> dict:
        return {**asdict(self), "uid": self.uid, "reference": self.reference}


# ---------------------------------------------------------------------------------------- generation
def make_choice_examples(
    tasks: list[str] | tuple[str, ...] = CHOICE_TASKS,
    n_per_task: int = 50,
    seed: int = 1234,
    texts: list[str] | None = None,
) -> list[ChoiceExample]:
    """`n_per_task` examples of each task in `tasks`, in task order; same arguments -> same examples.

    Args:
        tasks: names from `CHOICE_TASKS`.
        n_per_task: examples per task.
        seed: the draw; each task uses `random.Random(f"{seed}-{task}")`.
        texts: articles to draw sentences from (default: the 50 Lee held-out articles).

    Raises:
        ValueError: an unknown task, or `texts` without articles of 3+ usable sentences.
    """

    def build(task: str, i: int, rng: random.Random, pool: _Pool) -> ChoiceExample:
        prompt, correct, wrong = _MAKERS[task](rng, pool)
        assert len(set(wrong)) == N_CHOICES - 1 and correct not in wrong, (task, correct, wrong)
        label = rng.randrange(N_CHOICES)
        choices = list(wrong)
        choices.insert(label, correct)
        return ChoiceExample(task, i, prompt, choices, label)

    return draw_per_task(tasks, CHOICE_TASKS, "choice", n_per_task, seed, texts, _Pool, build)


_WORD = re.compile(r"^[A-Za-z]{4,}$")


class _Pool:
    def __init__(self, texts: list[str]):
        self.articles = []  # per article: its usable sentences (5-30 words, whitespace collapsed)
        self.pairs = []  # (article index, sentence, the sentence after it in the article), both usable
        for text in texts:
            every = [" ".join(s.split()) for s in split_sentences(text)]
            sents = [s for s in every if 5 <= len(s.split()) <= 30]
            if len(sents) >= 3:
                a = len(self.articles)
                self.articles.append(sents)
                self.pairs += [(a, x, y) for x, y in zip(every, every[1:]) if x in sents and y in sents]
        if len(self.articles) < 2:
            raise ValueError("texts are too short for the choice tasks: need 2+ articles of 3+ sentences")
        self.words = [  # (article index, word) of plain alphabetic words of 4+ letters
            (a, w)
            for a, sents in enumerate(self.articles)
            for s in sents
            for w in s.split()
            if _WORD.match(w)
        ]

    def other_sentences(
        self, rng: random.Random, article: int, n: int, exclude: set[str], max_words: int
    ) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            a = rng.randrange(len(self.articles))
            s = rng.choice(self.articles[a])
            if a != article and len(s.split()) <= max_words and s not in exclude and s not in out:
                out.append(s)
        return out


_NEXT_MAX_WORDS = 24  # prompt and choices: sentences of at most this many words (keeps the task cheap)


def _next_sentence(rng: random.Random, pool: _Pool) -> tuple[str, str, list[str]]:
    while True:
        a, context, nxt = rng.choice(pool.pairs)
        if max(len(context.split()), len(nxt.split())) <= _NEXT_MAX_WORDS:
            break
    wrong = pool.other_sentences(rng, a, N_CHOICES - 1, {nxt}, _NEXT_MAX_WORDS)
    return context, " " + nxt, [" " + s for s in wrong]


def _cloze(rng: random.Random, pool: _Pool) -> tuple[str, str, list[str]]:
    while True:
        a = rng.randrange(len(pool.articles))
        sents = pool.articles[a]
        j = rng.randrange(len(sents))
        words = sents[j].split()
        spots = [k for k in range(4, len(words)) if _WORD.match(words[k])]
        if spots:
            break
    k = rng.choice(spots)
    target = words[k]
    capital = target[0].isupper()
    wrong: list[str] = []
    while len(wrong) < N_CHOICES - 1:
        b, w = rng.choice(pool.words)
        if b != a and w[0].isupper() == capital and w.lower() != target.lower() and w not in wrong:
            wrong.append(w)
    return " ".join(words[:k]), " " + target, [" " + w for w in wrong]


def _shifted(rng: random.Random, answer: int, offsets: tuple[int, ...]) -> list[str]:
    usable = sorted({d for d in offsets if d != 0 and answer + d >= 0})
    return [" " + str(answer + d) for d in rng.sample(usable, N_CHOICES - 1)]


def _add_choice(rng: random.Random, pool: _Pool) -> tuple[str, str, list[str]]:
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    return f"Compute: {a} + {b} =", f" {a + b}", _shifted(rng, a + b, (-10, -2, -1, 1, 2, 10))


def _mul_choice(rng: random.Random, pool: _Pool) -> tuple[str, str, list[str]]:
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    return f"Compute: {a} x {b} =", f" {a * b}", _shifted(rng, a * b, (-10, -b, -1, 1, b, 10))


def _copy_choice(rng: random.Random, pool: _Pool) -> tuple[str, str, list[str]]:
    while True:
        a = rng.randrange(len(pool.articles))
        sentence = rng.choice(pool.articles[a])
        words = sentence.split()
        if 6 <= len(words) <= 12 and len(set(words)) == len(words):
            break
    i = rng.randrange(len(words) - 1)
    swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2 :]
    d = rng.randrange(len(words))
    dropped = words[:d] + words[d + 1 :]
    r = rng.randrange(len(words))
    replacement = rng.choice([w for b, w in pool.words if b != a and w not in words])
    replaced = words[:r] + [replacement] + words[r + 1 :]
    wrong = [" " + " ".join(w) for w in (swapped, dropped, replaced)]
    return f"Copy the sentence exactly.\nSentence: {sentence}\nCopy:", " " + sentence, wrong


_MAKERS = {
    "next_sentence": _next_sentence,
    "cloze": _cloze,
    "add_choice": _add_choice,
    "mul_choice": _mul_choice,
    "copy_choice": _copy_choice,
}


# ---------------------------------------------------------------------------------------- scoring
NULL_PROMPT = "\n"


def choice_loglikelihoods(
    model, tokenizer, examples: list[ChoiceExample], batch_size: int = 32
) -> list[dict]:
    """Log-likelihood of every choice of every example given its prompt, and layers used on its tokens.

    Each (prompt, choice) pair is one sequence: the prompt's token ids followed by the choice's (each encoded
    without special tokens). Sequences are sorted by length, left padded in batches of `batch_size`
    sequences, with positions `cumsum(mask) - 1` (so padding changes no score), and only the last positions'
    logits are computed (`logits_to_keep`). Examples of a task scored by ``pmi`` (`SCORING`) also get each
    choice scored after `NULL_PROMPT` alone (its unconditional log-likelihood). A FlexiDepth model with
    routing on runs through `routed_forward`, and its routes give the layers each token used; any other model
    (the base, an untrained layer-removal / early-exit baseline) runs all of its `config.num_hidden_layers`
    layers on every token.

    Returns:
        One dict per example, in order: "logprobs" (per choice: sum of log p over its tokens, nats),
        "null_logprobs" (the same after `NULL_PROMPT`; None unless the task is scored by pmi),
        "choice_tokens" (per choice), "prompt_tokens", "prompt_layers" (layers used per prompt token, in the
        correct choice's sequence), "choice_layers" (per choice: layers used per choice token), "gates" /
        "run" (per token of prompt + correct choice: the routed layers' gates / run flags; [] unrouted).
    """
    from src.data.batching import pad_batch
    from src.flexidepth import routed_forward, routing_active
    from src.models.tokenizer import pad_token_id

    device = next(model.parameters()).device
    num_layers = model.config.num_hidden_layers
    pad = pad_token_id(tokenizer)
    routed = routing_active(model)
    null_ids = tokenizer(NULL_PROMPT, add_special_tokens=False)["input_ids"]
    seqs = []  # (example index, choice index, prompt ids, choice ids, scored after the null prompt)
    for e, ex in enumerate(examples):
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        if not prompt:
            raise ValueError(f"{ex.uid}: the prompt has no tokens")
        for c, choice in enumerate(ex.choices):
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"{ex.uid}: choice {choice!r} has no tokens")
            seqs.append((e, c, prompt, cont, False))
            if SCORING[ex.task] == "pmi":
                seqs.append((e, c, null_ids, cont, True))
    out = [
        {
            "logprobs": [0.0] * len(ex.choices),
            "null_logprobs": [0.0] * len(ex.choices) if SCORING[ex.task] == "pmi" else None,
            "choice_tokens": [0] * len(ex.choices),
            "prompt_tokens": 0,
            "prompt_layers": [],
            "choice_layers": [[] for _ in ex.choices],
            "gates": [],
            "run": [],
        }
        for ex in examples
    ]
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][2]) + len(seqs[i][3])))
    with torch.inference_mode():
        for start in range(0, len(order), int(batch_size)):
            idx = order[start : start + int(batch_size)]
            inputs = [seqs[i][2] + seqs[i][3] for i in idx]
            width = max(len(s) for s in inputs)
            keep = max(len(seqs[i][3]) for i in idx) + 1  # + the last prompt position (predicts choice[0])
            ids, mask = pad_batch(inputs, pad, side="left")
            ids, mask = ids.to(device), mask.to(device)
            kwargs = {
                "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
                "logits_to_keep": keep,
                "use_cache": False,
            }
            used = gates = run = None
            if routed:
                res = routed_forward(model, ids, mask, **kwargs)
                logits = res.logits
                if res.routes is not None:
                    used = res.routes.layers_used.double().cpu()
                    gates, run = res.routes.gates.float().cpu(), res.routes.run.cpu()
            else:
                logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits
            if used is None:
                used = mask.double().cpu() * num_layers
            logp = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(idx):
                e, c, prompt, cont, null = seqs[i]
                n = len(cont)
                # column keep-1-j predicts the token j+1 from the end: the choice is the last n tokens
                pred = logp[row, keep - 1 - n : keep - 1]
                target = torch.tensor(cont, dtype=torch.long, device=pred.device)
                value = float(pred.gather(-1, target[:, None]).sum())
                if null:
                    out[e]["null_logprobs"][c] = value
                    continue
                out[e]["logprobs"][c] = value
                out[e]["choice_tokens"][c] = n
                row_used = used[row, width - n - len(prompt) :].tolist()
                out[e]["choice_layers"][c] = row_used[len(prompt) :]
                if c == examples[e].label:
                    out[e]["prompt_tokens"] = len(prompt)
                    out[e]["prompt_layers"] = row_used[: len(prompt)]
                    if gates is not None:
                        out[e]["gates"] = gates[row, width - n - len(prompt) :].tolist()
                        out[e]["run"] = run[row, width - n - len(prompt) :].tolist()
    return out


def choice_scores(example: ChoiceExample, result: dict) -> list[float]:
    """Per-choice score of one example from its `choice_loglikelihoods` result, by `SCORING[example.task]`:
    ``char``: log p(choice | prompt) / characters of the choice (nats per character); ``pmi``:
    log p(choice | prompt) - log p(choice | NULL_PROMPT) (nats)."""
    rule = SCORING[example.task]
    if rule == "char":
        return [lp / max(len(text), 1) for lp, text in zip(result["logprobs"], example.choices, strict=True)]
    if rule == "pmi":
        return [lp - lp0 for lp, lp0 in zip(result["logprobs"], result["null_logprobs"], strict=True)]
    raise ValueError(f"unknown scoring rule {rule!r}")


def pick(scores: list[float]) -> int:
    """Index of the highest score (the first one on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


__all__ = [
    "CHOICE_TASKS",
    "N_CHOICES",
    "NULL_PROMPT",
    "SCORING",
    "ChoiceExample",
    "choice_loglikelihoods",
    "choice_scores",
    "make_choice_examples",
    "pick",
]
