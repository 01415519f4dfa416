"""A study's measured-speed stage (`study.speed`): every trained point timed by src.speed's machinery against
its base model, one point at a time, after every training of the study has ended (never beside a training).

Per point, in one process: the base model and the point's checkpoint at its own threshold and at `study.taus`
(a layer_replacement point once: it has no threshold; src/eval/speed.py `build_systems`), decoded at batch 1
in lockstep (every system's step t before any system's step t + 1, `speed_timing.lockstep`): greedy
continuations of held-out prompts (`decode_b1`) and each held-out set's own text teacher-forced
(`text_b1@<set>`, the text whose perplexity the study reports). Speedups are the median over rounds of the
paired ratio base seconds / system seconds (wall and CPU), so a point is compared with other points through
its own base measured beside it. Output: `<study_dir>/speed/<row>__s<seed>.json`, re-measured only when the
speed settings change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_text
from ..utils.runs import RunHistory
from .spec import Point, StudySpec, speed_settings


class SpeedMeter:
    """Times points (module docstring): the base model and tokenizer loaded once per base, the prompts once."""

    def __init__(self, spec: StudySpec, study_dir: Path):
        self.spec = spec
        self.folder = study_dir / "speed"
        self.settings = speed_settings(spec)
        self.record_settings = {**self.settings.__dict__}
        self._base: dict[str, Any] = {}

    def result_path(self, point: Point) -> Path:
        return self.folder / f"{point.run_name}.json"

    def read(self, point: Point) -> dict | None:
        """The point's speed record when it holds the current settings, else None."""
        try:
            record = json.loads(self.result_path(point).read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("settings") == self.record_settings else None

    def is_current(self, point: Point) -> bool:
        return self.read(point) is not None

    def _load_base(self, model_cfg: dict) -> tuple:
        key = json.dumps(model_cfg, sort_keys=True)
        if key not in self._base:
            import torch

            from ..eval.speed_timing import heldout_prompts
            from ..models.config import ModelConfig
            from ..models.loader import load_base_model
            from ..models.tokenizer import load_tokenizer

            s, model = self.settings, ModelConfig.from_node(model_cfg, "a run history's model entry")
            torch.manual_seed(0)
            tokenizer = load_tokenizer(model)
            prompts = heldout_prompts(tokenizer, s.heldout, s.prompts, s.prompt_length)
            texts = None
            if s.text_decode:
                length = s.prompt_length + s.new_tokens
                texts = {n: heldout_prompts(tokenizer, [n], s.prompts, length) for n in s.heldout}
            self._base[key] = (load_base_model(model).eval(), tokenizer, prompts, texts)
        return self._base[key]

    def measure(self, point: Point, folder: Path) -> dict:
        """Time `point` (run folder `folder`) unless a current record exists; returns the record: settings,
        machine, the point's static layers (replaced for every token) and, per timed system (its threshold; a
        layer_replacement point has one, tau None), per mode the speedups and the layers skipped."""
        if self.is_current(point):
            return json.loads(self.result_path(point).read_text())
        import torch

        from ..eval.speed import build_systems
        from ..eval.speed_timing import machine_record, measure_speed
        from ..flexidepth.checkpoint import read_checkpoint_config

        s = self.settings
        config = RunHistory(folder).latest() or {}
        base, tokenizer, prompts, texts = self._load_base(config["model"])
        flexi = read_checkpoint_config(folder)["flexidepth"]
        own = float(flexi["tau"])
        threads = torch.get_num_threads()
        torch.set_num_threads(s.threads)
        try:  # its own threshold and the study's (a layer_replacement point: once, no threshold)
            systems = build_systems(
                base, [(point.run_name, str(folder))], sorted({own, *s.taus}), [], tokenizer, 1
            )
            speed = measure_speed(systems, prompts, None, s, None, texts)
            machine = machine_record(next(base.parameters()).dtype)
        finally:
            torch.set_num_threads(threads)
        modes = [m for m in speed["base"] if m != "layers_skipped"]
        record = {
            "settings": self.record_settings,
            "machine": machine,
            "row": point.row,
            "seed": point.seed,
            "run": str(folder),
            "tau": own,
            "static_layers": len(flexi.get("always_skip") or []),
            "modes": modes,
            "systems": [
                {
                    "tau": x.tau,
                    "kind": x.kind,
                    "layers_skipped": speed[x.label]["layers_skipped"],
                    "speed": {
                        m: {k: speed[x.label][m][k] for k in ("speedup_wall", "speedup_cpu", "tokens_per_s")}
                        for m in modes
                    },
                }
                for x in systems[1:]
            ],
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.result_path(point), json.dumps(record, indent=2, sort_keys=True))
        return record
