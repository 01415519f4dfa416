"""`python -m src.speed` measured (the command is src/speed.py; its module docstring says what is timed):
the systems built from one base model (`build_systems`: the base, each checkpoint at every tau, a
layer_replacement checkpoint once, ShortGPT with its layers deleted), the comparison at equal measured speedup
(`equal_speedup`) and the whole run (`run_speed`: speed.json, speed.md, ppl_vs_speedup.png). The settings
and the System record are speed_plan.py's, timing speed_timing.py's, drawing src/render/speed.py's."""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..render.speed import plot_speed, set_mode, speed_markdown
from ..utils.files import atomic_write_text
from .curves import interpolate
from .speed_plan import SpeedRun, SpeedSettings, System
from .speed_timing import flop_ideal, heldout_prompts, loop_vs_hf, machine_record, measure_speed

log = logging.getLogger(__name__)


STATIC_KINDS = ("shortgpt", "layer_replacement")  # one point each (no threshold): compared against the curves


def shared_copy(model):
    """A deep copy of `model` whose parameters and buffers are the original's tensors (no memory copied):
    module structure and config are new, so layers can be deleted or wrapped without touching `model`."""
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def checkpoint_labels(paths: list[Path]) -> list[str]:
    """Labels of the timed checkpoints: `flexidepth` for the first (ckpt_path), the run folder's name for
    the others (more_ckpts; `<run>/flexidepth` -> `<run>`). ValueError naming more_ckpts on a repeat."""
    labels = ["flexidepth"]
    for path in paths[1:]:
        path = Path(path)
        labels.append(path.parent.name if path.name == "flexidepth" else path.name)
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"more_ckpts: checkpoint labels must be unique (run folder names), repeated: {dup}")
    return labels


def build_systems(
    base, ckpts, taus, shortgpt_k, tokenizer, calibration_texts: int, always_run_max_skip: float | None = None
) -> list[System]:
    """base; for each (label, checkpoint folder) of `ckpts` by the method it was trained with: a FlexiDepth
    checkpoint at each tau (<label>@tau, one injected copy per checkpoint; with `always_run_max_skip` also
    <label>+ar@tau: the same model with the routed layers that at most that fraction of the calibration tokens
    skip set to always run, a curve of its own), a layer_replacement checkpoint once (<label>: its replaced
    layers take the adapter for every token, no threshold); shortgpt_k<k>: ShortGPT built by the method
    registry with its layers deleted (`method.prune`). Block Influence and the skip rates are measured on the
    training-side calibration text (never the held-out sets). Raises ValueError naming ckpt_path for a
    checkpoint of another method."""
    from ..flexidepth import set_tau
    from ..flexidepth.calibrate import rarely_skipped_layers
    from ..methods import build_method, checkpoint_method
    from ..methods.base import Calibration, calibration_batches

    systems = [System("base", "base", base)]
    calibration = None
    if always_run_max_skip is not None:  # the skip rates read it
        calibration = calibration_batches(tokenizer, Calibration(texts=calibration_texts))
    for name, ckpt in ckpts:
        method = checkpoint_method(ckpt)
        if method not in ("flexidepth", "layer_replacement"):
            raise ValueError(
                f"ckpt_path: {ckpt} holds a {method!r} checkpoint; src.speed times flexidepth and "
                "layer_replacement ones"
            )
        model = shared_copy(base)
        build_method({"name": method}).apply(model, ckpt=ckpt)
        model.eval()
        if method == "layer_replacement":
            replaced = sorted(model.flexidepth.config.always_skip)
            label = method if name == "flexidepth" else name
            systems.append(System(label, method, model, k=len(replaced), removed=replaced))
            continue
        systems += [System(f"{name}@{t:g}", "flexidepth", model, tau=float(t), ckpt=name) for t in taus]
        if always_run_max_skip is None:
            continue
        for t in taus:
            set_tau(model, t)
            always_run = rarely_skipped_layers(model, calibration, always_run_max_skip)
            systems.append(
                System(
                    f"{name}+ar@{t:g}",
                    "flexidepth",
                    model,
                    tau=float(t),
                    ckpt=f"{name}+ar",
                    always_run=always_run,
                )  # fmt: skip
            )
    for k in shortgpt_k:
        method = build_method(
            {"name": "shortgpt", "k": k, "prune": True, "calibration": {"texts": calibration_texts}}
        )
        pruned = shared_copy(base)
        applied = method.apply(pruned, tokenizer=tokenizer)
        systems.append(System(f"shortgpt_k{k}", "shortgpt", pruned, k=k, removed=list(applied.removed)))
    return systems


def equal_speedup(results: dict, mode: str = "decode_b1", basis: str = "wall") -> list[dict]:
    """Per held-out set and ShortGPT point: its ppl and FlexiDepth's ppl interpolated (log-linear) along the
    curve of (measured `mode` speedup by `basis` wall | cpu time, ppl) at the same speedup; None outside the
    curve's measured range. The curve's points are taken in speedup order (`curves.interpolate`), so on a
    noisy machine neighbouring taus may swap: read it with the speed table."""
    if basis not in ("wall", "cpu"):
        raise ValueError(f"basis must be 'wall' or 'cpu', got {basis!r}")
    key = f"speedup_{basis}"
    rows = []
    systems = results["systems"]
    for ckpt in results["ckpts"]:
        flexi = [s for s in systems.values() if s["kind"] == "flexidepth" and s["ckpt"] == ckpt]
        rows += _equal_rows(results, flexi, ckpt, mode, basis, key)
    return rows


def _equal_rows(results, flexi, ckpt, mode, basis, key) -> list[dict]:
    """`equal_speedup`'s rows for one checkpoint's curve (`flexi`: its systems in tau order)."""
    rows = []
    systems = results["systems"]
    for name in results["heldout"]:
        m = set_mode(results, mode, name)
        if m not in results["modes"]:
            continue
        curve = [(s["speed"][m][key], s["ppl"][name]["ppl"]) for s in flexi]
        for label, s in systems.items():
            if s["kind"] not in STATIC_KINDS:
                continue
            x = s["speed"][m][key]
            f = interpolate(curve, x)
            rows.append(
                {
                    "set": name,
                    "checkpoint": ckpt,
                    "baseline": label,
                    "basis": basis,
                    "mode": m,
                    "speedup": x,
                    "baseline_ppl": s["ppl"][name]["ppl"],
                    "flexidepth_ppl": f,
                    "flexidepth_wins": None if f is None else f < s["ppl"][name]["ppl"],
                }
            )
    return rows


def run_speed(s: SpeedRun, output_dir: Path) -> dict[str, Any]:
    """The whole measurement (module docstring) of the settings `s`, checked by the command
    (`src.config.commands.SpeedCommand.check`: taus sorted, checkpoints found); writes speed.json, speed.md
    and (with perplexity) ppl_vs_speedup.png into `output_dir` and returns the results written to speed.json.
    ValueError when `s.ckpt_path` is unset."""
    from ..flexidepth.checkpoint import resolve_checkpoint
    from ..models.loader import load_base_model
    from ..models.tokenizer import load_tokenizer, pad_token_id
    from ..utils.hardware import resolve_device
    from . import curves as C

    ckpt = resolve_checkpoint(s.ckpt_path)
    if ckpt is None:
        raise ValueError("ckpt_path is required: a FlexiDepth folder or a run folder holding flexidepth/")
    paths = [ckpt] + [resolve_checkpoint(p) for p in s.more_ckpts]
    ckpts = list(zip(checkpoint_labels(paths), paths, strict=True))
    curves = dict(ckpts)
    if s.always_run_max_skip is not None:
        curves.update({f"{name}+ar": path for name, path in ckpts})
    torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(s.model)
    prompts = heldout_prompts(tokenizer, s.heldout, s.prompts, s.prompt_length)
    prefill = heldout_prompts(tokenizer, s.heldout, 1, s.prefill_length)[0] if s.prefill_length else None
    torch.manual_seed(0)
    base = load_base_model(s.model).eval().to(device)
    base_config = copy.deepcopy(base.config)
    num_layers = base_config.num_hidden_layers
    systems = build_systems(
        base, ckpts, s.taus, s.shortgpt_k, tokenizer, s.calibration_texts, s.always_run_max_skip
    )
    for sys_ in systems:
        sys_.model.to(device)
    per_set = None
    if s.per_set_speed:
        per_set = {n: heldout_prompts(tokenizer, [n], s.prompts, s.prompt_length) for n in s.heldout}
    texts = None
    if s.text_decode:
        length = s.prompt_length + s.new_tokens
        texts = {n: heldout_prompts(tokenizer, [n], s.prompts, length) for n in s.heldout}
    speed = measure_speed(systems, prompts, prefill, s, per_set, texts)
    log.info("speed: timing our loop against HF generate on the base model")
    reference = loop_vs_hf(base, prompts, s.new_tokens, s.rounds, s.warmup)

    ppl: dict[str, dict] = {}
    if s.ppl_max_tokens != 0:
        sets = C.heldout_sets(tokenizer, s.heldout, s.ppl_max_length, s.ppl_max_tokens)
        pad = pad_token_id(tokenizer)
        for sys_ in systems:
            sys_.prepare()
            ppl[sys_.label] = C.measure(sys_.model, sets, s.ppl_batch_size, pad, num_layers=num_layers)
            log.info(
                "speed: %s ppl %s", sys_.label, {n: round(v["ppl"], 2) for n, v in ppl[sys_.label].items()}
            )

    results: dict[str, Any] = {
        "model": str(s.model.name_or_path),
        "ckpt": str(ckpt),
        "ckpts": {name: str(path) for name, path in curves.items()},
        "num_layers": num_layers,
        "machine": machine_record(next(base.parameters()).dtype),
        "settings": {f.name: getattr(s, f.name) for f in fields(SpeedSettings)},
        "heldout": s.heldout if ppl else [],
        "modes": [m for m in speed[systems[0].label] if not m.startswith("layers_skipped")],
        "loop_vs_hf": reference,
        "systems": {},
    }
    for sys_ in systems:
        sk = speed[sys_.label]["layers_skipped"]
        ideal = {mode: flop_ideal(base_config, sys_, v) for mode, v in sk.items()}
        results["systems"][sys_.label] = {
            "kind": sys_.kind,
            "ckpt": sys_.ckpt,
            "tau": sys_.tau,
            "k": sys_.k,
            "removed": sys_.removed,
            "always_run": sys_.always_run,
            "flop_ideal": ideal,
            "speed": speed[sys_.label],
            "ppl": ppl.get(sys_.label, {}),
        }
    results["equal_speedup"] = []
    if ppl:
        for mode in ("text_b1", "decode_b1") if texts else ("decode_b1",):
            for basis in ("wall", "cpu"):
                results["equal_speedup"] += equal_speedup(results, mode, basis)
    atomic_write_text(output_dir / "speed.json", json.dumps(_finite(results), indent=2, sort_keys=True))
    atomic_write_text(output_dir / "speed.md", speed_markdown(results))
    if ppl:
        plot_speed(results, output_dir / "ppl_vs_speedup.png")
    return results


def _finite(obj):
    """JSON-safe copy: non-finite floats become None (json.dumps would write NaN / Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
