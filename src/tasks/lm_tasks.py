"""Local lm-evaluation-harness tasks built from the project's own offline generators (no hub data).

`write_local_tasks(folder)` writes two task configs and their JSONL data into `folder` and returns it; pass
it as `include_path` to `lm_eval.tasks.TaskManager` (or `src.eval.harness_run.run_harness`):

| task | output_type | docs | metric |
|---|---|---|---|
| ``flexidepth_mc`` | multiple_choice | "What is a + b?" / "a × b?" with 4 numeric choices | acc (and acc_norm) |
| ``flexidepth_gen`` | generate_until | repeat-a-phrase and addition prompts with one exact answer | exact_match |

and the group ``flexidepth_local`` of both (no aggregate metric: the two metrics differ); both tasks also
carry the tag ``flexidepth_tasks``.

Questions and answers come from `src.tasks.generation.make_task_examples` (arithmetic and repeat tasks over the Lee
held-out articles), so they are deterministic for a seed. Each task has a ``test`` split (evaluated) and a
``train`` split (few-shot examples, drawn with a different seed). The configs use ``dataset_path: json`` with
absolute ``data_files`` paths, which `datasets` loads without any network access. No ``num_fewshot`` is set
in the configs: lm_eval never overrides a config value of 0, so leaving it unset keeps ``num_fewshot=5``
usable (the default is then 0-shot).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from src.tasks.generation import make_task_examples

MC_TASK = "flexidepth_mc"
GEN_TASK = "flexidepth_gen"
LOCAL_GROUP = "flexidepth_local"
LOCAL_TAG = "flexidepth_tasks"
LOCAL_TASKS = (MC_TASK, GEN_TASK)
N_CHOICES = 4
_ANSWER_ONLY = " Answer with the number only."
_GEN_STOPS = ["\n", "Question:"]


def mc_docs(n: int, seed: int) -> list[dict]:
    """`n` arithmetic multiple-choice docs: {"question", "choices" (4 numbers as text), "label"}.

    Addition and multiplication alternate; the three distractors are the answer shifted by small offsets
    (+-1, +-2, +-10), never negative, all distinct; the correct choice's position is drawn uniformly.
    """
    n_add = (n + 1) // 2
    examples = make_task_examples(["addition"], n_add, seed) + make_task_examples(
        ["multiplication"], n - n_add, seed
    )
    examples.sort(key=lambda ex: (ex.index, ex.task))  # interleave the two operations
    rng = random.Random(f"{seed}-{MC_TASK}")
    docs = []
    for ex in examples:
        answer = int(ex.reference)
        offsets = [d for d in (-10, -2, -1, 1, 2, 10) if answer + d >= 0]
        choices = [answer + d for d in rng.sample(offsets, N_CHOICES - 1)]
        label = rng.randrange(N_CHOICES)
        choices.insert(label, answer)
        docs.append(
            {
                "question": ex.prompt.replace(_ANSWER_ONLY, ""),
                "choices": [str(c) for c in choices],
                "label": label,
                "source": ex.uid,
            }
        )
    return docs


def gen_docs(n: int, seed: int) -> list[dict]:
    """`n` generation docs with one exact answer: {"question", "answer"}; repeat and addition alternate."""
    n_rep = (n + 1) // 2
    examples = make_task_examples(["repeat"], n_rep, seed) + make_task_examples(["addition"], n - n_rep, seed)
    examples.sort(key=lambda ex: (ex.index, ex.task))
    return [
        {"question": ex.prompt.replace(_ANSWER_ONLY, ""), "answer": ex.reference, "source": ex.uid}
        for ex in examples
    ]


def task_configs(data: dict[str, dict[str, Path]]) -> dict[str, dict]:
    """The lm_eval task configs, given {task: {split: absolute jsonl path}}."""

    def common(task: str) -> dict:
        return {
            "task": task,
            "tag": [LOCAL_TAG],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {split: str(path) for split, path in data[task].items()}},
            "training_split": "train",
            "fewshot_split": "train",
            "test_split": "test",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "target_delimiter": " ",
            "fewshot_delimiter": "\n\n",
            "metadata": {"version": 1.0},
        }

    return {
        MC_TASK: {
            **common(MC_TASK),
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        },
        GEN_TASK: {
            **common(GEN_TASK),
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": {"until": list(_GEN_STOPS), "max_gen_toks": 32, "do_sample": False},
            "filter_list": [
                {"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
            ],
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": False,
                }
            ],
        },
    }


def write_local_tasks(folder: str | Path, n_test: int = 40, n_train: int = 8, seed: int = 1234) -> Path:
    """Write ``flexidepth_mc``, ``flexidepth_gen`` (YAML + JSONL) and the group ``flexidepth_local`` into
    `folder`; return it (the include_path).

    Same arguments -> byte-identical files. Test docs use `seed`, few-shot (train) docs `seed + 1`, so the
    two splits differ.
    """
    folder = Path(folder).expanduser().resolve()
    data_dir = folder / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    docs = {
        MC_TASK: {"test": mc_docs(n_test, seed), "train": mc_docs(n_train, seed + 1)},
        GEN_TASK: {"test": gen_docs(n_test, seed), "train": gen_docs(n_train, seed + 1)},
    }
    paths: dict[str, dict[str, Path]] = {}
    for task, splits in docs.items():
        for split, rows in splits.items():
            path = data_dir / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            paths.setdefault(task, {})[split] = path
    for task, cfg in task_configs(paths).items():
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    group = {"group": LOCAL_GROUP, "task": list(LOCAL_TASKS), "metadata": {"version": 1.0}}
    (folder / f"{LOCAL_GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return folder


__all__ = [
    "GEN_TASK",
    "LOCAL_GROUP",
    "LOCAL_TASKS",
    "MC_TASK",
    "gen_docs",
    "mc_docs",
    "task_configs",
    "write_local_tasks",
]


def unknown_task_problems(
    tasks: list[str], include_path: str | None = None, key: str = "eval.tasks"
) -> list[str]:
    """Names in `tasks` (the setting `key`) that are neither built-in (generation and multiple-choice tasks),
    nor the project's lm-eval tasks, nor known to lm-eval (with `include_path`'s own task folder); one
    message listing them, [] when all are known."""
    from src.tasks.choice import CHOICE_TASKS
    from src.tasks.generation import TASKS

    builtin = (*TASKS, *CHOICE_TASKS)
    known = set(builtin) | set(LOCAL_TASKS) | {LOCAL_GROUP, LOCAL_TAG}
    rest = [t for t in tasks if t not in known]
    if not rest:
        return []
    from lm_eval.tasks import TaskManager  # indexes lm-eval's tasks (~15 s), still far below a model load

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in rest if t not in manager.all_tasks]
    if not unknown:
        return []
    return [
        f"{key}: unknown task(s) {unknown}; built-in: {sorted(builtin)}, the project's lm-eval tasks: "
        f"{sorted(LOCAL_TASKS)}, or any lm-evaluation-harness task name (`lm-eval ls tasks`)"
    ]
