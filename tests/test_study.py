"""The study runner (src/studies/, python -m src.study): seed statistics, the spec's checks, the summary's
values against the points' own result files, and a killed study that continues without retraining."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from src.eval.curves import depth_at, interpolate
from src.studies import stats
from src.studies.evaluate import CLAIMS
from src.studies.spec import StudySpec, plan_points
from src.studies.summary import summarise
from src.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ statistics
def test_mean_interval_is_students_t():
    iv = stats.mean_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t_{0.975, 2} = 4.302653
    assert iv.mean == pytest.approx(2.0)
    assert iv.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.n == 3
    one = stats.mean_interval([5.0])
    assert one.mean == 5.0 and math.isnan(one.half) and not one.contains(5.0)
    with pytest.raises(ValueError):
        stats.mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError):
        stats.mean_interval([])


def test_paired_difference_uses_common_seeds_and_gives_verdicts():
    ref = {1: 10.0, 2: 20.0, 3: 30.0}
    worse = {1: 11.0, 2: 22.0, 3: 33.1, 4: 99.0}  # seed 4 has no reference: left out
    diff = stats.paired_log_ratio(worse, ref)
    assert diff.n == 3
    assert diff.mean == pytest.approx((math.log(1.1) * 2 + math.log(33.1 / 30)) / 3)
    assert stats.verdict(diff) == "worse"
    assert stats.verdict(stats.paired_log_ratio({1: 9.0, 2: 18.1, 3: 27.0}, ref)) == "better"
    assert stats.verdict(stats.paired_log_ratio({1: 11.0, 2: 18.0, 3: 30.5}, ref)) == "tie"
    assert stats.verdict(stats.paired_log_ratio({1: 11.0}, ref)) == "one seed"
    assert stats.paired_log_ratio({9: 1.0}, ref) is None


# ------------------------------------------------------------------------------------------ the spec
def test_points_are_whole_rows_reference_first_with_the_runners_own_keys():
    rows = {"a": [], "b": ["skip=no_kv"], "c": []}
    spec = StudySpec(name="s", seeds=[7, 8], rows=rows, common=["logger=none"], reference="b")
    points = plan_points(spec.validate())
    assert [p.run_name for p in points] == ["b__s7", "b__s8", "a__s7", "a__s8", "c__s7", "c__s8"]
    assert points[0].train_args("/x") == [
        "run_name=b__s7", "seed=7", "data.seed=7", "paths.log_dir=/x", "resume=auto", "logger=none", "skip=no_kv",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "change, key",
    [
        ({"rows": {}}, "study.rows"),
        ({"rows": {"a__s1": []}}, "study.rows.a__s1"),
        ({"rows": {"a/b": []}}, "study.rows.a/b"),
        ({"rows": {"a": ["seed=3"]}}, "study.rows.a"),
        ({"common": ["paths.log_dir=/tmp"]}, "study.common"),
        ({"common": ["hydra.run.dir=/tmp"]}, "study.common"),
        ({"rows": {"a": ["noequals"]}}, "study.rows.a"),
        ({"seeds": [1, 1]}, "study.seeds"),
        ({"seeds": []}, "study.seeds"),
        ({"reference": "zzz"}, "study.reference"),
        ({"max_tokens": 0}, "study.max_tokens"),
        ({"jobs": 0}, "study.jobs"),
        ({"taus": [1.5]}, "study.taus"),
        ({"heldout": []}, "study.heldout"),
        ({"against": {"a": "zzz"}}, "study.against.a"),
        ({"against": {"a": "a"}}, "study.against.a"),
        ({"axis": {"zzz": 1.0}}, "study.axis.zzz"),
        ({"axis": {"a": 1.0}}, "study.axis_label"),
        ({"speed": {"promts": 2}}, "study.speed.promts"),
        ({"speed": {"taus": [0.5]}}, "study.speed.taus"),
        ({"speed": {"rounds": 0}}, "study.speed.rounds"),
        ({"evaluate": {"n_per_tsk": 5}}, "study.evaluate.n_per_tsk"),
        ({"evaluate": {"n_per_task": 0}}, "study.evaluate.n_per_task"),
        ({"evaluate": {"tau": 0.5}}, "study.evaluate.tau"),
        ({"evaluate": {"tasks": ["no_such_task_here"]}}, "study.evaluate.tasks"),
        ({"evaluate": {}, "evaluate_rows": ["b"]}, "study.evaluate_rows"),
        ({"evaluate_rows": ["a"]}, "study.evaluate_rows"),
    ],
)
def test_bad_specs_are_refused_naming_the_key(change, key):
    fields = {"name": "s", "rows": {"a": []}, **change}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("/", "/")):
        StudySpec(**fields).validate()


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "study").glob("*.yaml")))
def test_every_study_file_composes_and_validates(name):
    """Each conf/study file goes through the study schema and its checks (rows, reference, axis, against)."""
    from hydra import compose, initialize_config_dir

    from src.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        spec = OmegaConf.to_object(compose("study", overrides=[f"study={name}"]).study).validate()
    assert spec.name == name and spec.rows
    assert set(spec.axis) <= set(spec.rows) and (spec.reference is None or spec.reference in spec.rows)


# ------------------------------------------------------------------------------------------ the summary
def _result(row, seed, ppl, skipped):
    sets = {n: {"ppl": ppl[i], "layers_skipped": skipped[i]} for i, n in enumerate(("lee", "wiki"))}
    return {
        "row": row,
        "seed": seed,
        "sets": sets,
        "val": {"val/ppl": ppl[0] + 1, "val/base_ppl": 2.0, "val/layers_skipped_mean": 2.0},
    }


def test_summary_means_intervals_and_paired_changes():
    spec = StudySpec(
        name="s", seeds=[1, 2, 3], rows={"full": [], "abl": []}, reference="full", heldout=["lee", "wiki"]
    )
    results = [
        _result("full", 1, [10, 20], [2.0, 3.0]),
        _result("full", 2, [12, 22], [2.2, 3.2]),
        _result("full", 3, [11, 21], [2.4, 3.4]),
        _result("abl", 1, [20, 20.5], [2.0, 3.0]),
        _result("abl", 2, [24, 21.5], [2.0, 3.0]),
        _result("abl", 3, [22, 21.6], [2.0, 3.0]),
    ]
    base = {"sets": {"lee": {"ppl": 9.0}, "wiki": {"ppl": 18.0}}}
    out = summarise(spec, results, base)
    full, abl = out["rows"]
    assert full["sets"]["lee"]["ppl"]["mean"] == pytest.approx(11.0)
    assert full["sets"]["lee"]["ppl"]["half"] == pytest.approx(stats.mean_interval([10, 12, 11]).half)
    assert full["sets"]["wiki"]["layers_skipped"]["mean"] == pytest.approx(3.2)
    assert "vs_comparison" not in full["sets"]["lee"]
    lee = abl["sets"]["lee"]["vs_comparison"]
    assert lee["mean"] == pytest.approx(1.0) and lee["verdict"] == "worse"  # exactly twice the reference
    assert abl["sets"]["wiki"]["vs_comparison"]["verdict"] == "tie"
    assert abl["val"]["ppl_ratio"]["mean"] == pytest.approx(23.0 / 2)
    assert abl["val"]["layers_skipped"] == {"mean": 2.0, "half": 0.0, "low": 2.0, "high": 2.0, "n": 3}
    assert out["base"] == {"lee": 9.0, "wiki": 18.0}


def _speed_record(row, seed, speedups, static=0):
    """A speed record (src/studies/speed.py) timing `speedups` {tau or None: speedup} on lee's text."""
    systems = [{"tau": t, "kind": "flexidepth" if t is not None else "layer_replacement",
                "speed": {"text_b1@lee": {"speedup_wall": x, "speedup_cpu": x, "tokens_per_s": 1.0}}}
               for t, x in speedups.items()]  # fmt: skip
    return {"row": row, "seed": seed, "modes": ["text_b1@lee"], "static_layers": static, "systems": systems}


def _curve_result(row, seed, ppls, skipped):
    """A held-out result whose curve holds ppls {tau: ppl} on lee (own tau 0.5, or the static point's)."""
    curve = [{"tau": t, "sets": {"lee": {"ppl": p, "layers_skipped": skipped[t]}}} for t, p in ppls.items()]
    own = next(c for c in curve if c["tau"] == 0.5)
    return {"row": row, "seed": seed, "tau": 0.5, "sets": own["sets"], "curve": curve, "val": {}}


def _eval_record(seed, retention, rho, verdict):
    claims = {
        "layers_rise_with_uncertainty": {"value": rho, "ci": [rho - 0.01, rho + 0.01], "verdict": verdict}
    }
    return {"seed": seed, "retention": {"value": retention, "interval": None}, "claims": claims}


def test_evaluation_records_summarised_per_row_with_retention_against_the_reference():
    spec = StudySpec(name="s", seeds=[1, 2], rows={"full": [], "ce": []}, reference="full", heldout=["lee"],
                     evaluate={}, evaluate_rows=["full", "ce"])  # fmt: skip
    results = [_result(row, seed, (10.0, 10.0), (2.0, 2.0)) for row in ("full", "ce") for seed in (1, 2)]
    for r in results:
        r["sets"] = {"lee": r["sets"]["lee"]}
    evals = {
        "full__s1": _eval_record(1, 1.00, -0.20, "reversed"),
        "full__s2": _eval_record(2, 0.98, -0.24, "reversed"),
        "ce__s1": _eval_record(1, 0.90, 0.05, "holds"),
        "ce__s2": _eval_record(2, 0.85, -0.01, "not shown"),
    }
    out = summarise(spec, results, {"sets": {"lee": {"ppl": 9.0}}}, None, evals)
    full, ce = out["rows"]
    assert full["evaluate"]["retention"]["mean"] == pytest.approx(0.99)
    assert full["evaluate"]["retention_vs_reference"] is None  # the reference itself
    change = ce["evaluate"]["retention_vs_reference"]
    want = (math.log(0.90 / 1.00) + math.log(0.85 / 0.98)) / 2
    assert change["mean"] == pytest.approx(math.exp(want) - 1) and change["n"] == 2
    claim = ce["evaluate"]["claims"]["layers_rise_with_uncertainty"]
    assert claim["value"]["mean"] == pytest.approx(0.02) and claim["verdicts"] == {"holds": 1, "not shown": 1}
    assert full["evaluate"]["claims"]["layers_rise_with_uncertainty"]["verdicts"] == {"reversed": 2}
    from src.render.study import markdown

    text = markdown(out)
    assert "| full | 2 | 0.990 ± " in text and "(reversed x2)" in text


def test_an_evaluation_without_readable_results_is_refused_naming_its_folder(tmp_path):
    from src.studies.evaluate import EvalStage
    from src.studies.spec import Point

    stage = EvalStage(StudySpec(name="s", rows={"a": []}, evaluate={}), tmp_path)
    point = Point("a", 1, ())
    out = tmp_path / "evaluate" / "a__s1"
    out.mkdir(parents=True)
    (out / "results.json").write_text('{"retention": {"retention": 0.9}}')
    with pytest.raises(
        ValueError,
        match=r"a__s1: the evaluation left no readable results \(FileNotFoundError.*analysis\.json",
    ):
        stage.record(point)  # no analysis.json
    (out / "analysis.json").write_text('{"claims": {}}')
    with pytest.raises(ValueError, match=r"a__s1: .*KeyError"):
        stage.record(point)
    assert not stage.record_path(point).exists()


def test_summaries_written_while_a_study_trains_again_keep_earlier_timings_and_evaluations(
    tmp_path, monkeypatch
):
    """A continued study rewrites its summary after every measured point while it trains: the speed and
    evaluation records of points timed / evaluated at an earlier start (current settings) stay in it; a record
    made with other settings does not."""
    from src.studies import runner
    from src.studies.evaluate import EvalStage
    from src.studies.speed import SpeedMeter

    spec = StudySpec(name="s", seeds=[1], rows={"full": [], "abl": []}, reference="full", heldout=["lee"],
                     speed={}, evaluate={"tasks": ["add_choice"], "n_per_task": 8},
                     evaluate_rows=["full", "abl"])  # fmt: skip
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "base.json").write_text(json.dumps({"sets": {"lee": {"ppl": 9.0}}}))
    (tmp_path / "speed").mkdir()
    (tmp_path / "evaluate").mkdir()
    timer, stage = SpeedMeter(spec, tmp_path), EvalStage(spec, tmp_path)
    for row, settings in (("full", timer.record_settings), ("abl", {"rounds": 99})):
        record = {**_speed_record(row, 1, {0.5: 1.10 if row == "full" else 1.2}), "settings": settings}
        (tmp_path / "speed" / f"{row}__s1.json").write_text(json.dumps(record))
    record = {**_eval_record(1, 0.97, -0.2, "reversed"), "settings": stage.settings, "row": "full"}
    (tmp_path / "evaluate" / "full__s1.json").write_text(json.dumps(record))
    results = {
        f"{row}__s1": _curve_result(row, 1, {0.5: ppl}, {0.5: 2.0})
        for row, ppl in (("full", 10.0), ("abl", 11.0))
    }

    class Meter:  # the held-out measurement, without a model
        def __init__(self, spec, study_dir):
            pass

        def result_path(self, point):
            return tmp_path / "results" / f"{point.run_name}.json"

        def is_current(self, path, point=None):
            return True

        def measure(self, point, folder):
            return results[point.run_name]

    seen = []

    def train_points(spec, study_dir, points, state, on_trained, say):
        for point in points:
            on_trained(point)
            seen.append(json.loads((tmp_path / "summary.json").read_text()))
        return list(points)  # nothing finished: no evaluation or speed stage runs

    monkeypatch.setattr(runner, "HeldoutMeter", Meter)
    monkeypatch.setattr(runner, "train_points", train_points)
    with pytest.raises(Exception, match="2 point"):
        runner.run_study(spec, tmp_path, say=lambda _: None)
    for summary in seen:
        full = summary["rows"][0]
        assert full["speed"]["text_b1@lee"]["mean"] == pytest.approx(1.10)
        assert full["evaluate"]["retention"]["mean"] == pytest.approx(0.97)
        assert summary["not_timed"] == ["abl__s1"]  # its record has other settings
        assert summary["not_evaluated"] == ["abl__s1"]
    assert "speed" not in seen[-1]["rows"][1]


def test_depth_at_inverts_interpolate_and_refuses_outside_the_curve():
    points = [(1.0, 10.0), (2.0, 12.0), (4.0, 16.0)]
    for k in (1.0, 1.5, 3.2, 4.0):
        assert depth_at(points, interpolate(points, k)) == pytest.approx(k)
    assert depth_at(points, 9.0) is None and depth_at(points, 17.0) is None
    assert depth_at([(2.0, 12.0)], 12.0) == 2.0 and depth_at([(2.0, 12.0)], 13.0) is None


def test_at_equal_speed_interpolates_the_curve_that_reaches_and_a_static_row_is_one_point():
    """routed (a threshold curve) against static (one point): the routed curve is read at the static point's
    measured speedup; hybrid against routed: routed's curve at hybrid's own speedup; the frontier keeps the
    points no other point beats in both speed and ppl, with the routed share of their skipped layers."""
    spec = StudySpec(name="s", seeds=[1, 2], rows={"routed": [], "static": [], "hybrid": []}, reference="routed",
                     heldout=["lee"], taus=[0.3, 0.7], against={"static": "routed"}, speed={})  # fmt: skip
    results, speeds = [], {}
    for seed, shift in ((1, 1.0), (2, 1.1)):
        ppls = {0.3: 10.0 * shift, 0.5: 12.0 * shift, 0.7: 16.0 * shift}
        results.append(_curve_result("routed", seed, ppls, {0.3: 1.0, 0.5: 2.0, 0.7: 4.0}))
        speeds[f"routed__s{seed}"] = _speed_record("routed", seed, {0.3: 1.05, 0.5: 1.10, 0.7: 1.20})
        static = _curve_result(
            "static", seed, dict.fromkeys((0.3, 0.5, 0.7), 15.0 * shift), dict.fromkeys((0.3, 0.5, 0.7), 3.0)
        )
        results.append(static)
        speeds[f"static__s{seed}"] = _speed_record("static", seed, {None: 1.15}, static=3)
        hyb = {0.3: 11.0 * shift, 0.5: 13.0 * shift, 0.7: 17.0 * shift}
        results.append(_curve_result("hybrid", seed, hyb, {0.3: 2.0, 0.5: 3.0, 0.7: 4.0}))
        speeds[f"hybrid__s{seed}"] = _speed_record(
            "hybrid", seed, {0.3: 1.10, 0.5: 1.15, 0.7: 1.25}, static=1
        )
    base = {"sets": {"lee": {"ppl": 9.0}}}
    out = summarise(spec, results, base, speeds)
    rows = {r["row"]: r for r in out["rows"]}
    # static at 1.15x: routed's curve between 1.10 (12) and 1.20 (16), halfway in log ppl: sqrt(12 * 16)
    want = math.log(15.0 / math.sqrt(12.0 * 16.0))
    assert rows["static"]["sets"]["lee"]["at_equal_speed"]["mean"] == pytest.approx(math.exp(want) - 1)
    assert rows["static"]["sets"]["lee"]["at_equal_speed"]["n"] == 2
    # hybrid at its own 1.15x (ppl 13): the same reading of routed's curve
    assert rows["hybrid"]["sets"]["lee"]["at_equal_speed"]["mean"] == pytest.approx(
        13.0 / math.sqrt(12.0 * 16.0) - 1
    )
    assert rows["static"]["speed"]["text_b1@lee"]["mean"] == pytest.approx(1.15)
    # time saved per skipped layer: static 3 layers at 1.15x, routed 2 layers at 1.10x (its own tau 0.5)
    lee_static = rows["static"]["sets"]["lee"]
    assert lee_static["saving_per_layer"]["mean"] == pytest.approx((1 - 1 / 1.15) / 3)
    assert rows["routed"]["sets"]["lee"]["saving_per_layer"]["mean"] == pytest.approx((1 - 1 / 1.10) / 2)
    # break-even: routed reaches static's ppl (15, 16.5 at seed 2) between 2 (12) and 4 (16) layers skipped
    depth = 2 + 2 * (math.log(15.0) - math.log(12.0)) / (math.log(16.0) - math.log(12.0))
    assert lee_static["break_even"]["required"]["mean"] == pytest.approx((1 - 1 / 1.15) / depth)
    assert lee_static["break_even"]["required"]["n"] == 2
    assert lee_static["break_even"]["measured"]["mean"] == pytest.approx((1 - 1 / 1.10) / 2)
    assert "break_even" not in rows["routed"]["sets"]["lee"]  # the reference has no comparison row
    assert out["against"] == {"static": "routed", "hybrid": "routed"}
    lee = out["frontier"]["lee"]
    point = {(p["row"], p["tau"]): p for p in lee["points"]}
    assert point[("static", None)]["routed_share"] == 0.0
    assert point[("hybrid", 0.7)]["routed_share"] == pytest.approx(0.75)  # 4 skipped, 1 static
    assert point[("routed", 0.5)]["ppl"] == pytest.approx(math.sqrt(12.0 * 13.2))  # geometric over seeds
    best = [(p["row"], p["tau"]) for p in lee["best"]]
    # hybrid 0.3 (1.10x, 11.5) beats routed 0.5 (1.10x, 12.6); hybrid 0.5 (1.15x, 13.6) beats static (1.15x, 15.7)
    assert best == [("routed", 0.3), ("hybrid", 0.3), ("hybrid", 0.5), ("routed", 0.7), ("hybrid", 0.7)]


# ------------------------------------------------------------------------------------------ end to end
def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _study(folder: Path, *extra, wait=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("FLEXIDEPTH_TRACEBACK", None)
    cmd = [sys.executable, "-m", "src.study", "study=tiny", f"hydra.run.dir={folder}", *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_study_end_to_end_killed_and_continued(tmp_path):
    folder = tmp_path / "study"
    # start, and stop the study with SIGTERM once the first point is measured (the second is training then)
    proc = _study(folder, wait=False)
    state = folder / "study.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (folder / "summary.json").is_file():  # the first point trained and measured
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    os.kill(
        proc.pid, signal.SIGTERM
    )  # the runner alone, as `kill` or a scheduler does: it stops its children
    assert proc.wait(timeout=120) == 143, proc.stdout.read()
    orphans = subprocess.run(
        ["pgrep", "-f", f"paths.log_dir={folder}"], capture_output=True, text=True
    ).stdout
    assert orphans == "", orphans
    first = json.loads(state.read_text())["points"]
    finished = [name for name, rec in first.items() if rec["state"] == "trained"]
    assert finished == ["full__s1"]
    early = json.loads((folder / "summary.json").read_text())  # written after every measured point
    assert early["missing"] == ["full__s2", "no_kv__s1", "no_kv__s2"]
    assert [r["seeds"] for r in early["rows"]] == [[1], []]
    runs = folder / "train" / "runs"
    before = _tree(runs / "full__s1")

    # study.train=false: the finished point measured and timed, nothing trained, the rest listed as missing
    res = _study(folder, "study.train=false")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "4 points, 1 trained, 3 not trained (study.train=false)" in res.stdout
    partial = json.loads((folder / "summary.json").read_text())
    assert partial["missing"] == partial["not_timed"] == ["full__s2", "no_kv__s1", "no_kv__s2"]
    assert [p.name for p in (folder / "speed").iterdir()] == ["full__s1.json"]
    timed_first = (folder / "speed" / "full__s1.json").read_bytes()
    assert partial["not_evaluated"] == ["full__s2"]  # study.evaluate_rows: [full]
    evaluated_first = (folder / "evaluate" / "full__s1.json").read_bytes()
    assert _tree(runs / "full__s1") == before

    res = _study(folder)  # continues: 3 points left, the finished one untouched
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "4 points, 1 trained, 3 to train" in res.stdout
    assert _tree(runs / "full__s1") == before

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["failed"] == [] and summary["missing"] == []
    results = {p.stem: json.loads(p.read_text()) for p in (folder / "results").glob("*__s*.json")}
    assert sorted(results) == ["full__s1", "full__s2", "no_kv__s1", "no_kv__s2"]
    for row in summary["rows"]:
        for name in ("lee", "python_docs"):
            ppl = [results[f"{row['row']}__s{s}"]["sets"][name]["ppl"] for s in (1, 2)]
            assert row["sets"][name]["ppl"]["mean"] == pytest.approx(sum(ppl) / 2, rel=1e-12)
            assert row["sets"][name]["ppl"]["half"] == pytest.approx(stats.mean_interval(ppl).half, rel=1e-12)
        # the point's result file holds what its run folder's metrics.json says
        for s in (1, 2):
            metrics = json.loads((runs / f"{row['row']}__s{s}" / "metrics.json").read_text())["metrics"]
            assert results[f"{row['row']}__s{s}"]["val"]["val/ppl"] == metrics["val/ppl"]
    no_kv = summary["rows"][1]["sets"]["lee"]["vs_comparison"]
    ratio = [
        math.log(results[f"no_kv__s{s}"]["sets"]["lee"]["ppl"] / results[f"full__s{s}"]["sets"]["lee"]["ppl"])
        for s in (1, 2)
    ]
    assert no_kv["mean"] == pytest.approx(math.exp(sum(ratio) / 2) - 1, rel=1e-9)
    assert "| no_kv | 2 |" in (folder / "summary.md").read_text()
    assert (folder / "summary.png").stat().st_size > 1000
    assert (folder / "tau_curve.png").stat().st_size > 1000
    # its own tau 0.5 and the study's 0.3, 0.7; the reference row (full) also at study.reference_taus (0.9)
    assert [p["tau"] for p in results["full__s1"]["curve"]] == [0.3, 0.5, 0.7, 0.9]
    assert [p["tau"] for p in results["no_kv__s1"]["curve"]] == [0.3, 0.5, 0.7]
    assert "at equal held-out layers skipped" in (folder / "summary.md").read_text()

    # random routes at each point's learned rates, with its adapters (study.random_control)
    for row in summary["rows"]:
        rnd = [results[f"{row['row']}__s{s}"]["random"]["sets"]["lee"]["ppl"] for s in (1, 2)]
        assert row["sets"]["lee"]["random"]["ppl"]["mean"] == pytest.approx(sum(rnd) / 2, rel=1e-12)
    assert "Learned routes against random routes" in (folder / "summary.md").read_text()

    # the speed stage: every point timed after the trainings, at its own and the study's thresholds
    assert summary["not_timed"] == []
    timed = {p.stem: json.loads(p.read_text()) for p in (folder / "speed").glob("*.json")}
    assert sorted(timed) == sorted(results)
    assert (folder / "speed" / "full__s1.json").read_bytes() == timed_first  # timed once, not again
    for name, rec in timed.items():
        assert [x["tau"] for x in rec["systems"]] == [0.3, 0.5, 0.7] and rec["static_layers"] == 0
        assert rec["modes"] == ["decode_b1", "text_b1@lee", "text_b1@python_docs"]
        assert all(x["speed"][m]["speedup_wall"] > 0 for x in rec["systems"] for m in rec["modes"])
    for row in summary["rows"]:
        own = [
            timed[f"{row['row']}__s{s}"]["systems"][1]["speed"]["text_b1@lee"]["speedup_wall"] for s in (1, 2)
        ]
        assert row["speed"]["text_b1@lee"]["mean"] == pytest.approx(sum(own) / 2, rel=1e-12)
    assert "at_equal_speed" in summary["rows"][1]["sets"]["lee"]  # no_kv against full

    # the evaluation stage: src.eval on the full row's points; the summary holds their own files' values
    assert summary["not_evaluated"] == []
    assert sorted(p.name for p in (folder / "evaluate").glob("*.json")) == ["full__s1.json", "full__s2.json"]
    assert (folder / "evaluate" / "full__s1.json").read_bytes() == evaluated_first  # evaluated once
    ev = summary["rows"][0]["evaluate"]
    own = {s: json.loads((folder / "evaluate" / f"full__s{s}" / "results.json").read_text()) for s in (1, 2)}
    analyses = {
        s: json.loads((folder / "evaluate" / f"full__s{s}" / "analysis.json").read_text()) for s in (1, 2)
    }
    assert own[1]["ckpt_path"].startswith(str(runs / "full__s1"))
    assert own[1]["settings"]["n_per_task"] == 8 and own[1]["settings"]["tasks"] == [
        "add_choice",
        "copy_choice",
    ]
    retention = [own[s]["retention"]["retention"] for s in (1, 2)]
    assert None not in retention  # the tiny base scores above 0 on both tasks at 8 examples
    assert ev["retention"]["mean"] == pytest.approx(sum(retention) / 2, rel=1e-12)
    for name, (key, _) in CLAIMS.items():
        values = [analyses[s]["claims"][name][key] for s in (1, 2)]
        claim = ev["claims"][name]
        if None in values:  # e.g. no Spearman when every token used every layer
            assert claim["value"] is None or claim["value"]["n"] < 2
        else:
            assert claim["value"]["mean"] == pytest.approx(sum(values) / 2, rel=1e-12, abs=1e-12)
        verdicts = sorted(analyses[s]["claims"][name]["verdict"] for s in (1, 2))
        assert sorted(v for v, n in claim["verdicts"].items() for _ in range(n)) == verdicts
    assert "evaluate" not in summary["rows"][1]  # no_kv is not an evaluated row
    assert "Task suite and what the router learned" in (folder / "summary.md").read_text()
    assert len(summary["frontier"]["lee"]["points"]) == 2 * 3  # 2 rows x 3 thresholds
    assert (folder / "frontier.png").stat().st_size > 1000
    assert (folder / "axis.png").stat().st_size > 1000  # study.axis: the sweep figure
    assert "at equal measured speed" in (folder / "summary.md").read_text()

    # a third start trains and measures nothing: every file of the study byte-identical but its summary
    everything = _tree(folder)
    res = _study(folder)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 points, 4 trained, 0 to train" in res.stdout
    after = _tree(folder)
    changed = {k for k in everything if everything[k] != after.get(k)}
    assert changed <= {
        "summary.json",
        "summary.md",
        "summary.png",
        "tau_curve.png",
        "frontier.png",
        "study.log",
    }, changed


def test_at_equal_skip_interpolates_each_row_at_the_reference_depth_of_its_seed():
    spec = StudySpec(name="s", seeds=[1, 2], rows={"full": [], "abl": []}, reference="full", heldout=["lee"])
    spec.taus = [0.3, 0.7]

    def point(row, seed, curve):  # curve: (tau, layers skipped, ppl); the own tau is 0.5
        pts = [{"tau": t, "sets": {"lee": {"ppl": p, "layers_skipped": k}}} for t, k, p in curve]
        own = next(p for p in pts if p["tau"] == 0.5)
        return {"row": row, "seed": seed, "sets": own["sets"], "curve": pts, "val": {}}

    results = [
        point("full", 1, [(0.3, 1.0, 10.0), (0.5, 2.0, 12.0), (0.7, 3.0, 15.0)]),
        point("full", 2, [(0.3, 1.5, 10.0), (0.5, 2.5, 13.0), (0.7, 3.5, 16.0)]),
        # skips more at its own tau; at the reference's depth (2.0 / 2.5) its curve gives 11 and 14
        point("abl", 1, [(0.3, 1.0, 9.0), (0.5, 3.0, 13.444444444444445), (0.7, 4.0, 20.0)]),
        point("abl", 2, [(0.3, 2.0, 12.0), (0.5, 3.0, 16.333333333333332), (0.7, 4.0, 20.0)]),
    ]
    out = summarise(spec, results, {"sets": {"lee": {"ppl": 9.0}}})
    cell = out["rows"][1]["sets"]["lee"]["at_equal_skip"]
    expect_1 = math.exp(math.log(9.0) + 0.5 * (math.log(13.444444444444445) - math.log(9.0)))  # at k = 2.0
    expect_2 = math.exp(math.log(12.0) + 0.5 * (math.log(16.333333333333332) - math.log(12.0)))  # at k = 2.5
    want = (math.log(expect_1 / 12.0) + math.log(expect_2 / 13.0)) / 2
    assert cell["n"] == 2
    assert cell["mean"] == pytest.approx(math.exp(want) - 1, rel=1e-12)
    # the own-threshold comparison differs: it mixes in the extra depth
    assert out["rows"][1]["sets"]["lee"]["vs_comparison"]["mean"] > cell["mean"]
    # a seed where neither curve reaches the other's depth is left out, never extrapolated
    results[3] = point("abl", 2, [(0.3, 3.6, 15.0), (0.5, 3.8, 16.0), (0.7, 4.0, 20.0)])
    out = summarise(spec, results, {"sets": {"lee": {"ppl": 9.0}}})
    assert out["rows"][1]["sets"]["lee"]["at_equal_skip"]["n"] == 1
    assert sorted(out["curves"]) == ["abl__s1", "abl__s2", "full__s1", "full__s2"]


def test_at_equal_skip_of_a_static_row_reads_its_comparison_rows_curve_at_the_static_depth():
    """A static row is one point per seed (every threshold at one depth): its curve cannot be read at the
    comparison point's depth, so its own point is compared with the comparison row's curve at its depth, and
    the comparison row is `study.against`'s, not the reference."""
    from src.render.study import markdown

    spec = StudySpec(
        name="s", seeds=[1, 2], rows={"routed_k2": [], "routed_k4": [], "static_k4": []},
        reference="routed_k2", against={"static_k4": "routed_k4"}, heldout=["lee"],
    )  # fmt: skip
    spec.taus = [0.3, 0.7]

    def point(row, seed, curve):
        pts = [{"tau": t, "sets": {"lee": {"ppl": p, "layers_skipped": k}}} for t, k, p in curve]
        return {"row": row, "seed": seed, "sets": pts[1]["sets"], "curve": pts, "val": {}}

    results = [
        point("routed_k2", 1, [(0.3, 0.5, 9.0), (0.5, 1.0, 9.5), (0.7, 2.0, 11.0)]),
        point("routed_k2", 2, [(0.3, 0.5, 9.0), (0.5, 1.0, 9.5), (0.7, 2.0, 11.0)]),
        point("routed_k4", 1, [(0.3, 1.0, 10.0), (0.5, 2.0, 12.0), (0.7, 3.0, 15.0)]),
        point("routed_k4", 2, [(0.3, 1.5, 10.0), (0.5, 2.5, 13.0), (0.7, 3.5, 16.0)]),
        point("static_k4", 1, [(t, 2.5, 14.0) for t in (0.3, 0.5, 0.7)]),
        point("static_k4", 2, [(t, 3.0, 15.0) for t in (0.3, 0.5, 0.7)]),
    ]
    out = summarise(spec, results, {"sets": {"lee": {"ppl": 8.0}}})
    static = out["rows"][2]["sets"]["lee"]
    # routed_k4's curve at 2.5 (seed 1): between (2, 12) and (3, 15); at 3.0 (seed 2): between (2.5, 13), (3.5, 16)
    want = (math.log(14.0 / math.sqrt(12.0 * 15.0)) + math.log(15.0 / math.sqrt(13.0 * 16.0))) / 2
    assert static["at_equal_skip"]["n"] == 2
    assert static["at_equal_skip"]["mean"] == pytest.approx(math.exp(want) - 1, rel=1e-12)
    # at the own threshold: against routed_k4's own points (12, 13), not the reference routed_k2's
    own = (math.log(14.0 / 12.0) + math.log(15.0 / 13.0)) / 2
    assert static["vs_comparison"]["mean"] == pytest.approx(math.exp(own) - 1, rel=1e-12)
    assert "vs_comparison" not in out["rows"][0]["sets"]["lee"]  # the reference has no comparison row
    # routed_k4 (no `against` entry) is compared with the reference: seed 1 its curve at the reference's 1.0
    # (10.0 against 9.5); seed 2 neither (its curve starts at 1.5, routed_k2's ends at 2.0 < 2.5): left out
    cell = out["rows"][1]["sets"]["lee"]["at_equal_skip"]
    assert cell["n"] == 1 and cell["mean"] == pytest.approx(10.0 / 9.5 - 1, rel=1e-12)
    # the static point's depth beyond the comparison curve on every seed: no comparison, never extrapolated
    results[4] = point("static_k4", 1, [(t, 3.2, 14.0) for t in (0.3, 0.5, 0.7)])
    results[5] = point("static_k4", 2, [(t, 4.0, 15.0) for t in (0.3, 0.5, 0.7)])
    out = summarise(spec, results, {"sets": {"lee": {"ppl": 8.0}}})
    assert out["rows"][2]["sets"]["lee"]["at_equal_skip"] is None
    text = markdown(out)
    assert "| row | against | lee |" in text and "| static_k4 | routed_k4 |" in text


def test_reference_taus_change_the_reference_rows_settings_only(tmp_path):
    from src.studies.runner import HeldoutMeter

    def spec(extra):
        return StudySpec(
            name="s",
            seeds=[1],
            reference="full",
            rows={"full": [], "abl": []},
            taus=[0.3],
            reference_taus=extra,
        ).validate()

    before, after = HeldoutMeter(spec([]), tmp_path), HeldoutMeter(spec([0.8, 0.9]), tmp_path)
    full, abl = plan_points(spec([]))
    for point in (full, abl):  # results measured before reference_taus were set
        path = before.result_path(point)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"settings": before.settings_for(point)}))
    assert before.is_current(before.result_path(full), full) and before.is_current(
        before.result_path(abl), abl
    )
    assert after.settings_for(full) == {**before.settings, "reference_taus": [0.8, 0.9]}
    assert not after.is_current(after.result_path(full), full)  # the reference row is measured again
    assert after.is_current(after.result_path(abl), abl)  # every other row keeps its result
    assert after.settings_for(None) == before.settings  # the base's result too
    with pytest.raises(ConfigError, match=r"^study\.reference_taus: 1\.2 is not a threshold"):
        spec([1.2])
    with pytest.raises(ConfigError, match=r"^study\.reference_taus is set but study\.reference is null"):
        StudySpec(name="s", rows={"a": []}, reference_taus=[0.8]).validate()


def test_unknown_heldout_sets_are_refused_before_anything_trains():
    with pytest.raises(Exception, match=r"study\.heldout: unknown held-out set\(s\) \['nope'\]"):
        StudySpec(name="s", rows={"a": []}, heldout=["nope"]).validate()


def test_a_finished_point_trained_with_other_settings_is_refused(tmp_path):
    from src.studies.runner import check_same_settings, run_dir
    from src.utils.errors import UserError

    spec = StudySpec(name="s", seeds=[1], rows={"a": ["skip=no_kv"]}, common=["logger=none"]).validate()
    point = plan_points(spec)[0]
    hydra = run_dir(tmp_path, point) / ".hydra"
    hydra.mkdir(parents=True)
    same = [*point.train_args(str(tmp_path))]
    (hydra / "overrides.yaml").write_text("\n".join(f"- {x}" for x in reversed(same)) + "\n")
    check_same_settings(point, tmp_path)  # the same set in another order passes
    (hydra / "overrides.yaml").write_text("\n".join(f"- {x}" for x in [*same[:-1], "skip=no_adapter"]) + "\n")
    with pytest.raises(
        UserError, match=r"a__s1 was trained with other settings .*skip=no_adapter, skip=no_kv"
    ):
        check_same_settings(point, tmp_path)


@pytest.mark.parametrize(
    "bad", ["study.jobs=0", "study.seeds=[]", "study.heldout=[nope]", "study.nokey=1", "study.jobs=x"]
)
def test_a_refused_study_leaves_its_folder_as_it_was(tmp_path, bad):
    folder = tmp_path / "study"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- study=tiny\n")
    (folder / "study.json").write_text('{"points": {}}')
    before = _tree(folder)
    res = _study(folder, bad)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.count("error: ") == 1 and "Traceback" not in res.stderr
    assert _tree(folder) == before
    if bad in ("study.jobs=0", "study.nokey=1"):  # a value check and a schema refusal: into a new folder too
        fresh = tmp_path / "fresh"
        assert _study(fresh, bad).returncode == 2
        assert not fresh.exists() or not any(fresh.iterdir())
