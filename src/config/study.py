"""`python -m src.study`'s settings (`StudyCommand`: the study, typed by `StudySpec`, and its folder) and their
check, which includes every row's training settings before the study trains anything.

A study trains its points one after another for hours; a row whose overrides src.train would refuse (an unknown
key, a bad value, a budget the routed layers cannot reach) must stop the study at its start, not when its turn
comes. `check_rows` composes conf/train.yaml with each row's overrides exactly as the runner's
`python -m src.train <overrides>` would (Hydra's compose API, the same config folder) and runs src.train's own
checks on it (`TrainCommand.check`: values, then what they point at; no weights loaded, nothing written).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..studies.spec import Point, StudySpec, plan_points
from ..utils.errors import ConfigError, PreflightError
from .schemas import PathsConfig


@dataclass
class StudyCommand:
    """`python -m src.study` (conf/study.yaml; the study itself is conf/study/<name>.yaml)."""

    study: StudySpec = field(default_factory=StudySpec)
    task_name: str = "study"
    run_name: Any = None  # the study folder's name (default: the study's name); the same name continues it
    paths: PathsConfig = field(default_factory=PathsConfig)

    def check(self) -> StudySpec:
        """The study's values (`StudySpec.validate`, ConfigError naming `study.<key>`), then, when it trains,
        every row's training settings (`check_rows`); returns the study. Nothing is loaded or written."""
        spec = self.study.validate()
        if spec.train:
            check_rows(spec, Path(self.paths.output_dir).absolute())
        return spec


def check_rows(spec: StudySpec, study_dir: Path) -> None:
    """src.train's checks on one point of every row (a row's seeds differ only in `seed` / `data.seed`).

    Raises ConfigError naming `study.rows.<row>`, the row's overrides (`study.common` first) and src.train's
    own message (naming the training key), for the first row refused; nothing is trained or written."""
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from .commands import TrainCommand
    from .schemas import load

    first: dict[str, Point] = {}
    for point in plan_points(spec):
        first.setdefault(point.row, point)
    for row, point in first.items():
        try:
            cfg = _compose_train(point.train_args(str(study_dir)))
            with open_dict(cfg):  # the run folder src.train's Hydra would make (nothing is created here)
                cfg.paths.output_dir = str(study_dir / "train" / "runs" / point.run_name)
            settings = load(cfg, TrainCommand)
            settings.translate_skip_alpha()
            settings.check()
        except (HydraException, OmegaConfBaseException) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(
                f"study.rows.{row}: src.train refuses {list(point.overrides)}: {message}"
            ) from None
        except (ConfigError, PreflightError) as err:
            raise ConfigError(f"study.rows.{row}: src.train refuses {list(point.overrides)}: {err}") from None


def _compose_train(overrides: list[str]):
    """conf/train.yaml with `overrides`, composed as `python -m src.train <overrides>` would be: inside a Hydra
    app (src.study) with the app's own config loader and search path, else from this repository's conf/."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from ..utils.cli import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)
