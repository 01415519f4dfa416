"""Running lm-evaluation-harness tasks with the `FlexiDepthLM` wrapper (harness.py): the task index, the
score picked per task, and the layers used per task (a group or tag: the sum over its leaf tasks).

    out = run_harness(model, tokenizer, ["hellaswag", "winogrande"], num_fewshot=5)   # hub data: internet
    out["hellaswag"]["score"], out["hellaswag"]["layers_used_mean"]

The wrapper is registered in lm_eval as ``"flexidepth"`` when a run starts (`register`), not at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tasks.lm_tasks import LOCAL_GROUP, LOCAL_TASKS, write_local_tasks
from .harness import FlexiDepthLM, RouteStats

# The metric reported as "score" ("metric,filter" as in lm_eval's results). The paper's tasks:
PRIMARY_METRICS = {
    "mmlu": "acc,none",  # 4-way multiple choice, group accuracy weighted by subject size
    "hellaswag": "acc_norm,none",  # length-normalised accuracy, the usual HellaSwag number
    "winogrande": "acc,none",
    "gsm8k": "exact_match,strict-match",  # the "#### <answer>" the few-shot examples teach
    "humaneval": "pass@1,create_test",
    "coqa": "f1,none",  # CoQA's official metric (em is reported under "metrics" too)
}
# Otherwise by output type (first filter that has it): these are fractions in [0, 1]. Tasks of other types
# (loglikelihood_rolling perplexities) fall back to their first metric, which need not lie in [0, 1].
DEFAULT_METRIC_BY_OUTPUT = {
    "multiple_choice": "acc",
    "loglikelihood": "acc",
    "generate_until": "exact_match",
}


def register() -> None:
    """Register FlexiDepthLM as lm_eval model "flexidepth" (skipped when the name is already taken).

    lm_eval's built-in model names are registered first: `get_model` only loads them lazily while the
    registry is empty, which our entry would otherwise prevent.
    """
    import lm_eval.models  # noqa: F401  (registers the built-in placeholders)
    from lm_eval.api.registry import model_registry

    if "flexidepth" not in model_registry:
        model_registry.register("flexidepth")(FlexiDepthLM)


def _task_manager(tasks: list[str], include_path: str | Path | None, include_defaults: bool | None):
    """A TaskManager; with include_defaults=None, lm_eval's own ~15 s task index is only built when needed."""
    from lm_eval.tasks import TaskManager

    if include_defaults is None:
        if include_path is not None:
            local = TaskManager(include_path=str(include_path), include_defaults=False)
            if all(t in local.all_tasks for t in tasks):
                return local
        include_defaults = True
    return TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=include_defaults,
    )


def _leaves(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    if name not in group_subtasks:
        return [name]
    return [leaf for child in group_subtasks[name] for leaf in _leaves(child, group_subtasks)]


def _pick_metric(
    name: str, values: dict[str, Any], output_type: str | None, metric: str | None
) -> str | None:
    """The "metric,filter" key reported as score (`PRIMARY_METRICS`, else by output type); None if none."""
    keys = [k for k in values if "," in k and "_stderr" not in k and isinstance(values[k], (int, float))]
    wanted = metric or PRIMARY_METRICS.get(name)
    if wanted is not None:
        if wanted in keys:
            return wanted
        base = wanted.split(",")[0]
        return next((k for k in keys if k.split(",")[0] == base), None)
    base = DEFAULT_METRIC_BY_OUTPUT.get(output_type or "")
    match = next((k for k in keys if k.split(",")[0] == base), None)
    return match or (keys[0] if keys else None)


def run_harness(
    model,
    tokenizer,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
    max_gen_toks: int | None = None,
    seed: int = 1234,
    max_length: int | None = None,
    device: str | None = None,
    include_defaults: bool | None = None,
    metrics: dict[str, str] | None = None,
    apply_chat_template: bool = False,
    confirm_run_unsafe_code: bool = False,
    bootstrap_iters: int = 100000,
) -> dict[str, dict]:
    """Evaluate `model` on lm_eval `tasks` in one `simple_evaluate` call; per task, score and route stats.

    Args:
        model / tokenizer: a HF causal LM (FlexiDepth-injected or not; routing as currently set) and its tokenizer.
        tasks: lm_eval task or group names (``mmlu``, ``hellaswag``, ``winogrande``, ``gsm8k``,
            ``humaneval``, ``coqa``; ``flexidepth_mc``/``flexidepth_gen`` from `write_local_tasks`).
        num_fewshot: few-shot examples (None: each task's default; lm_eval keeps a config value of 0).
        limit: at most this many docs per (leaf) task.
        batch_size / max_length / device: passed to `FlexiDepthLM`.
        include_path: extra task folder (e.g. `write_local_tasks(...)`).
        max_gen_toks: overrides every generation task's max_gen_toks.
        seed: python / numpy / torch / few-shot sampling seeds (and the generation sampling seed).
        include_defaults: index lm_eval's built-in tasks; None = only when `tasks` are not all found in
            `include_path` (building that index takes ~15 s).
        metrics: {task: "metric,filter"} to override the reported score (`PRIMARY_METRICS`, else acc for
            multiple choice and exact_match for generation).
        apply_chat_template: wrap prompts in the tokenizer's chat template (lm_eval's option).
        confirm_run_unsafe_code: needed for tasks that execute model code (HumanEval).
        bootstrap_iters: lm_eval's stderr setting: mean metrics get the analytic stderr whenever it is
            > 0, other aggregations a bootstrap of this many resamples; 0 skips every stderr.

    Returns:
        {task: {"score", "score_stderr" (None when not computed), "metric", "metrics" (every metric), "n" (docs evaluated),
        "n_total" (docs in the split), "output_type", "num_fewshot", "layers_used_mean", "tokens",
        "output_tokens", "layers_used_output_mean", "num_layers", "by_request_type": {type: stats}}};
        a group also holds "subtasks": {leaf: the same keys}. "score" is the chosen metric's value: a
        fraction in [0, 1] for accuracy / exact match / pass@1 / F1 metrics.
    """
    from lm_eval import simple_evaluate

    register()  # lm_eval model "flexidepth" (its built-in names first)

    lm = FlexiDepthLM(
        model, tokenizer, batch_size=batch_size, max_length=max_length, device=device, seed=seed
    )
    manager = _task_manager(list(tasks), include_path, include_defaults)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        gen_kwargs=None if max_gen_toks is None else {"max_gen_toks": int(max_gen_toks)},
        task_manager=manager,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        apply_chat_template=apply_chat_template,
        confirm_run_unsafe_code=confirm_run_unsafe_code,
    )
    group_subtasks = dict(results.get("group_subtasks", {}))
    for name in tasks:  # a tag is no group in the results: its members are its leaves
        index_entry = manager.task_index.get(name)
        if name not in group_subtasks and index_entry is not None and index_entry.kind.name == "TAG":
            group_subtasks[name] = sorted(index_entry.tags)
    all_values = {**results.get("results", {}), **results.get("groups", {})}

    def entry(name: str) -> dict[str, Any]:
        leaves = _leaves(name, group_subtasks)
        values = all_values.get(name, {})
        configs = [results.get("configs", {}).get(leaf, {}) for leaf in leaves]
        output_type = configs[0].get("output_type") if configs else None
        key = _pick_metric(name, values, output_type, (metrics or {}).get(name))
        samples = [results.get("n-samples", {}).get(leaf, {}) for leaf in leaves]
        stats = lm.task_stats(leaves)
        by_type: dict[str, RouteStats] = {}
        for leaf in leaves:
            for reqtype, leaf_stats in lm.stats.get(leaf, {}).items():
                total = by_type.setdefault(reqtype, RouteStats())
                total += leaf_stats
        stderr = values.get(key.replace(",", "_stderr,", 1)) if key is not None else None
        return {
            "score": float(values[key]) if key is not None else None,
            "score_stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "metric": key,
            "metrics": {k: float(v) for k, v in values.items() if "," in k and isinstance(v, (int, float))},
            "n": sum(int(s.get("effective", 0)) for s in samples),
            "n_total": sum(int(s.get("original", 0)) for s in samples),
            "output_type": output_type,
            "num_fewshot": results.get("n-shot", {}).get(leaves[0]),
            "num_layers": lm.num_layers,
            **stats.summary(),
            "by_request_type": {t: s.summary() for t, s in by_type.items()},
        }

    out = {}
    for name in tasks:
        out[name] = entry(name)
        if name in group_subtasks:
            out[name]["subtasks"] = {leaf: entry(leaf) for leaf in _leaves(name, group_subtasks)}
    return out


__all__ = [
    "DEFAULT_METRIC_BY_OUTPUT",
    "LOCAL_GROUP",
    "LOCAL_TASKS",
    "PRIMARY_METRICS",
    "register",
    "run_harness",
    "write_local_tasks",
]
