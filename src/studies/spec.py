"""What a study is: `StudySpec`, the typed `study` group (conf/study/<name>.yaml, registered as a Hydra
structured config), and the planned points (`plan_points`): every row at every seed, as src.train overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..utils.errors import ConfigError

SEED_SEP = "__s"  # run folder name: <row>__s<seed>
_ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class StudySpec:
    """The `study` group (conf/study/*.yaml).

    Fields:
        name: the study's folder name (outputs/study/runs/<name>/ unless run_name says otherwise).
        description: one line for the summary's title.
        seeds: every row is trained once per seed; seed s sets `seed=s data.seed=s` (initialisation, data draw
            and order), so rows are paired by seed (src/studies/stats.py).
        reference: the row every other row is compared with (paired per seed); None: no comparison column.
        rows: row name -> src.train overrides of that row (on top of `common`), e.g. `[skip=no_kv]`.
        common: src.train overrides of every row (e.g. `logger=csv`).
        heldout: held-out sets each point is measured on (src/data/mixture.py HELDOUT_SETS).
        max_tokens, max_length: tokens per held-out set, and the window length (src/eval/curves.py).
        batch_size: evaluation batch size.
        taus: extra thresholds each point is also measured at (a tau sweep along every checkpoint); the
            point's own tau is always measured.
        reference_taus: further thresholds of the reference row's points only: its curve then reaches rows that
            skip deeper (or shallower) on held-out text than it does at `taus`, for the comparison at equal
            held-out depth (e.g. a row whose gates saturate: one depth at every threshold).
        jobs: training runs at once; each gets cpu_count // jobs threads (OMP_NUM_THREADS).
        against: row -> the row it is compared with (default: `reference`), e.g. each static row against the
            routed row of the same depth.
        speed: None (no speed stage), or src.speed settings (prompts, prompt_length, new_tokens, rounds,
            warmup, threads, text_decode; {} for src.speed's defaults): every point's batch-1 decode is then
            timed against its base after all training has ended (src/studies/speed.py), and rows are also
            compared at equal measured speed.
        train: false: train nothing, only measure (and time) the points already finished (a partial study's
            summary, or its speed stage on the rows finished so far).
        random_control: also measure every FlexiDepth point with random routes at its learned per-layer run
            rates (measured on the training-side calibration text at its own threshold) and its own adapters
            (method=random_skip): what the learned routes add over their rates alone.
        axis: row -> a number the rows sweep (e.g. each row's loss.alpha); with `axis_label`, axis.png draws
            held-out ppl and layers skipped against it (a sweep's figure). Rows left out are not drawn.
        axis_label: the swept setting's name on that figure (e.g. "loss.alpha (fixed, no budget)").
        evaluate: None (no evaluation stage), or src.eval's `eval` settings ({} for its defaults, e.g.
            {n_per_task: 100}): the trained points of `evaluate_rows` are then evaluated with `python -m src.eval`
            after all training has ended (src/studies/evaluate.py): the task suite's retention and the paper's
            three token-type claims per point, compared across rows.
        evaluate_rows: the rows the evaluation stage evaluates (empty: every row).
    """

    name: str = "study"
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44])
    reference: str | None = None
    rows: dict[str, list[str]] = field(default_factory=dict)
    common: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=lambda: ["lee", "shakespeare", "wiki", "python_docs"])
    max_tokens: int = 8192
    max_length: int = 256
    batch_size: int = 8
    taus: list[float] = field(default_factory=list)
    reference_taus: list[float] = field(default_factory=list)
    jobs: int = 1
    against: dict[str, str] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    train: bool = True
    random_control: bool = False
    axis: dict[str, float] = field(default_factory=dict)
    axis_label: str = ""
    evaluate: dict[str, Any] | None = None
    evaluate_rows: list[str] = field(default_factory=list)

    def validate(self) -> StudySpec:
        """Value checks; raises ConfigError naming `study.<key>` (types are the schema's)."""
        if not self.rows:
            raise ConfigError("study.rows is empty: name at least one row (row name -> src.train overrides)")
        for row, overrides in self.rows.items():
            if not _ROW_NAME.match(row) or SEED_SEP in row:
                raise ConfigError(
                    f"study.rows.{row}: a row name is letters, digits and _ . + - (not starting with one of the "
                    f"last four) without '{SEED_SEP}'"
                )
            for item in overrides:
                _check_override(item, f"study.rows.{row}")
        for item in self.common:
            _check_override(item, "study.common")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study.seeds must be distinct integers, at least one; got {self.seeds}")
        if self.reference is not None and self.reference not in self.rows:
            raise ConfigError(
                f"study.reference={self.reference!r} is not a row (rows: {', '.join(self.rows)})"
            )
        for key in ("max_tokens", "max_length", "batch_size", "jobs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"study.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("taus", "reference_taus"):
            for tau in getattr(self, key):
                if not 0.0 <= tau < 1.0:
                    raise ConfigError(f"study.{key}: {tau} is not a threshold in [0, 1)")
        if self.reference_taus and self.reference is None:
            raise ConfigError(
                "study.reference_taus is set but study.reference is null: name the reference row"
            )
        if not self.heldout:
            raise ConfigError("study.heldout is empty: name at least one held-out set")
        from ..data.mixture import check_heldout

        check_heldout(list(self.heldout), "study.heldout")
        for row, other in self.against.items():
            for key, name in ((f"study.against.{row}", row), (f"study.against.{row}", other)):
                if name not in self.rows:
                    raise ConfigError(f"{key}: {name!r} is not a row (rows: {', '.join(self.rows)})")
            if row == other:
                raise ConfigError(f"study.against.{row}: a row is not compared with itself")
        outside = sorted(set(self.axis) - set(self.rows))
        if outside:
            raise ConfigError(f"study.axis.{outside[0]}: not a row (rows: {', '.join(self.rows)})")
        if self.axis and not self.axis_label:
            raise ConfigError("study.axis_label is empty: name the setting study.axis sweeps")
        if self.speed is not None:
            speed_settings(self)
        if self.evaluate is not None:
            eval_settings(self)
        elif self.evaluate_rows:
            raise ConfigError(
                "study.evaluate_rows is set but study.evaluate is null: set study.evaluate={} too"
            )
        return self

    def evaluated(self, points: list[Point]) -> list[Point]:
        """The points of `points` the evaluation stage evaluates (`evaluate_rows`, every row when empty); none
        without the stage."""
        if self.evaluate is None:
            return []
        rows = set(self.evaluate_rows or self.rows)
        return [p for p in points if p.row in rows]

    def comparison_row(self, row: str) -> str | None:
        """The row `row` is compared with: `against[row]`, else the reference (None for the reference itself)."""
        other = self.against.get(row, self.reference)
        return None if other == row else other


# src.speed settings the stage sets itself (a study times only its points, on its own held-out sets)
_STAGE_KEYS = ("taus", "shortgpt_k", "heldout", "per_set_speed", "batch", "prefill_length", "ppl_max_tokens")


def speed_settings(spec: StudySpec):
    """`study.speed` (src.speed keys: prompts, prompt_length, new_tokens, rounds, warmup, threads, text_decode)
    as src/eval/speed_plan.py's typed `SpeedSettings`, on the study's held-out sets. Raises ConfigError naming
    `study.speed.<key>` for an unknown key, a key the stage sets itself, or a wrong type or value."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ..eval.speed_plan import SpeedSettings

    options = dict(spec.speed or {})
    own = sorted(set(options) & set(_STAGE_KEYS))
    if own:
        raise ConfigError(
            f"study.speed.{own[0]} is set by the study's speed stage (it times its points alone)"
        )
    fixed = {"taus": list(spec.taus), "shortgpt_k": [], "heldout": list(spec.heldout), "batch": 0,
             "prefill_length": 0, "ppl_max_tokens": 0, "per_set_speed": False}  # fmt: skip
    try:
        s = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SpeedSettings), fixed, options))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"study.speed.{key}: {str(getattr(err, 'msg', err)).splitlines()[0]}") from None
    for key in ("prompts", "prompt_length", "new_tokens", "rounds", "threads"):
        if getattr(s, key) < 1:
            raise ConfigError(f"study.speed.{key} must be >= 1, got {getattr(s, key)}")
    if s.warmup < 0:
        raise ConfigError(f"study.speed.warmup must be >= 0, got {s.warmup}")
    return s


# eval keys the evaluation stage sets itself: each point's own threshold (its threshold curve is measured by
# the held-out stage)
_EVAL_STAGE_KEYS = ("tau",)


def eval_settings(spec: StudySpec) -> dict[str, Any]:
    """`study.evaluate` checked against src.eval's `eval` group (src/eval/config.py EvalConfig): the options as
    given, plain values. Raises ConfigError naming `study.evaluate.<key>` for an unknown key, a key the stage
    sets itself, a wrong type or value, and `study.evaluate_rows` naming a row the study does not have."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ..eval.config import EvalConfig

    options = dict(spec.evaluate or {})
    own = sorted(set(options) & set(_EVAL_STAGE_KEYS))
    if own:
        raise ConfigError(
            f"study.evaluate.{own[0]} is set by the evaluation stage (each point's own threshold)"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(EvalConfig), options)
        checked = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"study.evaluate.{key}: {str(getattr(err, 'msg', err)).splitlines()[0]}") from None
    try:
        checked.validate()
    except ConfigError as err:
        raise ConfigError(re.sub(r"^eval\.", "study.evaluate.", str(err))) from None
    problems = checked.problems()
    if problems:
        raise ConfigError("; ".join(re.sub(r"^eval\.", "study.evaluate.", p) for p in problems))
    unknown = [row for row in spec.evaluate_rows if row not in spec.rows]
    if unknown:
        raise ConfigError(f"study.evaluate_rows: {unknown[0]!r} is not a row (rows: {', '.join(spec.rows)})")
    return OmegaConf.to_container(OmegaConf.create(options), resolve=True)


_OWNED = ("run_name", "seed", "data.seed", "paths.log_dir", "resume", "overwrite", "hydra.")


def _check_override(item: str, key: str) -> None:
    """A row/common override must be `key=value` and must not set what the runner sets itself."""
    name = item.split("=", 1)[0].lstrip("+~")
    if "=" not in item and not item.startswith("~"):
        raise ConfigError(f"{key}: {item!r} is not a key=value override")
    if name in _OWNED[:-1] or name.startswith(_OWNED[-1]):
        raise ConfigError(f"{key}: {item!r} sets {name}, which the study runner sets for every point")


@dataclass(frozen=True)
class Point:
    """One training run of a study: `row` at `seed`, in run folder `run_name`."""

    row: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def run_name(self) -> str:
        return f"{self.row}{SEED_SEP}{self.seed}"

    def train_args(self, log_dir: str) -> list[str]:
        """The src.train command-line arguments of this point (runs land in <log_dir>/train/runs/<run_name>)."""
        return [
            f"run_name={self.run_name}",
            f"seed={self.seed}",
            f"data.seed={self.seed}",
            f"paths.log_dir={log_dir}",
            "resume=auto",
            *self.overrides,
        ]


def plan_points(spec: StudySpec) -> list[Point]:
    """Every row at every seed, row by row with the reference row first: a study stopped early has whole
    rows, each one comparable with the reference at every seed (a row at one seed decides nothing)."""
    rows = sorted(spec.rows, key=lambda row: row != spec.reference)  # stable: the file's order otherwise
    return [Point(row, int(seed), (*spec.common, *spec.rows[row])) for row in rows for seed in spec.seeds]
