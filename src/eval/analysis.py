"""What the router learned: layers used by token category and against the base model's uncertainty, with
bootstrap intervals, from an evaluation's `depthmap.parquet` (src/eval/depthmap.py).

    python -m src.analyze eval_dir=outputs/evaluate/runs/<run>      (src.eval runs it at its end)

writes <eval_dir>/analysis.json, analysis.md and analysis_categories.png (`write_analysis`).

**Which forward a token is charged to.** The paper counts the layers used *to generate* a token: for token
x_t that is the forward at position t - 1 (the one whose output distribution predicted x_t). A generated
DepthMap row already carries that forward's routes; a prompt or choice row carries the routes of its own
position (the forward that predicts x_{t+1}), so for those the analysis takes the routes of the row at
position t - 1 of the same example. Tokens at position 0 (nothing produced them) are left out. The base
model's entropy / loss of a row are those of the same producing forward (src/eval/uncertainty.py). The
"recorded" view (each row's own routes, what depthmap.html shades) is reported beside it in analysis.json.

**Intervals.** Tokens of one example are not independent, so every interval is a 95% percentile bootstrap
over *examples* (resampling whole examples with replacement, `n_boot` times, numpy seed `seed`): category
means, differences of two categories (paired: the same resamples), Spearman correlations and entropy deciles.

Categories are `CATEGORIES` (below), computed by `token_categories` from the tokens and their segments only,
never from the routes, so they apply to any checkpoint; the base model's distribution enters through the
entropy deciles.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from src.render.analysis import analysis_markdown, write_category_figure
from src.utils.errors import UserError
from src.utils.files import atomic_write_text


class AnalysisInputError(UserError, ValueError):
    """A bad `eval_dir` / option of the analysis (the message names the key and the file)."""


COPY_NGRAM = 3  # a copied token completes a repeat of this many tokens (itself and the COPY_NGRAM - 1 before)
# prompts that pose an arithmetic question: "Compute: 12 + 7 =", "What is 12 × 7?"
ARITHMETIC_PROMPT = re.compile(r"\d+\s*[-+*/x×]\s*\d+\s*[=?]")
# the most frequent English function words (closed-class words: articles, prepositions, pronouns, auxiliaries)
FUNCTION_WORDS = frozenset(
    "the a an of to in on at for with by from as and or but if that this these those it its is are was were "
    "be been has have had do does did not he she they we you i his her their our him them which who what "
    "will would can could there than so".split()
)
# end-of-turn / end-of-text special tokens of the supported families' chat templates
END_OF_TURN = frozenset(
    {"<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<|end|>", "<end_of_turn>"}
)

CATEGORIES: dict[str, str] = {
    "copied": f"completes a {COPY_NGRAM}-token n-gram (itself and the {COPY_NGRAM - 1} tokens before it) that "
    "already occurred earlier in its example (prompt + answer)",
    "novel": f"not copied, at a position >= {COPY_NGRAM - 1} (where a repeat could be detected)",
    "prompt": "a token of the prompt",
    "answer": "a token of the answer: generated, or of the scored (correct) choice",
    "arithmetic_digit": "an answer token made of digits only, in an example whose prompt poses an arithmetic "
    "question (`ARITHMETIC_PROMPT`: 'a + b =', 'a x b?', ...)",
    "arithmetic_context": "every other token of those arithmetic examples (their prompt, the answer's non-digits)",
    "punctuation": "a token made of punctuation only (Unicode category P*; surrounding spaces ignored)",
    "function_word": "a whole word in `FUNCTION_WORDS` (the, of, and, is, ...; case-insensitive)",
    "word_start": "an alphabetic token that starts a word (after a space, a non-letter, or at position 0)",
    "word_continuation": "an alphabetic token that continues a word (no leading space, after a letter)",
    "end_of_turn": f"an end-of-turn / end-of-text special token ({', '.join(sorted(END_OF_TURN))})",
}
# (a, b, expected sign of mean(a) - mean(b) under the paper's findings)
DIFFERENCES: tuple[tuple[str, str], ...] = (
    ("copied", "novel"),
    ("arithmetic_digit", "arithmetic_context"),
    ("answer", "prompt"),
    ("word_continuation", "word_start"),
    ("function_word", "word_start"),
)


# ---------------------------------------------------------------------------------------- categories
def _alpha(text: str) -> bool:
    core = text.strip()
    return bool(core) and core.replace("'", "").isalpha()


def _punct(text: str) -> bool:
    core = text.strip()
    return bool(core) and all(unicodedata.category(ch).startswith("P") for ch in core)


def token_categories(
    ids: Sequence[int], tokens: Sequence[str], texts: Sequence[str], segments: Sequence[str]
) -> list[set[str]]:
    """The `CATEGORIES` of every token of one example (its tokens in position order, prompt then answer).

    Args:
        ids: token ids; tokens: the tokenizer's token strings (special tokens are recognised by these);
        texts: each token decoded alone; segments: "prompt", "generated" or "choice" per token.
    Returns:
        One set of category names per token (a token can be in several, or none).
    """
    n = len(ids)
    if not (len(tokens) == len(texts) == len(segments) == n):
        raise ValueError("token_categories: ids, tokens, texts and segments must have the same length")
    prompt_text = "".join(t for t, s in zip(texts, segments, strict=True) if s == "prompt")
    arithmetic = bool(ARITHMETIC_PROMPT.search(prompt_text))
    seen: set[tuple[int, ...]] = set()
    out: list[set[str]] = []
    starts = []
    for t in range(n):
        text, cats = texts[t], set()
        prev = texts[t - 1] if t > 0 else ""
        if t >= COPY_NGRAM - 1:
            gram = tuple(int(i) for i in ids[t - COPY_NGRAM + 1 : t + 1])
            cats.add("copied" if gram in seen else "novel")
            seen.add(gram)
        cats.add("prompt" if segments[t] == "prompt" else "answer")
        digits = segments[t] != "prompt" and text.strip().isdigit()
        if arithmetic:
            cats.add("arithmetic_digit" if digits else "arithmetic_context")
        if _punct(text):
            cats.add("punctuation")
        if _alpha(text):
            continues = not text[:1].isspace() and bool(prev) and prev[-1:].isalpha()
            cats.add("word_continuation" if continues else "word_start")
        if tokens[t] in END_OF_TURN:
            cats.add("end_of_turn")
        starts.append(_alpha(text) and "word_start" in cats)
        out.append(cats)
    for t in range(n):  # a whole function word: starts a word and the next token does not continue it
        if starts[t] and texts[t].strip().lower() in FUNCTION_WORDS:
            nxt = texts[t + 1] if t + 1 < n else " "
            if nxt[:1].isspace() or not _alpha(nxt):
                out[t].add("function_word")
    return out


def _examples(rows: list[dict]) -> list[list[dict]]:
    from .uncertainty import example_sequences

    return list(example_sequences(rows).values())


def record_categories(records: list[dict]) -> None:
    """Set every DepthMap record's "categories" (a sorted list of `CATEGORIES` names) in place (the HTML
    depth map shows them on hover)."""
    for recs in _examples(list(records)):
        cats = token_categories(
            [r["token_id"] for r in recs],
            [r["token"] for r in recs],
            [r["text"] for r in recs],
            [r["segment"] for r in recs],
        )
        for r, c in zip(recs, cats, strict=True):
            r["categories"] = sorted(c)


# ---------------------------------------------------------------------------------------- token table
def token_table(rows: list[dict]) -> dict[str, Any]:
    """Per analysed token (position >= 1): example index, layers used by its producing forward ("produced")
    and by its own row ("recorded"), the producing forward's run flags, base entropy / loss (NaN when null)
    and category membership. Returns numpy arrays: example [N] int, produced [N], recorded [N],
    run [N, R] bool, entropy [N], loss [N], member {category: [N] bool}."""
    example, produced, recorded, runs, entropy, loss = [], [], [], [], [], []
    member: dict[str, list[bool]] = {c: [] for c in CATEGORIES}
    for e, recs in enumerate(_examples(rows)):
        cats = token_categories(
            [r["token_id"] for r in recs],
            [r["token"] for r in recs],
            [r["text"] for r in recs],
            [r["segment"] for r in recs],
        )
        for t in range(1, len(recs)):
            r = recs[t]
            src = r if r["segment"] == "generated" else recs[t - 1]
            example.append(e)
            produced.append(float(src["layers_used"]))
            recorded.append(float(r["layers_used"]))
            runs.append([bool(v) for v in src["run"] or []])
            entropy.append(math.nan if r.get("base_entropy") is None else float(r["base_entropy"]))
            loss.append(math.nan if r.get("base_loss") is None else float(r["base_loss"]))
            for c in CATEGORIES:
                member[c].append(c in cats[t])
    widths = {len(r) for r in runs}
    if len(widths) > 1:
        raise ValueError(f"DepthMap rows have run flags of different lengths {sorted(widths)}")
    width = widths.pop() if widths else 0
    run = np.asarray(runs, dtype=bool).reshape(len(runs), width)
    return {
        "example": np.asarray(example, dtype=np.int64),
        "n_examples": len(set(example)),
        "produced": np.asarray(produced, dtype=float),
        "recorded": np.asarray(recorded, dtype=float),
        "run": run,
        "entropy": np.asarray(entropy, dtype=float),
        "loss": np.asarray(loss, dtype=float),
        "member": {c: np.asarray(v, dtype=bool) for c, v in member.items()},
    }


# ---------------------------------------------------------------------------------------- statistics
def _ci(samples: np.ndarray) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def _weights(n_examples: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_examples] multiplicities of a bootstrap over examples."""
    rng = np.random.default_rng(seed)
    if n_examples == 0:
        return np.zeros((n_boot, 0))
    return rng.multinomial(n_examples, np.full(n_examples, 1.0 / n_examples), size=n_boot).astype(float)


def group_means(
    values: np.ndarray, example: np.ndarray, groups: dict[str, np.ndarray], weights: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Mean of `values` over each group's tokens, with its example-bootstrap 95% interval.

    Returns {group: {"n": tokens, "mean": float | None, "ci": [lo, hi] | None, "_boot": [B] array}}; an empty
    group has n 0, mean None and ci None (never 0)."""
    n_ex = weights.shape[1]
    out = {}
    for name, mask in groups.items():
        n = int(mask.sum())
        if n == 0:
            out[name] = {"n": 0, "mean": None, "ci": None, "_boot": np.full(weights.shape[0], np.nan)}
            continue
        sums = np.bincount(example[mask], weights=values[mask], minlength=n_ex)
        counts = np.bincount(example[mask], minlength=n_ex).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (weights @ sums) / (weights @ counts)
        out[name] = {"n": n, "mean": float(values[mask].mean()), "ci": _ci(boot), "_boot": boot}
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant or n < 3."""
    from scipy.stats import rankdata

    if x.size < 3:
        return None
    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_boot(
    layers: np.ndarray, other: np.ndarray, example: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """Spearman(layers, other) over tokens where `other` is finite, with an example-bootstrap 95% interval."""
    keep = np.isfinite(other)
    layers, other, example = layers[keep], other[keep], example[keep]
    rho = spearman(layers, other)
    out: dict[str, Any] = {"n": int(keep.sum()), "rho": rho, "ci": None}
    if rho is None:
        return out
    ids = np.unique(example)
    index = {e: np.flatnonzero(example == e) for e in ids}
    rng = np.random.default_rng(seed + 1)
    boot = []
    for _ in range(n_boot):
        pick = np.concatenate([index[e] for e in rng.choice(ids, size=ids.size, replace=True)])
        r = spearman(layers[pick], other[pick])
        boot.append(np.nan if r is None else r)
    out["ci"] = _ci(np.asarray(boot))
    return out


def _public(stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "_boot"} for k, v in stats.items()}


def _verdict(diff: dict[str, Any], expected_sign: int) -> str:
    """'holds' (interval excludes 0 on the expected side), 'reversed' (excludes 0 on the other side),
    'not shown' (interval contains 0) or 'untestable' (a side is empty / constant)."""
    ci = diff.get("ci")
    if ci is None:
        return "untestable"
    if (ci[0] > 0 and expected_sign > 0) or (ci[1] < 0 and expected_sign < 0):
        return "holds"
    if ci[0] > 0 or ci[1] < 0:
        return "reversed"
    return "not shown"


def analyze_rows(
    rows: list[dict], routed_layers: Sequence[int] | None = None, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The analysis of DepthMap rows (one model's; see the module docstring). Returns the analysis.json dict:
    categories (produced view) and recorded_categories, differences, spearman (entropy, loss), entropy
    deciles, run_fraction per routed layer and category, and the paper's three claims with a verdict."""
    models = sorted({str(r["model"]) for r in rows})
    if len(models) > 1:
        raise ValueError(f"the DepthMap holds several models {models}: analyse one at a time")
    tab = token_table(rows)
    n_ex = int(tab["example"].max()) + 1 if tab["example"].size else 0
    weights = _weights(n_ex, n_boot, seed)
    member = tab["member"]
    produced = group_means(tab["produced"], tab["example"], member, weights)
    recorded = group_means(tab["recorded"], tab["example"], member, weights)
    diffs = {}
    for a, b in DIFFERENCES:
        ma, mb = produced[a]["mean"], produced[b]["mean"]
        mean = None if ma is None or mb is None else ma - mb
        diffs[f"{a} - {b}"] = {
            "mean": mean,
            "ci": None if mean is None else _ci(produced[a]["_boot"] - produced[b]["_boot"]),
        }
    rho = {
        key: spearman_boot(tab["produced"], tab[key], tab["example"], n_boot, seed)
        for key in ("entropy", "loss")
    }
    finite = np.isfinite(tab["entropy"])
    deciles: list[dict[str, Any]] = []
    if finite.any():
        edges = np.quantile(tab["entropy"][finite], np.linspace(0, 1, 11))
        bins = np.clip(np.searchsorted(edges, tab["entropy"], side="right") - 1, 0, 9)
        groups = {str(d): finite & (bins == d) for d in range(10)}
        stats = group_means(tab["produced"], tab["example"], groups, weights)
        for d in range(10):
            s = stats[str(d)]
            deciles.append(
                {"decile": d + 1, "entropy": [float(edges[d]), float(edges[d + 1])], **_public({"x": s})["x"]}
            )
    width = tab["run"].shape[1]
    layer_ids = list(routed_layers) if routed_layers and len(routed_layers) == width else list(range(width))
    run_fraction = {
        c: (tab["run"][m].mean(0).round(4).tolist() if m.any() and width else None) for c, m in member.items()
    }
    claims = {
        "copied_fewer_layers": {
            "claim": "copied tokens use fewer layers than novel ones",
            "difference": "copied - novel",
            **diffs["copied - novel"],
            "verdict": _verdict(diffs["copied - novel"], -1),
        },
        "arithmetic_more_layers": {
            "claim": "arithmetic answer digits use more layers than the text around them",
            "difference": "arithmetic_digit - arithmetic_context",
            **diffs["arithmetic_digit - arithmetic_context"],
            "verdict": _verdict(diffs["arithmetic_digit - arithmetic_context"], +1),
        },
        "layers_rise_with_uncertainty": {
            "claim": "layers used rise with the base model's uncertainty (Spearman with its entropy)",
            "rho_entropy": rho["entropy"]["rho"],
            "ci": rho["entropy"]["ci"],
            "rho_loss": rho["loss"]["rho"],
            "ci_loss": rho["loss"]["ci"],
            "verdict": _verdict({"ci": rho["entropy"]["ci"]}, +1),
        },
    }
    return {
        "model": models[0] if models else None,
        "view": "produced: the layers of the forward that predicted each token (module docstring)",
        "n_tokens": int(tab["example"].size),
        "n_examples": int(tab["n_examples"]),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "copy_ngram": COPY_NGRAM,
        "category_definitions": dict(CATEGORIES),
        "categories": _public(produced),
        "recorded_categories": _public(recorded),
        "differences": diffs,
        "spearman": rho,
        "entropy_deciles": deciles,
        "run_fraction": {"routed_layers": layer_ids, "by_category": run_fraction},
        "claims": claims,
    }


def write_analysis(
    eval_dir: str | Path, n_boot: int = 1000, seed: int = 0, overwrite: bool | None = None
) -> dict[str, Any]:
    """Analyse <eval_dir>/depthmap.parquet; write analysis.json, analysis.md, analysis_categories.png.

    Routed layer indices come from <eval_dir>/results.json when present. `overwrite`: None (src.eval, whose
    own run writes the analysis) writes over an earlier analysis; False refuses a folder already holding one
    (OutputExistsError naming it, src.analyze without overwrite=true); True replaces the earlier set as one
    unit (src/utils/outputs.py). Raises `AnalysisInputError` naming the missing folder / file, a damaged
    results.json or depthmap.parquet, or n_boot < 1, before anything is written."""
    from ..utils.outputs import check_free, replacing

    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise AnalysisInputError(f"eval_dir={eval_dir}: no such folder")
    parquet = eval_dir / "depthmap.parquet"
    if not parquet.is_file():
        raise AnalysisInputError(
            f"eval_dir={eval_dir}: no depthmap.parquet (write one with python -m src.eval)"
        )
    if n_boot < 1:
        raise AnalysisInputError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if overwrite is not None:
        check_free(eval_dir, "analyze", overwrite, other="eval_dir")
    routed = read_routed_layers(eval_dir / "results.json")
    rows = read_depthmap_rows(parquet)
    a = analyze_rows(rows, routed, int(n_boot), int(seed))
    a["source"] = str(parquet)
    with contextlib.nullcontext() if overwrite is None else replacing(eval_dir, "analyze"):
        atomic_write_text(eval_dir / "analysis.json", json.dumps(a, indent=2))
        atomic_write_text(eval_dir / "analysis.md", analysis_markdown(a))
        write_category_figure(a, eval_dir / "analysis_categories.png")
    return a


def read_routed_layers(path: Path) -> list[int] | None:
    """`routed_layers` of an evaluation's results.json (None without the file); AnalysisInputError naming
    the file when it is damaged or its `routed_layers` is not a list of layer indices."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnalysisInputError(f"{path}: damaged results.json ({type(err).__name__}: {err})") from None
    routed = data.get("routed_layers") if isinstance(data, dict) else None
    if routed is not None and (
        not isinstance(routed, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in routed)
    ):
        raise AnalysisInputError(f"{path}: routed_layers must be a list of layer indices, got {routed!r}")
    return routed


def read_depthmap_rows(path: Path) -> list[dict]:
    """The rows of a DepthMap parquet file; AnalysisInputError naming the file when it cannot be read
    (truncated, not parquet, columns of the wrong type)."""
    from .depthmap import load_depthmap

    try:
        return load_depthmap(path).to_list()
    except Exception as err:  # pyarrow / datasets raise many types for a damaged file
        raise AnalysisInputError(
            f"{path}: damaged depthmap.parquet ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "write it again with python -m src.eval"
        ) from None


__all__ = [
    "AnalysisInputError",
    "CATEGORIES",
    "COPY_NGRAM",
    "DIFFERENCES",
    "analyze_rows",
    "group_means",
    "record_categories",
    "spearman",
    "spearman_boot",
    "token_categories",
    "token_table",
    "write_analysis",
]
