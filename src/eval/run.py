"""Evaluation of a base model and the system a method builds on it (a FlexiDepth / MindSkip checkpoint or an
untrained baseline, src/methods/): held-out perplexity, the task suite, lm-eval tasks, retention, analytic
FLOPs, a DepthMap and figures. `evaluate(settings)` is what `python -m src.eval` runs; what one system scores
is suite.py's.

The evaluation loop is `evaluate_against_base`, shared with `python -m src.compare`: the base model is
evaluated first, as loaded, then each system on the same inputs (`eval_inputs`), scored against the base.
Here the method modifies the same model in place (LaCo changes weights, so the order matters); compare gives
every system a fresh base model. Rendering (results.md, tables, logger scalars) is src/render/report.py's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from src.flexidepth import is_injected, set_tau
from src.flexidepth.checkpoint import resolve_checkpoint
from src.methods import method_macs
from src.models.tokenizer import load_tokenizer, pad_token_id
from src.utils.files import atomic_write_text
from src.utils.hardware import resolve_device

from ..tasks.choice import (
    CHOICE_TASKS,
    ChoiceExample,
    make_choice_examples,
)
from ..tasks.generation import TaskExample, make_task_examples, retention
from .suite import (
    example_scores,
    generated_layers_mean,
    heldout_chunks,
    perplexity,
    run_choice_suite,
    run_suite,
    summarize_tasks,
    token_records,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- the whole run
def split_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """`eval.tasks` -> (built-in suite tasks, lm-evaluation-harness tasks: every other name)."""
    from ..tasks.generation import TASKS

    builtin = set(TASKS) | set(CHOICE_TASKS)
    return [t for t in tasks if t in builtin], [t for t in tasks if t not in builtin]


def harness_include_path(harness_tasks: list[str], output_dir: Path, given=None) -> str | None:
    """The project's local lm-eval tasks (flexidepth_mc, flexidepth_gen, ...) are written on demand into
    <output_dir>/lm_tasks; `eval.harness.include_path` adds a folder of the user's own."""
    from ..tasks.lm_tasks import LOCAL_GROUP, LOCAL_TAG, LOCAL_TASKS, write_local_tasks

    local = set(LOCAL_TASKS) | {LOCAL_GROUP, LOCAL_TAG}
    if given:
        if any(t in local for t in harness_tasks):
            raise ValueError(
                "eval.harness.include_path cannot be combined with the built-in flexidepth_* tasks"
            )
        return str(given)
    if any(t in local for t in harness_tasks):
        return str(write_local_tasks(output_dir / "lm_tasks"))
    return None


def suite_examples(tasks: list[str], n_per_task: int, seed: int) -> list[TaskExample | ChoiceExample]:
    """Examples of the built-in tasks in `tasks` order: generation tasks from `make_task_examples`,
    multiple-choice tasks from `make_choice_examples` (each task's draw depends only on (task, n, seed))."""
    out: list[TaskExample | ChoiceExample] = []
    for task in tasks:
        if task in CHOICE_TASKS:
            out += make_choice_examples([task], n_per_task, seed)
        else:
            out += make_task_examples([task], n_per_task, seed)
    return out


def eval_inputs(
    tokenizer, ev, output_dir: Path
) -> tuple[list[list[int]], list[TaskExample], list[str], str | None]:
    """What every system is evaluated on (`ev`: the checked EvalConfig, src/eval/config.py): held-out
    perplexity windows, the built-in suite's examples, the lm-eval task names and their include path (the
    project's offline tasks are written on demand)."""
    from src.data.corpora import lee_heldout_articles

    texts = lee_heldout_articles()
    if ev.ppl_max_articles is not None:  # null: all (0 is refused by EvalConfig.validate)
        texts = texts[: ev.ppl_max_articles]
    chunks = heldout_chunks(tokenizer, texts, ev.ppl_max_length)
    suite_tasks, harness_tasks = split_tasks(list(ev.tasks))
    examples = suite_examples(suite_tasks, ev.n_per_task, ev.seed)
    include = harness_include_path(harness_tasks, output_dir, ev.harness.include_path)
    return chunks, examples, harness_tasks, include


def evaluate_system(
    model, tokenizer, label: str, chunks, examples, ev, harness_tasks=(), include_path=None
) -> tuple[dict, list[dict], list[dict]]:
    """Perplexity, task suite, lm-eval tasks and layer usage of the model as it is now.

    Returns (summary, rows, records); summary["example_scores"] (task -> {uid: score}) feeds the paired
    retention interval (`system_retention`)."""
    num_layers = model.config.num_hidden_layers
    log.info("%s: held-out perplexity over %d chunks", label, len(chunks))
    ppl = perplexity(model, chunks, ev.batch_size, pad_id=pad_token_id(tokenizer))
    log.info("%s: task suite, %d examples", label, len(examples))
    rows, records = run_suite(model, tokenizer, examples, ev.max_new_tokens, ev.batch_size, label=label)
    gen = generated_layers_mean(rows)
    summary = {
        "perplexity": ppl,
        "tasks": summarize_tasks(rows, seed=ev.seed),
        "example_scores": example_scores(rows),
        "layers": {
            "layers_used_scored": ppl["layers_used_mean"],
            "layers_skipped_scored": num_layers - ppl["layers_used_mean"],
            "layers_used_generated": gen,
            "layers_skipped_generated": None if gen is None else num_layers - gen,
        },
    }
    if harness_tasks:
        from .harness_run import run_harness

        h = ev.harness
        log.info("%s: lm-eval tasks %s", label, list(harness_tasks))
        summary["harness"] = run_harness(
            model,
            tokenizer,
            list(harness_tasks),
            num_fewshot=h.num_fewshot,
            limit=h.limit,
            batch_size=ev.batch_size,
            include_path=include_path,
            max_gen_toks=h.max_gen_toks,
            seed=ev.seed,
            apply_chat_template=h.apply_chat_template,
            confirm_run_unsafe_code=h.confirm_run_unsafe_code,
            bootstrap_iters=h.bootstrap_iters,
        )
    return summary, rows, records


def all_scores(summary: dict) -> dict[str, float]:
    """Built-in task scores plus lm-eval task scores (groups without a score left out), for retention."""
    scores = {t: v["score"] for t, v in summary["tasks"].items()}
    for task, v in (summary.get("harness") or {}).items():
        if v.get("score") is not None:
            scores[task] = float(v["score"])
    return scores


def system_retention(summary: dict, base_summary: dict, seed: int = 0) -> dict:
    """`retention` of a system against the base model over every scored task, with its paired bootstrap
    interval over the built-in suite's examples (lm-eval tasks enter with fixed ratios)."""
    return retention(
        all_scores(summary),
        all_scores(base_summary),
        summary.get("example_scores"),
        base_summary.get("example_scores"),
        seed=seed,
    )


@dataclass
class SystemResult:
    """One system of `evaluate_against_base`: what `evaluate_system` measured plus its standing against the
    base model.

    label: "base" or the system's label. applied: the method's AppliedMethod (src/methods/; None for the
    base). summary / rows / records: `evaluate_system`'s. retention: `system_retention` against the base
    (None for the base). flops: {"scored": MACs report, "generated": MACs report when tokens were generated}
    ({} for the base). routed_layers: decoder-layer indices holding FlexiDepth layers ([] when not injected).
    """

    label: str
    applied: Any = None
    summary: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    retention: dict | None = None
    flops: dict = field(default_factory=dict)
    routed_layers: list[int] = field(default_factory=list)


def routed_layers(model) -> list[int]:
    """Indices of the decoder layers holding FlexiDepth layers ([] for a model that is not injected)."""
    return list(model.flexidepth.layer_indices) if is_injected(model) else []


def evaluate_against_base(
    model,
    tokenizer,
    ev,
    inputs: tuple,
    systems: Iterable[tuple[str | None, Callable[[Any], Any]]],
    fresh_model: Callable[[], Any] | None = None,
    retention_seed: int | None = None,
) -> Iterator[SystemResult]:
    """The evaluation loop of `src.eval` and `src.compare`: the base model once, then each system, every one
    on the same inputs (`eval_inputs`) and scored against the base.

    Args:
        model: the base model as loaded, on its device; evaluated first, as "base".
        ev: the evaluation settings (EvalConfig: batch_size, max_new_tokens, seed, harness, ...).
        inputs: `eval_inputs`' (chunks, examples, harness tasks, include path).
        systems: (label, apply) pairs in order. `apply(model)` turns the model it is given into the system in
            place (its method applied, moved to the device) and returns the method's AppliedMethod; a label
            None takes `applied.label`.
        fresh_model: None: every system is applied to the same model in turn (LaCo changes weights, so the
            order matters); else a callable giving a new base model, called before each system after the
            previous model is released.
        retention_seed: seed of the retention bootstrap (default `ev.seed`).

    Yields:
        A `SystemResult` for the base model, then one per system, as each finishes.
    """
    chunks, examples, harness_tasks, include = inputs

    def measured(label: str) -> tuple[dict, list[dict], list[dict]]:
        return evaluate_system(model, tokenizer, label, chunks, examples, ev, harness_tasks, include)

    summary, rows, records = measured("base")
    base = SystemResult("base", None, summary, rows, records, routed_layers=routed_layers(model))
    yield base
    seed = ev.seed if retention_seed is None else int(retention_seed)
    for label, apply in systems:
        if fresh_model is not None:
            del model
            model = fresh_model()
        applied = apply(model)
        label = label or applied.label
        summary, rows, records = measured(label)
        lay = summary["layers"]
        flops = {"scored": method_macs(model.config, applied, lay["layers_skipped_scored"])}
        if lay["layers_skipped_generated"] is not None:
            flops["generated"] = method_macs(model.config, applied, lay["layers_skipped_generated"])
        yield SystemResult(
            label,
            applied,
            summary,
            rows,
            records,
            retention=system_retention(summary, base.summary, seed=seed),
            flops=flops,
            routed_layers=routed_layers(model),
        )


def method_applies(method: dict | None, ckpt: Path | None) -> bool:
    """A system besides the base model: a checkpoint was given, or an untrained `method` was chosen."""
    from src.methods import build_method

    return ckpt is not None or not build_method(method or {"name": "flexidepth"}).trains


def evaluate(s) -> dict[str, Any]:
    """Run the evaluation `s` describes (src.eval's checked settings, `EvaluateCommand`: model, method,
    ckpt_path, skip, eval, paths.output_dir); writes and returns the results.

    The base model is evaluated first, then the method (conf/method/, src/methods/) is applied to the same
    model in place and evaluated (`evaluate_against_base`): a FlexiDepth or MindSkip checkpoint
    (`ckpt_path`), or a baseline that needs no training (ShortGPT, LaCo, early exit, random skip).

    Writes <paths.output_dir>/results.json, results.md, completions.jsonl, depthmap.parquet (the last
    evaluated system's tokens, with the base model's entropy / loss on them), the figures and the depth
    analysis (analysis.md / .json / _categories.png, src/eval/analysis.py). Raises CheckpointNotFound for a
    `ckpt_path` without a FlexiDepth folder, MethodConfigError for a bad method config (before the model is
    loaded).
    """
    from dataclasses import asdict

    from src.methods import build_method, checkpoint_method, trains
    from src.models.loader import load_base_model

    from ..render.figures import write_figures
    from ..render.report import write_markdown
    from .analysis import record_categories, write_analysis
    from .depthmap import write_depthmap
    from .uncertainty import add_base_stats

    ev = s.eval
    method_cfg = dict(s.method or {"name": "flexidepth"})
    ckpt = resolve_checkpoint(s.ckpt_path)
    if ckpt is not None and build_method(method_cfg).trains:  # a trained checkpoint names its method
        stored = checkpoint_method(ckpt)
        if stored != method_cfg.get("name"):
            method_cfg = {"name": stored}
    build_method(method_cfg)  # validates, before the model is loaded
    torch.manual_seed(ev.seed)
    output_dir = Path(s.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = load_base_model(s.model).eval()
    device = resolve_device(ev.device)
    model.to(device)
    tokenizer = load_tokenizer(s.model)
    num_layers = model.config.num_hidden_layers

    inputs = eval_inputs(tokenizer, ev, output_dir)
    skip = s.skip.flexidepth()

    def apply(model):
        applied = build_method(method_cfg).apply(model, tokenizer=tokenizer, ckpt=ckpt, skip=skip)
        model.to(device)
        if ev.tau is not None and trains(applied.name):
            set_tau(model, ev.tau)  # the one writer: every layer and applied.flexi_cfg read it
        return applied

    systems = [(None, apply)] if method_applies(method_cfg, ckpt) else []
    evaluated = list(evaluate_against_base(model, tokenizer, ev, inputs, systems))
    depth_records = evaluated[-1].records  # the system's tokens (the base model's when none applies)
    applied = evaluated[-1].applied
    log.info("base model's entropy and loss on the %d DepthMap tokens", len(depth_records))
    add_base_stats(  # the base's distribution on the system's own tokens (its routing off)
        model,
        depth_records,
        ev.batch_size,
        pad_token_id(tokenizer),
        method=None if applied is None else applied.name,
    )
    del model

    results: dict[str, Any] = {
        "model": str(s.model.name_or_path),
        "ckpt_path": str(ckpt) if ckpt else None,
        "num_layers": num_layers,
        "routed_layers": [],
        "settings": asdict(ev),
        "perplexity": {},
        "tasks": {},
        "layers": {},
    }
    all_rows = []
    for res in evaluated:
        all_rows += res.rows
        for key in ("perplexity", "tasks", "layers"):
            results[key][res.label] = res.summary[key]
        if "harness" in res.summary:
            results.setdefault("harness", {})[res.label] = res.summary["harness"]
        if res.applied is not None:
            results["method"] = res.applied.to_dict()
            results["system"] = res.label
            results["routed_layers"] = res.routed_layers
            results["retention"] = res.retention
            results["flops"] = res.flops
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2, sort_keys=True))
    with (output_dir / "completions.jsonl").open("w") as f:
        for row in all_rows:
            f.write(json.dumps(row) + "\n")
    write_markdown(results, output_dir / "results.md")
    write_depthmap(depth_records, output_dir / "depthmap.parquet", results["routed_layers"], num_layers)
    record_categories(depth_records)  # token categories (src/eval/analysis.py): the HTML's hover shows them
    figures = write_figures(results, depth_records, output_dir)
    log.info("depth analysis (what the router learned): %s", output_dir / "analysis.md")
    write_analysis(output_dir)
    figures.append(output_dir / "analysis_categories.png")
    results["figures"] = [str(p) for p in figures]
    return results


__all__ = [
    "SystemResult",
    "evaluate",
    "evaluate_against_base",
    "all_scores",
    "eval_inputs",
    "evaluate_system",
    "split_tasks",
    "example_scores",
    "generated_layers_mean",
    "heldout_chunks",
    "perplexity",
    "routed_layers",
    "run_choice_suite",
    "run_suite",
    "suite_examples",
    "summarize_tasks",
    "system_retention",
    "token_records",
]
