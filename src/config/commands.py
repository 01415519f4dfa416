"""Each command's settings as one typed schema (the primary config of `python -m src.<command>`), with the
checks the command runs before any model is loaded or any output written, composed from the checks of the
groups and of what the settings point at (each living with what it checks):

| check                                   | where                                                   |
|-----------------------------------------|---------------------------------------------------------|
| model values, identity, hub access      | `ModelConfig` (src/models/config.py)                    |
| data values, files / hub datasets, window | `DataConfig` (src/data/config.py)                     |
| loss values, the layers-skipped budget  | `LossConfig` (src/lit/objectives.py)                    |
| skip values, sizes, nothing to train    | `SkipSchema` (src/config/schemas.py), FlexiDepthConfig  |
| trainer / callbacks / logger arguments  | `trainer_problems`, `group_problems` (src/config/targets.py) |
| a study's rows, each as src.train's     | `StudyCommand.check`, `check_rows` (src/config/study.py) |
| eval values, device, task names         | `EvalConfig` (src/eval/config.py)                       |
| a checkpoint: found, same base, finite  | `resolve_checkpoint`, `checkpoint_problems` (src/flexidepth/checkpoint.py) |
| accelerator / device                    | `accelerator_problems`, `device_problems` (src/utils/hardware.py) |
| resume / init_from                      | `resume_problems` (src/utils/run_start.py)              |
| an occupied output folder               | `check_free` (src/utils/outputs.py)                     |
| the model of a run given as ckpt_path   | `adopt_run_model` (src/config/run_model.py)             |

`<Command>.check()` raises ConfigError for a bad value (the first found), then PreflightError listing every
problem of what the settings point at ("<command> refused before loading anything: ..."), each naming its key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.config import DataConfig
from ..eval.config import EvalConfig
from ..eval.speed_plan import SpeedRun
from ..flexidepth.checkpoint import checkpoint_problems, resolve_checkpoint
from ..lit.objectives import LossConfig
from ..lit.optim import OptimConfig
from ..models.config import ModelConfig
from ..utils.errors import ConfigError, MethodConfigError, PreflightError, check_count
from ..utils.hardware import accelerator_problems, device_problems
from ..utils.outputs import check_free
from ..utils.run_start import resume_problems
from .schemas import PathsConfig, SkipSchema, typed
from .targets import group_problems, trainer_problems


def raise_problems(problems: list[str], command: str) -> None:
    """PreflightError listing `problems` (one per line) when there are any."""
    if problems:
        raise PreflightError(f"{command} refused before loading anything:\n- " + "\n- ".join(problems))


def raise_first(problems: list[str]) -> None:
    """ConfigError with the first of `problems` (value problems: one at a time, like every value check)."""
    if problems:
        raise ConfigError(problems[0])


def checked_method(node: Any):
    """The Method a `method` node builds (`src.methods.build_method`); ConfigError naming `method.<key>`."""
    from ..methods import build_method

    try:
        return build_method(node or {"name": "flexidepth"})
    except MethodConfigError as err:
        raise ConfigError(str(err)) from err


def ckpt_problems(path: str | None, key: str, model: ModelConfig, before: list[str]) -> list[str]:
    """A checkpoint setting: found (CheckpointNotFound otherwise, raised), and, when nothing `before` it
    failed (its identity needs the model's config), trained on `model` with finite weights."""
    folder = resolve_checkpoint(path, key)
    if folder is None or before:
        return []
    return checkpoint_problems(folder, key, model.identity())


# ---------------------------------------------------------------------------------------------- train
@dataclass
class TrainCommand:
    """`python -m src.train` (conf/train.yaml)."""

    skip: SkipSchema = field(default_factory=SkipSchema)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task_name: str = "train"
    run_name: Any = None  # one folder name (src.utils.runs.check_run_name); a number is its folder name
    seed: int = 42
    resume: Any = False  # false | auto | extend | <file.ckpt>
    overwrite: bool = False
    init_from: str | None = None
    gradient_checkpointing: bool = False
    tags: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the method's own dataclass checks it (`checked_method`)
    trainer: dict[str, Any] = field(default_factory=dict)  # Lightning Trainer arguments (`_target_`)
    callbacks: Any = None  # name -> callback node (`_target_`); null: none
    logger: Any = None  # name -> logger node (`_target_`); null: none
    paths: PathsConfig = field(default_factory=PathsConfig)
    skip_estimator: Any = None  # a model recipe's default skip.gate_mode / skip.train_decisions
    released_alpha: Any = None  # released_stage* experiments (src/config/released.py)
    optimized_metric: str = "val/ppl"  # the objective returned to Hydra sweepers

    def translate_skip_alpha(self) -> str | None:
        """The one translation of the deprecated alias: `skip.alpha=v` becomes `loss.alpha=v` (and skip.alpha
        null), so everything after the command's boundary reads `loss.alpha` only. Returns the one-line note
        to print, None when the alias is unset. ConfigError for a negative alpha."""
        alpha = self.skip.alpha
        if alpha is None:
            return None
        if alpha < 0:
            raise ConfigError(f"skip.alpha must be a number >= 0, got {alpha!r}")
        self.loss.alpha, self.skip.alpha = float(alpha), None
        return f"skip.alpha is deprecated: loss.alpha is the key (taking loss.alpha={alpha:g})"

    def validate(self):
        """The values (ConfigError naming the key); returns the (validated) Method."""
        self.model.validate()
        method = checked_method(self.method)
        self.skip.validate().check_for(self.model.arch)
        self.loss.validate()
        self.optim.validate()
        self.data.validate()
        built = trainer_problems(self.trainer)
        raise_first(
            built + group_problems(self.callbacks, "callbacks") + group_problems(self.logger, "logger")
        )
        if not method.trains:
            raise ConfigError(
                f"method={method.name} has nothing to train: evaluate it with `python -m src.eval "
                f"method={method.name}` or src.compare (its `baselines` list)"
            )
        resume, init_from = self.resume, self.init_from
        if resume not in (False, None, "auto", "extend") and not Path(str(resume)).is_file():
            raise ConfigError(f"resume={resume!r}: expected auto, extend, false or an existing .ckpt file")
        if init_from and resume not in (False, None):
            raise ConfigError("init_from (warm start) and resume are mutually exclusive")
        if init_from and not (Path(init_from) / "flexidepth_config.json").is_file():
            raise ConfigError(
                f"init_from={init_from!r} is not a FlexiDepth checkpoint folder (no flexidepth_config.json)"
            )
        return method

    def check(self):
        """Every check of a training start that needs no weights: `validate`, then what the settings point
        at (accelerator, hub access, data files, init_from, the budget and the position window against the
        base model's config, nothing to train, resume=<file>); returns the Method."""
        method = self.validate()
        resume, init_from = self.resume, self.init_from
        accel = str(self.trainer.get("accelerator", "cpu"))
        gpu = accel in ("gpu", "cuda")
        problems = accelerator_problems(accel, "trainer.accelerator", recipe_hint=gpu)
        problems += self.model.access_problems(gpu_recipe=gpu) + self.data.access_problems()
        if init_from and not problems:
            problems += checkpoint_problems(Path(init_from), "init_from", self.model.identity())
        depth = self.model.config_value("num_hidden_layers")
        if depth is None and not problems:  # a hub model: its config.json (cached, or fetched alone)
            depth = self.model.identity()["num_hidden_layers"]
        if depth is not None:
            flexi = self.skip.flexidepth()
            problems += self.loss.budget_problems(len(flexi.routed_layers(depth)))
            problems += flexi.trainable_problems(depth)
        problems += self.data.window_problems(self.model.config_value("max_position_embeddings"))
        problems += resume_problems(resume)
        raise_problems(problems, "train")
        return method


# ---------------------------------------------------------------------------------------------- evaluate
@dataclass
class EvaluateCommand:
    """`python -m src.eval` (conf/evaluate.yaml)."""

    skip: SkipSchema = field(default_factory=SkipSchema)  # only read by method=random_skip (skip.layers)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task_name: str = "evaluate"
    run_name: Any = None
    overwrite: bool = False
    tags: list[str] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)  # only read by model.dtype's ${auto_dtype:...}
    ckpt_path: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None
    logger: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)

    def validate(self) -> None:
        """The values (ConfigError naming the key)."""
        self.model.validate()
        checked_method(self.method)
        self.skip.validate().check_for(self.model.arch)
        self.eval.validate()
        raise_first(group_problems(self.logger, "logger"))

    def check(self) -> None:
        """`validate`, the device, task names, hub access, the checkpoint against the base model, then an
        occupied output folder (OutputExistsError unless overwrite=true)."""
        self.validate()
        problems = self.eval.problems() + self.model.access_problems()
        problems += ckpt_problems(self.ckpt_path, "ckpt_path", self.model, problems)
        raise_problems(problems, "evaluate")
        check_free(Path(self.paths.output_dir), "evaluate", self.overwrite)


# ---------------------------------------------------------------------------------------------- compare
@dataclass
class TrainedSystem:
    """One entry of src.compare's `trained`: a run or FlexiDepth folder and where it goes."""

    ckpt: str = ""
    table: str = "main"  # main | ablation
    match_k32: list[float] = field(default_factory=list)  # also evaluated at the tau that skips these k32


@dataclass
class MethodOverrides:
    """The type of src.compare's `method_overrides`, {baseline: {option: value}} or None: checked against
    this schema in `CompareCommand.__post_init__` (`typed`), because the command schema cannot hold the type
    itself: Hydra merges `method_overrides={...}` into the node (OmegaConf.update(merge=True)), and with
    OmegaConf 2.3.1 a typed Optional[Dict] holding None raises AttributeError ('NoneType' object has no
    attribute 'get'), one holding {} refuses the new key (struct mode: "Key 'laco' is not in struct")."""

    method_overrides: dict[str, dict[str, Any]] | None = None


@dataclass
class CurvesConfig:
    """src.compare's `curves` block (conf/compare.yaml documents each key)."""

    enabled: bool = True
    heldout: list[str] = field(default_factory=lambda: ["lee", "shakespeare", "wiki", "python_docs"])
    max_tokens: int | None = 8192
    max_length: int = 256
    k: list[float] = field(default_factory=lambda: [2.0, 4.0])
    curve_k: list[float] = field(default_factory=list)
    calibration_texts: int = 8
    baselines: list[str] = field(default_factory=lambda: ["shortgpt", "laco", "random_skip"])

    def validate(self) -> CurvesConfig:
        check_count("curves.max_tokens", self.max_tokens, 1, nullable=True)
        check_count("curves.max_length", self.max_length, 2)
        check_count("curves.calibration_texts", self.calibration_texts, 1)
        return self


@dataclass
class CompareCommand:
    """`python -m src.compare` (conf/compare.yaml)."""

    skip: SkipSchema = field(default_factory=SkipSchema)
    eval: EvalConfig = field(default_factory=EvalConfig)
    task_name: str = "compare"
    run_name: Any = None
    overwrite: bool = False
    experiment_name: str = "baselines"
    tags: list[str] = field(default_factory=list)
    trainer: dict[str, Any] = field(default_factory=dict)
    runs_dir: str = "outputs/train/runs"
    k32: list[float] = field(default_factory=lambda: [4.0, 8.0])
    baselines: list[str] = field(default_factory=list)
    # {baseline: {option: value}} or None; open here so that `method_overrides={...}` replaces the node,
    # typed in __post_init__ (`MethodOverrides` says why)
    method_overrides: Any = None
    # label -> TrainedSystem; typed in __post_init__ (an open mapping here, so that `+trained.<label>={...}`
    # adds an entry); None after '~trained' (untrained baselines only)
    trained: dict[str, Any] | None = None
    ablation_reference: str | None = None
    random_matched_to: list[str] = field(default_factory=list)
    tables: bool = True
    curves: CurvesConfig = field(default_factory=CurvesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    logger: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        values = {"method_overrides": self.method_overrides}
        self.method_overrides = typed(values, MethodOverrides, "").method_overrides
        if self.trained is not None:
            self.trained = {
                str(label): typed(entry, TrainedSystem, f"trained.{label}")
                for label, entry in self.trained.items()
            }

    def validate(self) -> None:
        """The values (ConfigError naming the key)."""
        self.model.validate()
        self.skip.validate().check_for(self.model.arch)
        self.eval.validate()
        self.curves.validate()
        raise_first(group_problems(self.logger, "logger"))

    def check(self) -> None:
        """`validate`, the device, task names, hub access, every existing trained checkpoint against the base
        model (a missing one is reported and left out by the planner, not refused), then an occupied output
        folder."""
        self.validate()
        problems = self.eval.problems() + self.model.access_problems()
        for label, entry in ({} if problems else self.trained or {}).items():
            try:
                problems += ckpt_problems(entry.ckpt, f"trained.{label}.ckpt", self.model, [])
            except FileNotFoundError:
                continue
        raise_problems(problems, "compare")
        check_free(Path(self.paths.output_dir), "compare", self.overwrite)


# ---------------------------------------------------------------------------------------------- generate
@dataclass
class GenerateCommand:
    """`python -m src.generate` (conf/generate.yaml)."""

    task_name: str = "generate"
    trainer: dict[str, Any] = field(default_factory=dict)
    ckpt_path: str | None = None
    prompt: str | None = None
    chat: bool = True
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0
    tau: float | None = None
    color: bool | None = None
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)

    def check(self) -> None:
        """The prompt is not empty, the sampling arguments valid (`check_generation_args`), tau null or in
        [0, 1] and only with a checkpoint; then the device, hub access, the checkpoint against the model."""
        from ..flexidepth.config import FlexiDepthConfigError, check_tau
        from ..flexidepth.generation import check_generation_args

        if not self.prompt or not self.prompt.strip():
            raise ConfigError(
                f"prompt must be a non-empty string (quote it: 'prompt=\"...\"'), got {self.prompt!r}"
            )
        try:
            check_generation_args(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                  temperature=self.temperature, top_p=self.top_p, seed=self.seed)  # fmt: skip
            check_tau(self.tau, "tau", allow_none=True)
        except (ValueError, FlexiDepthConfigError) as err:  # the library's checks name the key
            raise ConfigError(str(err)) from None
        if self.tau is not None and self.ckpt_path is None:
            raise ConfigError("tau is set but ckpt_path is null: the base model has no routers to threshold")
        self.model.validate()
        problems = device_problems(self.device, "device") + self.model.access_problems()
        problems += ckpt_problems(self.ckpt_path, "ckpt_path", self.model, problems)
        raise_problems(problems, "generate")


# ---------------------------------------------------------------------------------------------- export
@dataclass
class ExportCommand:
    """`python -m src.export` (conf/export.yaml)."""

    task_name: str = "export"
    trainer: dict[str, Any] = field(default_factory=dict)
    ckpt_path: str | None = None
    out_dir: str | None = None
    overwrite: bool = False
    hub_repo: str | None = None
    private: bool = False
    compare_json: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)

    def out_path(self) -> Path:
        """`out_dir` as an absolute path."""
        return Path(str(self.out_dir)).expanduser().resolve()

    def check(self) -> Path:
        """Every check before the model is loaded, in this order (src/models/export.py holds the export's
        own): `hub_repo` (with the hub offline nothing else is done), ckpt_path and out_dir given,
        `compare_json` readable, `out_dir` absent, empty or (overwrite=true) an earlier export, the checkpoint
        (a FlexiDepth one of an exportable family, with K/V for skipped tokens), the model, hub access and the
        checkpoint against the base model. ExportError / CheckpointError / PreflightError naming the key;
        returns the checkpoint folder."""
        from ..models.export import (
            ExportError,
            check_checkpoint,
            check_compare_json,
            check_hub_repo,
            check_out_dir,
        )

        if self.hub_repo:
            check_hub_repo(self.hub_repo)
        if not self.ckpt_path:
            raise ExportError(
                "ckpt_path is required: a run folder or its flexidepth/ (ckpt_path=outputs/train/runs/<run>)"
            )
        if not self.out_dir:
            raise ExportError(
                "out_dir is required: the folder to write the export into (out_dir=exports/<name>)"
            )
        if self.compare_json:
            check_compare_json(Path(self.compare_json))
        check_out_dir(self.out_path(), self.overwrite)
        folder = resolve_checkpoint(self.ckpt_path, "ckpt_path")
        check_checkpoint(folder)
        self.model.validate()
        problems = self.model.access_problems()
        problems += ckpt_problems(self.ckpt_path, "ckpt_path", self.model, problems)
        raise_problems(problems, "export")
        return folder


# ---------------------------------------------------------------------------------------------- speed
@dataclass
class SpeedCommand(SpeedRun):
    """`python -m src.speed` (conf/speed.yaml): one measurement's settings and what it times (`SpeedRun`),
    and the run folder it writes."""

    task_name: str = "speed"
    run_name: Any = None
    overwrite: bool = False
    trainer: dict[str, Any] = field(default_factory=dict)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def check(self) -> None:
        """The settings, the device, hub access, every checkpoint (a FlexiDepth one, trained on this model,
        finite, with its own label), `shortgpt_k` against the model's depth, then an occupied output folder."""
        from ..eval.speed import checkpoint_labels
        from ..flexidepth.checkpoint import read_checkpoint_config

        self.model.validate()
        self.validate()  # SpeedSettings' ranges; taus and shortgpt_k sorted in place
        if not self.ckpt_path:
            raise ConfigError(
                "ckpt_path is required: a FlexiDepth folder or a run folder holding flexidepth/"
            )
        problems = device_problems(self.device, "device") + self.model.access_problems()
        keys = [
            ("ckpt_path", self.ckpt_path),
            *((f"more_ckpts[{i}]", p) for i, p in enumerate(self.more_ckpts)),
        ]
        folders = []
        for key, path in keys:
            try:
                folders.append(resolve_checkpoint(path, key))
            except FileNotFoundError as err:
                problems.append(str(err))
        if not problems:
            for (key, path), folder in zip(keys, folders, strict=True):
                method = read_checkpoint_config(folder).get("method", "flexidepth")
                if method not in ("flexidepth", "layer_replacement"):
                    problems.append(
                        f"{key}={path!r} holds a method={method} checkpoint; src.speed times FlexiDepth "
                        "and layer_replacement checkpoints only (compare other methods with src.compare)"
                    )
        if not problems:
            identity = self.model.identity()
            for (key, _), folder in zip(keys, folders, strict=True):
                problems += checkpoint_problems(folder, key, identity)
            try:
                checkpoint_labels(folders)
            except ValueError as err:
                problems.append(str(err))
            layers = identity["num_hidden_layers"]
            bad = [k for k in self.shortgpt_k if k >= layers]
            if bad:
                problems.append(
                    f"shortgpt_k: {bad} would delete every layer of a {layers}-layer model (k <= {layers - 1})"
                )
        raise_problems(problems, "speed")
        check_free(Path(self.paths.output_dir), "speed", self.overwrite)
