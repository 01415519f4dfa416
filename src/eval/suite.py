"""What one system scores: held-out perplexity (`perplexity` over `heldout_chunks`), the task suite
(`run_suite`: generation tasks, `run_choice_suite`: multiple-choice tasks) with their DepthMap token records
(`token_records`), and the per-task summaries (`summarize_tasks`). The loop over systems is run.py's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from src.data.batching import pad_batch
from src.flexidepth import routed_forward, routing_active
from src.flexidepth.generation import generate
from src.flexidepth.routes import lm_loss_sum
from src.models.tokenizer import chat_prompt

from ..tasks.choice import (
    N_CHOICES,
    SCORING,
    ChoiceExample,
    choice_loglikelihoods,
    choice_scores,
    pick,
)
from ..tasks.generation import METRICS, TaskExample, score, score_interval

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- perplexity
def heldout_chunks(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token windows of at most `max_length` (non-overlapping, per article; windows under 2 tokens dropped)."""
    chunks = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length]
            if len(window) >= 2:
                chunks.append(window)
    return chunks


def perplexity(model, chunks: list[list[int]], batch_size: int = 8, pad_id: int = 0) -> dict[str, Any]:
    """Perplexity over `chunks` (right padded batches) and, when routed, layer usage of every chunk token."""
    device = next(model.parameters()).device
    loss_sum, n_scored = 0.0, 0
    used_sum, n_tokens, run_counts, num_layers = 0.0, 0, None, model.config.num_hidden_layers
    routed = routing_active(model)
    with torch.inference_mode():
        for i in range(0, len(chunks), batch_size):
            ids, mask = pad_batch(chunks[i : i + batch_size], pad_id, side="right")
            ids, mask = ids.to(device), mask.to(device)
            labels = ids.masked_fill(mask == 0, -100)
            if routed:
                out = routed_forward(model, ids, mask, labels=labels)
                loss, count = out.lm_loss_sum, out.lm_tokens
                routes = out.routes
                used_sum += float(routes.layers_used.sum())
                counts = routes.layer_run_counts.double().cpu()
                run_counts = counts if run_counts is None else run_counts + counts
            else:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                loss, count = lm_loss_sum(logits, labels)
                used_sum += float(mask.sum()) * num_layers
            n_tokens += int(mask.sum())
            loss_sum += float(loss)
            n_scored += int(count)
    nll = loss_sum / max(n_scored, 1)
    out = {
        "ppl": math.exp(nll),
        "nll": nll,
        "scored_tokens": n_scored,
        "tokens": n_tokens,
        "layers_used_mean": used_sum / max(n_tokens, 1),
    }
    if run_counts is not None:
        out["layer_run_fraction"] = (run_counts / max(n_tokens, 1)).tolist()
    return out


# ---------------------------------------------------------------------------------------- task suite
def run_suite(
    model,
    tokenizer,
    examples: list[TaskExample | ChoiceExample],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    label: str = "flexidepth",
) -> tuple[list[dict], list[dict]]:
    """Score every example: generation tasks by greedy generation (`TaskExample`), multiple-choice tasks by
    log-likelihood (`ChoiceExample`, `run_choice_suite`). Returns (per-example rows in the order of
    `examples`, DepthMap token records)."""
    gen = [ex for ex in examples if isinstance(ex, TaskExample)]
    choice = [ex for ex in examples if isinstance(ex, ChoiceExample)]
    rows, records = _run_generation(model, tokenizer, gen, max_new_tokens, batch_size, label)
    c_rows, c_records = run_choice_suite(model, tokenizer, choice, batch_size, label)
    by_uid = {r["uid"]: r for r in rows + c_rows}
    return [by_uid[ex.uid] for ex in examples], records + c_records


def run_choice_suite(
    model, tokenizer, examples: list[ChoiceExample], batch_size: int = 8, label: str = "flexidepth"
) -> tuple[list[dict], list[dict]]:
    """Log-likelihood scoring of multiple-choice examples (src/tasks/choice.py), `batch_size` examples
    (times their choices) per forward. Row "score" is 1.0 when the highest-scoring choice is the correct one;
    layers used are summed over the prompt tokens (in the correct choice's sequence) and over the tokens of
    all choices. DepthMap records: the prompt's tokens (segment "prompt") and the correct choice's
    (segment "choice")."""
    if not examples:
        return [], []
    results = choice_loglikelihoods(model, tokenizer, examples, int(batch_size) * N_CHOICES)
    rows, records = [], []
    for ex, res in zip(examples, results, strict=True):
        scores = choice_scores(ex, res)
        pred = pick(scores)
        rows.append(
            {
                "model": label,
                **ex.to_dict(),
                "kind": "choice",
                "scoring": SCORING[ex.task],
                "choice_scores": scores,
                "logprobs": res["logprobs"],
                "pred": pred,
                "completion": ex.choices[pred],
                "score": float(pred == ex.label),
                "prompt_tokens": res["prompt_tokens"],
                "prompt_layers_sum": float(sum(res["prompt_layers"])),
                "choice_tokens": sum(res["choice_tokens"]),
                "choice_layers_sum": float(sum(sum(c) for c in res["choice_layers"])),
                "generated_tokens": 0,
                "generated_layers_sum": 0.0,
            }
        )
        ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        ids = ids + tokenizer(ex.reference, add_special_tokens=False)["input_ids"]
        used = res["prompt_layers"] + res["choice_layers"][ex.label]
        gates, run = res["gates"] or None, res["run"] or None
        p = res["prompt_tokens"]
        for segment, span in (("prompt", slice(0, p)), ("choice", slice(p, len(ids)))):
            records += token_records(
                tokenizer,
                label,
                ex,
                segment,
                ids[span],
                used[span],
                None if gates is None else gates[span],
                None if run is None else run[span],
                offset=span.start,
            )
    return rows, records


def token_records(
    tokenizer, label: str, example, segment: str, ids, used, gates=None, run=None, offset: int = 0
) -> list[dict]:
    """DepthMap records (src/eval/depthmap.py) of one segment of one example: one dict per token.

    Args:
        label: the system ("base", or the method's label).
        example: a `TaskExample` / `ChoiceExample` (its task and uid are recorded).
        segment: "prompt", "generated" or "choice".
        ids: the segment's token ids (n).
        used: layers used per token (n numbers; rounded to ints).
        gates / run: per token, the routed layers' gate values / run flags (n rows of R, lists or a tensor
            [n, R]); None when the model is not routed (recorded as []).
        offset: position of the segment's first token in the example (positions are offset + j).
    """
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    gates = gates.tolist() if isinstance(gates, torch.Tensor) else gates
    run = run.tolist() if isinstance(run, torch.Tensor) else run
    out = []
    for j, tid in enumerate(ids):
        out.append(
            {
                "model": label,
                "task": example.task,
                "example_id": example.uid,
                "segment": segment,
                "position": offset + j,
                "token_id": int(tid),
                "token": str(pieces[j]),
                "text": tokenizer.decode([tid]),
                "layers_used": int(round(float(used[j]))),
                "gates": [] if gates is None else [float(v) for v in gates[j]],
                "run": [] if run is None else [bool(v) for v in run[j]],
                "base_entropy": None,  # filled by src/eval/uncertainty.py's add_base_stats
                "base_loss": None,
            }
        )
    return out


def _run_generation(
    model, tokenizer, examples: list[TaskExample], max_new_tokens: int, batch_size: int, label: str
) -> tuple[list[dict], list[dict]]:
    """Greedy generation and scoring of generation-task examples. Returns (rows, DepthMap token records)."""
    num_layers = model.config.num_hidden_layers
    rows, records = [], []
    if not examples:
        return rows, records
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            texts = [chat_prompt(tokenizer, ex.prompt) for ex in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = generate(
                model,
                tokenizer,
                enc["input_ids"],
                enc["attention_mask"],
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            gen_used = out.layers_used.cpu()
            for b, ex in enumerate(batch):
                mask = enc["attention_mask"][b].bool()
                prompt_ids = enc["input_ids"][b][mask].tolist()
                n_new = int(out.valid[b].sum())
                new_ids = out.new_tokens[b, :n_new].cpu().tolist()
                if out.prefill is not None:
                    p_gates = out.prefill.gates[b][mask.to(out.prefill.gates.device)].cpu()
                    p_run = out.prefill.run[b][mask.to(out.prefill.run.device)].cpu()
                    p_used = ((num_layers - p_run.shape[-1]) + p_run.sum(-1)).tolist()
                    g_gates, g_run = out.gates[b, :n_new].cpu(), out.run[b, :n_new].cpu()
                else:
                    p_gates = p_run = g_gates = g_run = None
                    p_used = [num_layers] * len(prompt_ids)
                g_used = gen_used[b, :n_new].tolist()
                completion = tokenizer.decode(new_ids, skip_special_tokens=True)
                rows.append(
                    {
                        "model": label,
                        **ex.to_dict(),
                        "kind": "generation",
                        "completion": completion,
                        "score": score(ex.task, completion, ex.reference),
                        "prompt_tokens": len(prompt_ids),
                        "generated_tokens": n_new,
                        "prompt_layers_sum": float(sum(p_used)),
                        "generated_layers_sum": float(sum(g_used)),
                    }
                )
                records += token_records(
                    tokenizer, label, ex, "prompt", prompt_ids, p_used, p_gates, p_run, offset=0
                )
                records += token_records(
                    tokenizer, label, ex, "generated", new_ids, g_used, g_gates, g_run, offset=len(prompt_ids)
                )
    finally:
        tokenizer.padding_side = side
    return rows, records


def summarize_tasks(rows: list[dict], level: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """Per task: mean score with its `level` interval (`score_interval`: Wilson for 0/1 scores, bootstrap over
    examples otherwise) and token-weighted mean layers used.

    Keys: "kind" (generation | choice), "metric", "chance" (choice tasks: 1 / choices; None for generation),
    "n", "score", "ci_low", "ci_high", "ci_method", "prompt_tokens", "layers_used_prompt", and
    "layers_used_answer": over generated tokens (generation tasks) or over all choices' tokens (choice
    tasks), also given as "layers_used_generated" / "layers_used_choices" (None for the other kind)."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    out = {}
    for task, items in by_task.items():
        kind = items[0].get("kind", "generation")
        values = [float(r["score"]) for r in items]
        ci = score_interval(values, level=level, seed=seed)
        pt = sum(r["prompt_tokens"] for r in items)
        gt = sum(r["generated_tokens"] for r in items)
        ct = sum(r.get("choice_tokens", 0) for r in items)
        gen_used = sum(r["generated_layers_sum"] for r in items) / gt if gt else None
        choice_used = sum(r.get("choice_layers_sum", 0.0) for r in items) / ct if ct else None
        out[task] = {
            "kind": kind,
            "metric": "accuracy" if kind == "choice" else METRICS[task],
            "chance": 1.0 / len(items[0]["choices"]) if kind == "choice" else None,
            "n": len(items),
            "score": sum(values) / len(values),
            "ci_low": ci["low"],
            "ci_high": ci["high"],
            "ci_method": ci["method"],
            "prompt_tokens": pt,
            "generated_tokens": gt,
            "choice_tokens": ct,
            "layers_used_prompt": sum(r["prompt_layers_sum"] for r in items) / max(pt, 1),
            "layers_used_generated": gen_used,
            "layers_used_choices": choice_used,
            "layers_used_answer": choice_used if kind == "choice" else gen_used,
        }
    return out


def example_scores(rows: list[dict]) -> dict[str, dict[str, float]]:
    """task -> {example uid: score} (the per-example scores that retention's paired bootstrap resamples)."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        out.setdefault(row["task"], {})[row["uid"]] = float(row["score"])
    return out


def generated_layers_mean(rows: list[dict]) -> float | None:
    tokens = sum(r["generated_tokens"] for r in rows)
    return sum(r["generated_layers_sum"] for r in rows) / tokens if tokens else None
