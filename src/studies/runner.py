"""Run a study: train every point (a subprocess `python -m src.train`, each an ordinary run folder), measure
every trained point on held-out text, and summarise rows across seeds.

    study_dir/
      study.json                     what each point did: trained / failed (+ error, log), seconds
      logs/<row>__s<seed>.log        the training command's output
      train/runs/<row>__s<seed>/     the point's run folder (resumable, exportable: src.train's layout)
      results/base.json              the base model on the held-out sets
      results/<row>__s<seed>.json    the point on the held-out sets (+ its val metrics from metrics.json; with
                                     study.random_control, random routes at its learned per-layer rates)
      evaluate/<row>__s<seed>/       with study.evaluate: its src.eval folder (results.json, analysis.json, ...)
      evaluate/<row>__s<seed>.json   its retention and token-type claims (src/studies/evaluate.py)
      speed/<row>__s<seed>.json      with study.speed: its measured batch-1 decode speedups (src/studies/speed.py)
      summary.json, summary.md, summary.png, tau_curve.png (with study.taus: the reference row's threshold sweep),
      frontier.png (with study.speed: held-out ppl against measured speedup, the best-ppl frontier),
      axis.png (with study.axis: held-out ppl and layers skipped against the swept setting)

With `study.evaluate` the trained points of `study.evaluate_rows` are evaluated with src.eval after the last
training has ended (`study.jobs` at a time). With `study.speed` every trained point is then timed, one point at
a time (a timing never shares the cores with a training or an evaluation of this study; keep other work off the
machine too). `study.train=false` trains nothing: it measures, evaluates, times and summarises the points
finished so far (e.g. the rows a study stopped early has finished).

A killed study continues where it stopped: a point whose run folder records a finished run
(`src.utils.runs.run_finished`) is not trained again, a half-trained point resumes (`resume=auto`), a point
measured with the same held-out settings is not measured again. A failed point is recorded and the others go on;
the next start retries it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_text
from ..utils.runs import RunHistory, run_finished
from .pool import last_error, run_pool
from .spec import Point, StudySpec, plan_points
from .summary import summarise

log = logging.getLogger(__name__)
MIN_TRAINING_SECONDS = 120.0


class StudyState:
    """`<study_dir>/study.json`: {run_name: {"state": "trained" | "failed", "seconds", "error", "log"}},
    rewritten atomically after every change."""

    def __init__(self, study_dir: Path):
        self.path = study_dir / "study.json"
        self.points: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.points = json.loads(self.path.read_text())["points"]
            except (ValueError, KeyError, TypeError) as err:
                from ..utils.errors import UserError

                raise UserError(
                    f"{self.path} is damaged ({type(err).__name__}: {err}); move it aside"
                ) from None

    def set(self, run_name: str, **record: Any) -> None:
        self.points[run_name] = record
        atomic_write_text(self.path, json.dumps({"points": self.points}, indent=2, sort_keys=True))

    def seconds(self) -> list[float]:
        """Training times of the points this study trained (for the expected time left); points that took
        under `MIN_TRAINING_SECONDS` only recorded the end of a run trained before (nothing left to train)."""
        return [
            r["seconds"]
            for r in self.points.values()
            if r.get("state") == "trained" and r.get("seconds", 0) >= MIN_TRAINING_SECONDS
        ]


def run_dir(study_dir: Path, point: Point) -> Path:
    return study_dir / "train" / "runs" / point.run_name


def fmt_duration(seconds: float) -> str:
    m = int(round(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"


def train_points(
    spec: StudySpec,
    study_dir: Path,
    points: list[Point],
    state: StudyState,
    on_trained: Callable[[Point], None] | None = None,
    python: str = sys.executable,
    say: Callable[[str], None] = print,
) -> list[Point]:
    """Train every point whose run folder does not record a finished run, `spec.jobs` at a time; call
    `on_trained(point)` (in this thread) for every point finished before, while the others train, and for each
    as it finishes. Returns the points that failed."""
    todo = [p for p in points if run_finished(run_dir(study_dir, p)) is None]
    for p in points:
        if p not in todo:
            check_same_settings(p, study_dir)
    done = len(points) - len(todo)
    if not spec.train:  # study.train=false: measure (and time) the finished points only
        say(
            f"study {spec.name}: {len(points)} points, {done} trained, {len(todo)} not trained (study.train=false)"
        )
        for p in points:
            if p not in todo and on_trained is not None:
                on_trained(p)
        return []
    say(
        f"study {spec.name}: {len(points)} points, {done} trained, {len(todo)} to train ({spec.jobs} at once)"
    )
    (study_dir / "logs").mkdir(parents=True, exist_ok=True)
    commands = [
        (
            p,
            [python, "-m", "src.train", *p.train_args(str(study_dir))],
            study_dir / "logs" / f"{p.run_name}.log",
        )
        for p in todo
    ]

    def meanwhile() -> None:  # points trained before are measured while the others train
        for p in points:
            if p not in todo and on_trained is not None:
                on_trained(p)

    failed = []
    with contextlib.closing(run_pool(commands, spec.jobs, meanwhile)) as ended:
        for n, (point, rc, seconds) in enumerate(ended, 1):
            log_path = study_dir / "logs" / f"{point.run_name}.log"
            if rc == 0 and run_finished(run_dir(study_dir, point)) is not None:
                state.set(point.run_name, state="trained", seconds=round(seconds, 1), log=str(log_path))
                left = len(todo) - n
                times = state.seconds()
                per = sum(times) / len(times) if times else None
                eta = f"; about {fmt_duration(per * left / spec.jobs)} left" if left and per else ""
                say(f"[{done + n}/{len(points)}] trained {point.run_name} in {fmt_duration(seconds)}{eta}")
                if on_trained is not None:
                    on_trained(point)
            else:
                error = last_error(log_path) or f"exit status {rc}"
                state.set(
                    point.run_name, state="failed", seconds=round(seconds, 1), error=error, log=str(log_path)
                )
                failed.append(point)
                say(f"[{done + n}/{len(points)}] FAILED {point.run_name}: {error} (log: {log_path})")
    return failed


def check_same_settings(point: Point, study_dir: Path) -> None:
    """Refuse (UserError) a finished point whose run was started with other overrides than the study plans now
    (its row or `common` changed): its results would be reported under settings it was not trained with.
    Compares the run's last accepted command line (`.hydra/overrides.yaml`) as a set, `resume` aside."""
    import yaml

    from ..utils.errors import UserError

    path = run_dir(study_dir, point) / ".hydra" / "overrides.yaml"
    try:
        recorded = set(yaml.safe_load(path.read_text()) or [])
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"{path}: the point's recorded command line cannot be read ({err})") from None
    planned = set(point.train_args(str(study_dir)))
    strip = lambda items: {i for i in items if not i.startswith("resume=")}  # noqa: E731
    if strip(recorded) != strip(planned):
        changed = sorted(strip(recorded) ^ strip(planned))
        raise UserError(
            f"point {point.run_name} was trained with other settings than the study now has ({', '.join(changed)}): "
            f"run the changed study under another run_name, or move {run_dir(study_dir, point)} away"
        )


class HeldoutMeter:
    """Measures points on the study's held-out sets: the base model loaded once per base (from the run's own
    config, `history/`), each point's checkpoint applied to a fresh copy by its method (the registry)."""

    def __init__(self, spec: StudySpec, study_dir: Path):
        self.spec = spec
        self.results = study_dir / "results"
        self.settings = {
            "heldout": list(spec.heldout),
            "max_tokens": spec.max_tokens,
            "max_length": spec.max_length,
            "taus": list(spec.taus),
            **({"random_control": True} if spec.random_control else {}),
        }
        self._base: dict[str, Any] = {}  # model identity -> (model, tokenizer, sets, pad)

    def result_path(self, point: Point) -> Path:
        return self.results / f"{point.run_name}.json"

    def settings_for(self, point: Point | None) -> dict:
        """The held-out settings a result of `point` records (None: the base's): the reference row's points
        also record `reference_taus`, so changing them re-measures those points only."""
        if point is not None and point.row == self.spec.reference and self.spec.reference_taus:
            return {**self.settings, "reference_taus": list(self.spec.reference_taus)}
        return self.settings

    def is_current(self, path: Path, point: Point | None = None) -> bool:
        """Whether `path` holds a result of `point` (None: the base) measured with the study's held-out
        settings."""
        try:
            return json.loads(path.read_text()).get("settings") == self.settings_for(point)
        except (OSError, ValueError):
            return False

    def _load_base(self, model_cfg: dict) -> tuple:
        key = json.dumps(model_cfg, sort_keys=True)
        if key not in self._base:
            import torch

            from ..eval import curves
            from ..models.config import ModelConfig
            from ..models.loader import load_base_model
            from ..models.tokenizer import load_tokenizer, pad_token_id

            torch.manual_seed(0)
            base_model = ModelConfig.from_node(model_cfg, "a run history's model entry")
            tokenizer = load_tokenizer(base_model)
            model = load_base_model(base_model).eval()
            sets = curves.heldout_sets(
                tokenizer, list(self.spec.heldout), self.spec.max_length, self.spec.max_tokens
            )
            pad = pad_token_id(tokenizer)
            self._base[key] = (model, tokenizer, sets, pad)
            path = self.results / "base.json"
            if not self.is_current(path):
                base = curves.measure(model, sets, self.spec.batch_size, pad)
                record = {"settings": self.settings, "model": model_cfg.get("name_or_path"), "sets": base}
                atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))
        return self._base[key]

    def measure(self, point: Point, folder: Path) -> dict:
        """Measure `point` (run folder `folder`) unless a current result exists; returns the result."""
        path = self.result_path(point)
        if self.is_current(path, point):
            return json.loads(path.read_text())
        import copy

        from ..eval import curves
        from ..methods import build_method, checkpoint_method

        config = RunHistory(folder).latest() or {}
        model, tokenizer, sets, pad = self._load_base(config["model"])
        routed = copy.deepcopy(model)
        method = checkpoint_method(folder)
        build_method({"name": method}).apply(routed, ckpt=str(folder))
        own = float(routed.flexidepth.config.tau)
        extra = self.spec.reference_taus if point.row == self.spec.reference else []
        taus = sorted({own, *self.spec.taus, *extra})
        curve = curves.tau_curve(routed, sets, taus, self.spec.batch_size, pad)
        metrics = json.loads((folder / "metrics.json").read_text())
        record = {
            "settings": self.settings_for(point),
            "row": point.row,
            "seed": point.seed,
            "run": str(folder),
            "tau": own,
            "sets": next(p["sets"] for p in curve if p["tau"] == own),
            "curve": curve,
            "val": {k: v for k, v in metrics["metrics"].items() if k.startswith("val/")},
            "global_step": metrics.get("global_step"),
        }
        if self.spec.random_control and method == "flexidepth":
            # the same adapters, random routes at the per-layer run rates the routers have on the training-side
            # calibration text at the own threshold (src/methods/random_skip.py)
            control = copy.deepcopy(model)
            applied = build_method({"name": "random_skip", "match_rates": True}).apply(
                control, tokenizer=tokenizer, ckpt=str(folder)
            )
            record["random"] = {
                "sets": curves.measure(control, sets, self.spec.batch_size, pad),
                "run_rates": applied.details["run_rates"],
            }
        self.results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))
        return record


def write_summary(spec: StudySpec, study_dir: Path, points: list[Point], measured: list[dict],
                  failed: list[Point], speeds: dict[str, dict] | None = None,
                  evals: dict[str, dict] | None = None) -> dict:  # fmt: skip
    """summary.json (+ summary.md, summary.png and tau_curve.png once a point is measured, frontier.png once a
    point is timed) of what the study has measured so far; `missing` names the points not measured yet,
    `not_evaluated` and `not_timed` those the evaluation and speed stages have not done yet."""
    from ..render.study import markdown, plot, plot_axis, plot_curves, plot_frontier

    base = json.loads((study_dir / "results" / "base.json").read_text()) if measured else None
    summary = summarise(spec, measured, base, speeds, evals) if measured else {"study": spec.name, "rows": []}
    summary["failed"] = [p.run_name for p in failed]
    done = {f"{r['row']}__s{r['seed']}" for r in measured}
    summary["missing"] = [p.run_name for p in points if p.run_name not in done]
    if spec.evaluate is not None:
        summary["not_evaluated"] = [
            p.run_name for p in spec.evaluated(points) if p.run_name not in (evals or {})
        ]
    if spec.speed is not None:
        timed = set(speeds or {})
        summary["not_timed"] = [p.run_name for p in points if p.run_name not in timed]
    atomic_write_text(study_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    if measured:
        atomic_write_text(study_dir / "summary.md", markdown(summary))
        plot(summary, study_dir / "summary.png")
        if spec.reference:
            plot_curves(summary, spec.reference, study_dir / "tau_curve.png")
        if summary.get("frontier"):
            plot_frontier(summary, study_dir / "frontier.png")
        if spec.axis:
            plot_axis(summary, study_dir / "axis.png")
    return summary


def run_study(spec: StudySpec, study_dir: Path, say: Callable[[str], None] = print) -> dict:
    """Train, measure and summarise `spec` in `study_dir` (see the module docstring); returns the summary.
    The summary files are rewritten after every measured (and timed) point, so a study stopped early has the
    table of what it measured. Raises UserError after the summary when a point failed."""
    spec.validate()
    study_dir.mkdir(parents=True, exist_ok=True)
    state = StudyState(study_dir)
    points = plan_points(spec)
    meter = HeldoutMeter(spec, study_dir)
    measured: list[dict] = []
    speeds, evals = earlier_records(spec, study_dir, points)

    def on_trained(point: Point) -> None:
        folder = run_dir(study_dir, point)
        fresh = not meter.is_current(meter.result_path(point), point)
        measured.append(meter.measure(point, folder))
        if fresh:
            say(f"  measured {point.run_name} on {', '.join(spec.heldout)}")
        write_summary(spec, study_dir, points, measured, [], speeds, evals)

    failed = train_points(spec, study_dir, points, state, on_trained=on_trained, say=say)
    finished = [p for p in points if p not in failed and run_finished(run_dir(study_dir, p)) is not None]

    def rewrite() -> None:
        write_summary(spec, study_dir, points, measured, failed, speeds, evals)

    if spec.evaluate is not None:
        failed += evaluate_points(spec, study_dir, finished, evals, rewrite, say)
    if spec.speed is not None:
        time_points(spec, study_dir, finished, speeds, rewrite, say)
    summary = write_summary(spec, study_dir, points, measured, failed, speeds, evals)
    say(f"study {spec.name}: summary in {study_dir / 'summary.md'}")
    if failed:
        from ..utils.errors import UserError

        raise UserError(
            f"{len(failed)} point(s) failed: {', '.join(p.run_name for p in failed)} (logs in {study_dir / 'logs'}); "
            "run the same command again to retry them"
        )
    return summary


def earlier_records(spec: StudySpec, study_dir: Path, points: list[Point]) -> tuple[dict, dict]:
    """The speed and evaluation records `points` have from earlier starts with the current settings
    ({run_name: record} each), so that the summaries written while the study trains again keep them."""
    from .evaluate import EvalStage
    from .speed import SpeedMeter

    speeds: dict[str, dict] = {}
    evals: dict[str, dict] = {}
    if spec.speed is not None:
        timer = SpeedMeter(spec, study_dir)
        speeds.update((p.run_name, r) for p in points if (r := timer.read(p)) is not None)
    if spec.evaluate is not None:
        stage = EvalStage(spec, study_dir)
        evals.update((p.run_name, r) for p in spec.evaluated(points) if (r := stage.read(p)) is not None)
    return speeds, evals


def evaluate_points(spec: StudySpec, study_dir: Path, points: list[Point], evals: dict[str, dict],
                    on_done: Callable[[], None], say: Callable[[str], None],
                    python: str = sys.executable) -> list[Point]:  # fmt: skip
    """The evaluation stage (src/studies/evaluate.py): src.eval on the points of the evaluated rows among
    `points` (all trained, none training now) that have no record in `evals` yet (`earlier_records` read those
    evaluated before with the same settings), `spec.jobs` at a time. Adds each new record to `evals`
    {run_name: record}, calls `on_done()` after each and returns the points whose evaluation failed."""
    from .evaluate import EvalStage

    stage = EvalStage(spec, study_dir)
    wanted = spec.evaluated(points)
    todo = [p for p in wanted if p.run_name not in evals]
    say(
        f"study {spec.name}: evaluating {len(todo)} point(s) with src.eval ({len(wanted) - len(todo)} before)"
    )
    stage.folder.mkdir(parents=True, exist_ok=True)
    stage.logs.mkdir(parents=True, exist_ok=True)
    commands = [(p, stage.command(p, run_dir(study_dir, p), python), stage.log_path(p)) for p in todo]
    failed = []
    with contextlib.closing(run_pool(commands, spec.jobs)) as ended:
        for n, (point, rc, seconds) in enumerate(ended, 1):
            try:
                if rc != 0:
                    raise ValueError(last_error(stage.log_path(point)) or f"exit status {rc}")
                evals[point.run_name] = stage.record(point)
            except ValueError as err:
                failed.append(point)
                say(
                    f"  [{n}/{len(todo)}] evaluation FAILED {point.run_name}: {err} (log: {stage.log_path(point)})"
                )
                continue
            say(f"  [{n}/{len(todo)}] evaluated {point.run_name} in {fmt_duration(seconds)}")
            on_done()
    return failed


def time_points(spec: StudySpec, study_dir: Path, points: list[Point], speeds: dict[str, dict],
                on_done: Callable[[], None], say: Callable[[str], None]) -> None:  # fmt: skip
    """The speed stage: every point of `points` (all trained, none training now) timed one at a time
    (SpeedMeter); points timed before with the same settings are read back. Fills `speeds` {run_name: speed
    record} and calls `on_done()` after each new timing."""
    from .speed import SpeedMeter

    speed = SpeedMeter(spec, study_dir)
    todo = [p for p in points if not speed.is_current(p)]
    say(
        f"study {spec.name}: timing {len(todo)} point(s) one at a time ({len(points) - len(todo)} timed before)"
    )
    for n, point in enumerate(points, 1):
        fresh = point in todo
        start = time.monotonic()
        speeds[point.run_name] = speed.measure(point, run_dir(study_dir, point))
        if fresh:
            say(f"  [{n}/{len(points)}] timed {point.run_name} in {fmt_duration(time.monotonic() - start)}")
            on_done()
