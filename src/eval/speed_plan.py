"""What `python -m src.speed` measures, below both its halves (speed.py builds and compares the systems,
speed_timing.py times them): the measurement's settings (`SpeedSettings`, also a study's speed settings), one
run's settings with what it times (`SpeedRun`: the checkpoints, the base model, the device; the command's
schema `src.config.commands.SpeedCommand` extends it) and one timed system (`System`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..models.config import ModelConfig
from ..utils.errors import ConfigError, check_count

# smallest value of each count (0: switches that part off)
COUNTS = {"prompts": 1, "prompt_length": 1, "new_tokens": 1, "batch": 0, "prefill_length": 0, "rounds": 1,
          "warmup": 0, "threads": 1, "ppl_max_tokens": 0, "ppl_max_length": 2, "ppl_batch_size": 1,
          "calibration_texts": 1}  # fmt: skip


@dataclass
class SpeedSettings:
    """The keys of conf/speed.yaml that shape the measurement (documented there); typed by the command's
    schema (`src.config.commands.SpeedCommand`), values checked by `validate`."""

    taus: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    shortgpt_k: list[int] = field(default_factory=lambda: [2, 4, 6])
    prompts: int = 2
    prompt_length: int = 32
    new_tokens: int = 24
    batch: int = 8
    prefill_length: int = 256
    rounds: int = 3
    warmup: int = 1
    threads: int = 1
    heldout: list[str] = field(default_factory=lambda: ["lee"])
    ppl_max_tokens: int | None = 2048
    ppl_max_length: int = 256
    ppl_batch_size: int = 8
    calibration_texts: int = 32
    per_set_speed: bool = False
    text_decode: bool = True
    always_run_max_skip: float | None = None

    def validate(self) -> SpeedSettings:
        """Ranges (ConfigError naming the key; `shortgpt_k` against the model's depth is the command's
        check): taus a non-empty list in [0, 1], sorted without repeats; shortgpt_k whole numbers >= 1,
        sorted without repeats; counts >= 1 (batch, prefill_length, warmup, ppl_max_tokens: 0 switches that
        part off; ppl_max_tokens null: all); heldout known held-out set names. Returns self."""
        from ..data.mixture import check_heldout

        if not self.taus or not all(0.0 <= t <= 1.0 for t in self.taus):
            raise ConfigError(f"taus must be a non-empty list of thresholds in [0, 1], got {self.taus!r}")
        if not all(k >= 1 for k in self.shortgpt_k):
            raise ConfigError(f"shortgpt_k: every k must be an integer >= 1, got {self.shortgpt_k!r}")
        ar = self.always_run_max_skip
        if ar is not None and not 0 <= ar < 1:
            raise ConfigError(f"always_run_max_skip must be null or a skip rate in [0, 1), got {ar!r}")
        for key, low in COUNTS.items():
            check_count(key, getattr(self, key), low, nullable=key == "ppl_max_tokens")
        if not check_heldout(self.heldout, "heldout"):
            raise ConfigError("heldout must name at least one held-out set (prompts come from them)")
        self.taus = sorted(set(self.taus))
        self.shortgpt_k = sorted(set(self.shortgpt_k))
        return self


@dataclass
class SpeedRun(SpeedSettings):
    """One measurement: the settings and what is timed (conf/speed.yaml documents each key): the checkpoint
    `ckpt_path` (a FlexiDepth folder or a run folder holding flexidepth/), further checkpoints `more_ckpts`
    (one curve each), the base model and the `device` (cpu | cuda | auto)."""

    ckpt_path: str | None = None
    more_ckpts: list[str] = field(default_factory=list)
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)


@dataclass
class System:
    """One timed system: `model` (shared by the FlexiDepth taus), its threshold (None: not routed), the
    routed layers it runs without their router (`set_always_run`), the layers it deletes (ShortGPT) or
    replaces by adapters for every token (layer_replacement).

    kind: base | flexidepth (a checkpoint at one tau) | shortgpt (layers deleted) | layer_replacement (a
    trained static baseline's checkpoint, src/methods/layer_replacement.py: no router, no threshold)."""

    label: str
    kind: str
    model: Any
    tau: float | None = None
    k: int | None = None
    removed: list[int] = field(default_factory=list)
    ckpt: str | None = None  # FlexiDepth systems: the label of their curve (one per checkpoint and variant)
    always_run: list[int] = field(default_factory=list)

    @property
    def routed(self) -> bool:
        """Whether the model carries FlexiDepth layers (routes are recorded and counted): flexidepth and
        layer_replacement systems."""
        return getattr(self.model, "flexidepth", None) is not None

    def prepare(self) -> None:
        """Set the shared model to this system's tau and always-run layers (FlexiDepth systems only)."""
        if self.tau is not None:
            from ..flexidepth import set_always_run, set_tau

            set_tau(self.model, self.tau)
            set_always_run(self.model, self.always_run)
