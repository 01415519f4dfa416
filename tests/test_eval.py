"""Evaluation: task suite (deterministic, exact scoring), retention arithmetic, DepthMap round trip, and an
end-to-end `src.eval` run of a freshly trained tiny checkpoint."""

import json

import pytest

from src.eval.depthmap import load_depthmap, write_depthmap
from src.tasks.generation import (
    TASKS,
    last_integer,
    make_task_examples,
    normalize,
    retention,
    rouge_l_f1,
    score,
    token_f1,
)
from tests.helpers.configs import compose_tiny


# ---------------------------------------------------------------------------------------- retention
def test_retention_arithmetic():
    base = {"repeat": 0.8, "copy": 0.5, "addition": 0.0, "summarize": 0.4}
    flexi = {"repeat": 0.4, "copy": 0.5, "addition": 0.25, "summarize": 0.5}
    out = retention(flexi, base)
    assert out["per_task"] == pytest.approx({"repeat": 0.5, "copy": 1.0, "summarize": 1.25})
    assert out["retention"] == pytest.approx((0.5 + 1.0 + 1.25) / 3)
    assert out["skipped_tasks"] == ["addition"]  # base score 0: ratio undefined, left out
    assert out["interval"] is None  # no per-example scores given: no interval
    empty = retention({"a": 1.0}, {"a": 0.0})
    assert (empty["retention"], empty["per_task"], empty["skipped_tasks"]) == (None, {}, ["a"])


# ---------------------------------------------------------------------------------------- tasks
def test_task_generation_is_deterministic_per_seed():
    a = make_task_examples(TASKS, 4, seed=7)
    b = make_task_examples(TASKS, 4, seed=7)
    c = make_task_examples(TASKS, 4, seed=8)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.to_dict() for e in a] != [e.to_dict() for e in c]
    assert [e.task for e in a] == [t for t in TASKS for _ in range(4)]
    assert len({e.uid for e in a}) == len(a)
    # one task's examples do not depend on which other tasks are asked for
    only = make_task_examples(["addition"], 4, seed=7)
    assert [e.to_dict() for e in only] == [e.to_dict() for e in a if e.task == "addition"]
    with pytest.raises(ValueError, match="unknown eval task"):
        make_task_examples(["nope"], 1, seed=0)


def test_arithmetic_references_are_correct():
    for ex in make_task_examples(["addition", "multiplication"], 10, seed=3):
        a, b = (
            int(x)
            for x in ex.prompt.split("?")[0]
            .replace("What is", "")
            .replace("+", " ")
            .replace("×", " ")
            .split()
        )
        assert int(ex.reference) == (a + b if ex.task == "addition" else a * b)


def test_scoring_is_exact():
    for ex in make_task_examples(TASKS, 3, seed=11):
        assert score(ex.task, ex.reference, ex.reference) == 1.0, ex
    for ex in make_task_examples(["repeat", "copy", "addition", "multiplication"], 3, seed=11):
        assert score(ex.task, "something else entirely 0", ex.reference) == 0.0
    assert score("addition", "12 + 30 = 42", "42") == 1.0
    assert score("addition", "The answer is 1,234.", "1234") == 1.0
    assert score("addition", "43", "42") == 0.0
    assert score("multiplication", "no number", "6") == 0.0
    assert score("repeat", '"go home, go home."', "go home, go home") == 1.0
    assert score("repeat", "go home, go home, go home", "go home, go home") == 0.0
    assert score("copy", "The cat sat.\n\nExtra chatter", "the cat sat") == 1.0
    assert normalize("  \u201cHello   World!\u201d ") == "hello world"
    assert last_integer("a 3 b -12") == -12 and last_integer("none") is None


def test_overlap_metrics():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("dog", "the cat sat") == 0.0
    assert token_f1("the cat", "the cat sat on") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    # LCS("a b c d", "a c d e") = 3: P = 3/4, R = 3/4
    assert rouge_l_f1("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l_f1("d c b a", "a b c d") == pytest.approx(0.25)  # order matters, unlike token F1
    assert token_f1("d c b a", "a b c d") == 1.0


# ---------------------------------------------------------------------------------------- DepthMap
def test_depthmap_round_trip(tmp_path):
    records = [
        {
            "model": "flexidepth",
            "task": task,
            "example_id": f"{task}-0",
            "segment": seg,
            "position": i,
            "token_id": 100 + i,
            "token": f"Ġtok{i}",
            "text": f" tok{i}",
            "layers_used": 2 + i % 3,
            "gates": [0.25 * (i % 4), 0.5, 0.875],
            "run": [i % 2 == 0, True, False],
            "base_entropy": None if i == 0 else 0.5 * i,  # exact in float32
            "base_loss": None if i == 0 else 0.25 * i,
        }
        for i, (task, seg) in enumerate(
            [("copy", "prompt"), ("copy", "generated"), ("addition", "generated")]
        )
    ]
    path = write_depthmap(records, tmp_path / "depthmap.parquet", layer_indices=[2, 3, 4], num_layers=5)
    ds = load_depthmap(path)
    assert len(ds) == 3
    assert ds.to_list() == records  # gates are exact in float32 here

    # a file written before base_entropy / base_loss were recorded loads with them null
    import pyarrow.parquet as pq

    old = tmp_path / "old.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["base_entropy", "base_loss"]), old)
    rows = load_depthmap(old).to_list()
    assert [r["base_entropy"] for r in rows] == [None] * 3 and [r["base_loss"] for r in rows] == [None] * 3
    assert [r["gates"] for r in rows] == [r["gates"] for r in records]
    with pytest.raises(FileNotFoundError, match="no DepthMap file"):
        load_depthmap(tmp_path / "missing.parquet")


# ---------------------------------------------------------------------------------------- end to end
def test_evaluate_tiny_checkpoint_end_to_end(tmp_path, capsys):
    from src.train import train
    from tests.test_train import compose_cfg

    train(compose_cfg(["debug=tiny", "logger=none"], tmp_path / "train"))
    assert (tmp_path / "train" / "flexidepth" / "flexidepth_config.json").is_file()

    cfg = compose_tiny(
        "evaluate",
        [
            f"ckpt_path={tmp_path / 'train'}",  # a run folder: its flexidepth/ is used
            "eval.tasks=[repeat,copy,addition,multiplication,continue,summarize,next_sentence,add_choice]",
            "eval.n_per_task=2",
            "eval.max_new_tokens=4",
            "eval.ppl_max_articles=2",
            "eval.ppl_max_length=64",
            "eval.tau=0.99",  # above every fresh gate (sigmoid(3) = 0.953): routed layers are skipped
        ],
        tmp_path / "eval",
    )
    out = tmp_path / "eval"
    from src.eval.__main__ import run

    run(cfg)
    printed = capsys.readouterr().out.splitlines()  # the main table and the folder are printed (issue 13)
    assert printed[-1] == f"results in {out} (results.md, results.json, depthmap.html)"
    assert any(line.startswith("held-out ppl: base ") and " flexidepth " in line for line in printed)
    assert any(line.startswith("repeat ") and "exact" in line for line in printed)
    for name in ("results.json", "results.md", "completions.jsonl", "depthmap.parquet", "depthmap.html"):
        assert (out / name).is_file(), name
    for png in ("layer_run_fraction.png", "layer_position_heatmap.png", "task_depth.png"):
        assert (out / png).stat().st_size > 1000, png

    res = json.loads((out / "results.json").read_text())
    assert res["num_layers"] == 4 and res["routed_layers"] == [2, 3]
    assert set(res["tasks"]) == {"base", "flexidepth"}
    suite = [*TASKS, "next_sentence", "add_choice"]
    for system in ("base", "flexidepth"):
        assert sorted(res["tasks"][system]) == sorted(suite)
        for task in suite:
            t = res["tasks"][system][task]
            assert {"score", "metric", "n", "layers_used_prompt", "layers_used_generated"} <= set(t)
            assert 0.0 <= t["score"] <= 1.0 and t["n"] == 2
            assert 0.0 <= t["ci_low"] <= t["score"] <= t["ci_high"] <= 1.0
            # 0/1 scores get Wilson; F1 / ROUGE-L a bootstrap, unless every score happens to be 0 or 1
            assert t["ci_method"] in (
                ("wilson",) if task not in ("continue", "summarize") else ("wilson", "bootstrap")
            )
        for task in ("next_sentence", "add_choice"):
            t = res["tasks"][system][task]
            assert t["kind"] == "choice" and t["metric"] == "accuracy" and t["chance"] == 0.25
            assert t["layers_used_generated"] is None
        assert res["perplexity"][system]["ppl"] > 1
    # base runs every layer; with tau = 0.99 the FlexiDepth model skips both routed layers
    assert res["layers"]["base"]["layers_used_scored"] == 4.0
    assert res["layers"]["base"]["layers_used_generated"] == 4.0
    assert res["layers"]["flexidepth"]["layers_used_scored"] == pytest.approx(2.0)
    assert res["layers"]["flexidepth"]["layers_skipped_generated"] == pytest.approx(2.0)
    assert res["tasks"]["flexidepth"]["copy"]["layers_used_prompt"] == pytest.approx(2.0)
    assert res["tasks"]["flexidepth"]["add_choice"]["layers_used_choices"] == pytest.approx(2.0)
    assert res["tasks"]["base"]["add_choice"]["layers_used_answer"] == 4.0
    assert res["flops"]["scored"]["layers_skipped_mean"] == pytest.approx(2.0)
    assert 0 < res["flops"]["scored"]["analytic_macs_saved_frac"] < 1
    assert "retention" in res["retention"] and "skipped_tasks" in res["retention"]
    if res["retention"]["retention"] is not None:
        low, high = res["retention"]["interval"]
        assert low <= high
    md = (out / "results.md").read_text()
    assert "| repeat |" in md and "| next_sentence | accuracy | 0.250 | 2 |" in md
    assert "base 95% CI" in md and "score / base 95% CI" in md

    ds = load_depthmap(out / "depthmap.parquet")
    assert len(ds) > 0 and set(ds["task"]) == set(suite)
    assert set(ds["segment"]) == {"prompt", "generated", "choice"}
    row = ds[0]
    assert len(row["gates"]) == 2 and len(row["run"]) == 2
    assert all(u == 2 for u in ds["layers_used"])
    # the base model's entropy / loss: null at each example's position 0, positive elsewhere
    for r in ds:
        if r["position"] == 0:
            assert r["base_entropy"] is None and r["base_loss"] is None
        else:
            assert r["base_entropy"] > 0 and r["base_loss"] > 0
    # the depth analysis ran at the end: every token used 2 layers, so no correlation can be measured
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["n_examples"] == len(set(ds["example_id"]))
    assert analysis["categories"]["prompt"]["mean"] == 2.0 and analysis["categories"]["answer"]["n"] > 0
    assert analysis["categories"]["arithmetic_digit"]["n"] > 0  # addition / add_choice answers
    assert analysis["spearman"]["entropy"]["rho"] is None and analysis["spearman"]["entropy"]["n"] > 0
    assert (out / "analysis.md").is_file() and (out / "analysis_categories.png").stat().st_size > 5000
    assert "categories: " in (out / "depthmap.html").read_text()


@pytest.mark.slow
def test_evaluate_with_lm_eval_tasks_and_a_baseline(tmp_path):
    """eval.tasks mixes the built-in suite with lm-eval tasks (the project's offline ones); retention spans
    both; an early-exit baseline uses 3 of 4 layers on every lm-eval token."""
    from src.eval.__main__ import run
    from src.render.report import scalar_metrics

    cfg = compose_tiny(
        "evaluate",
        [
            "method=early_exit",
            "method.k=1",
            "eval.tasks=[copy,flexidepth_mc,flexidepth_gen]",
            "eval.harness.limit=3",
            "eval.harness.max_gen_toks=4",
            "eval.harness.bootstrap_iters=0",
            "eval.n_per_task=1",
            "eval.max_new_tokens=3",
            "eval.ppl_max_articles=1",
            "eval.ppl_max_length=32",
        ],
        tmp_path,
    )
    res = run(cfg)
    assert set(res["harness"]) == {"base", "early_exit_k1"}
    for system, used in (("base", 4.0), ("early_exit_k1", 3.0)):
        for task in ("flexidepth_mc", "flexidepth_gen"):
            t = res["harness"][system][task]
            assert 0.0 <= t["score"] <= 1.0 and t["n"] == 3
            assert t["layers_used_mean"] == pytest.approx(used)
    assert set(res["retention"]["per_task"]) | set(res["retention"]["skipped_tasks"]) == {
        "copy",
        "flexidepth_mc",
        "flexidepth_gen",
    }
    assert (tmp_path / "lm_tasks").is_dir()
    assert "## lm-evaluation-harness tasks" in (tmp_path / "results.md").read_text()
    assert "eval/early_exit_k1/flexidepth_mc/layers_used" in scalar_metrics(res)
