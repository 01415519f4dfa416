"""Every command's settings schema by its config name (conf/<name>.yaml's first default is
`schema/command@_here_: <name>`; `src.config.register` puts each into Hydra's ConfigStore)."""

from __future__ import annotations

from .commands import (
    CompareCommand,
    EvaluateCommand,
    ExportCommand,
    GenerateCommand,
    SpeedCommand,
    TrainCommand,
)
from .study import StudyCommand
from .tools import TOOLS

COMMANDS: dict[str, type] = {
    "train": TrainCommand,
    "evaluate": EvaluateCommand,
    "compare": CompareCommand,
    "generate": GenerateCommand,
    "export": ExportCommand,
    "speed": SpeedCommand,
    "study": StudyCommand,  # src/config/study.py
    **TOOLS,  # src.convert, src.analyze, src.sweep_summary, src.memory_planner (src/config/tools.py)
}
