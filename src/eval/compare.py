"""What `python -m src.compare` measures: the systems to compare (`plan_systems`: trained checkpoints, their
threshold matched to k layers, every untrained baseline at each k, random controls at a checkpoint's rates),
the tables (`run_compare`: the base once, then every system on a fresh copy, through the evaluation loop
`run.evaluate_against_base`; compare.json / compare.md) and the held-out curves (`run_curves`: perplexity
against layers skipped per held-out set; curves.json / curves.md / ppl_vs_skipped.png). Drawing is
src/render/'s; the command (settings, checks, logging) is src/compare.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..utils.files import atomic_write_text

log = logging.getLogger(__name__)


def plan_systems(s, model_config) -> list[dict[str, Any]]:
    """The systems to compare, in table order, each {label, method, ckpt, table}; missing checkpoints are
    reported and left out, checkpoints of another base model refused before anything is evaluated. Method
    configs are conf/method/<name>.yaml composed by Hydra (`src.methods.compose_method`, the app's search
    path) plus `method_overrides`, validated by the method's own schema (MethodConfigError names the key).
    `s`: src.compare's checked settings (`CompareCommand`: trained, baselines, k32, method_overrides,
    random_matched_to)."""
    from ..flexidepth.checkpoint import read_checkpoint_config, resolve_checkpoint
    from ..methods import build_method, compose_method
    from ..methods.removal import resolve_k

    num_layers = model_config.num_hidden_layers

    overrides = s.method_overrides or {}
    trained = {label: asdict(entry) for label, entry in (s.trained or {}).items()}
    systems, missing = [], []

    def ckpt_of(label: str):
        try:
            return resolve_checkpoint(trained[label]["ckpt"])
        except FileNotFoundError:
            return None

    for label, entry in trained.items():
        ckpt = ckpt_of(label)
        if ckpt is None:
            missing.append(label)
            continue
        stored = read_checkpoint_config(ckpt)["base_model"]
        for key in ("model_type", "num_hidden_layers", "hidden_size"):
            if stored[key] != getattr(model_config, key):
                raise ValueError(
                    f"trained.{label}: {ckpt} was trained on a model with {key}={stored[key]!r}, this base "
                    f"model has {getattr(model_config, key)!r} (pass ~trained to compare baselines only)"
                )
        systems.append({"label": label, "method": None, "ckpt": ckpt, "table": entry.get("table", "main")})
        for k32 in entry.get("match_k32") or []:  # the same router, its threshold set to skip k layers
            k = resolve_k(None, k32, num_layers)
            systems.append(
                {
                    "label": f"{label}@k{k}",
                    "method": None,
                    "ckpt": ckpt,
                    "table": entry.get("table", "main"),
                    "k": k,
                }
            )
    composed = {str(name): compose_method(str(name), overrides.get(name)) for name in s.baselines}
    for k32 in s.k32:
        for name in s.baselines:
            method = {**composed[str(name)], "k": None, "k32": k32}
            build_method(method)
            k = resolve_k(method.get("k"), method.get("k32"), num_layers)
            systems.append({"label": f"{name}_k{k}", "method": method, "ckpt": None, "table": "main"})
    for label in s.random_matched_to:
        ckpt = ckpt_of(label) if label in trained else None
        if ckpt is None:
            missing.append(f"random_matched_to {label}")
            continue
        method = compose_method("random_skip", {"match_rates": True})
        systems.append({"label": f"random_matched_{label}", "method": method, "ckpt": ckpt, "table": "main"})
    for label in missing:
        log.warning("compare: %s has no checkpoint yet; left out (train it first)", label)
    return systems


def run_compare(s) -> dict[str, Any]:
    """The tables: the base model once, then every planned system (`plan_systems`) on a fresh copy of it,
    through `src.eval.run.evaluate_against_base`; writes compare.json and compare.md
    (`src.render.report.compare_markdown`) into `paths.output_dir` and returns the results. `s`: src.compare's
    checked settings (`CompareCommand`)."""
    import torch

    from ..flexidepth import set_tau
    from ..flexidepth.calibrate import tau_for_k
    from ..methods import build_method, checkpoint_method
    from ..methods.base import Calibration, calibration_batches
    from ..models.loader import load_base_model
    from ..models.tokenizer import load_tokenizer
    from ..render.report import compare_markdown
    from ..utils.hardware import resolve_device
    from .run import eval_inputs, evaluate_against_base

    ev = s.eval
    device = resolve_device(ev.device)
    output_dir = Path(s.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(s.model)

    def fresh_model():
        torch.manual_seed(ev.seed)
        return load_base_model(s.model).eval().to(device)

    model = fresh_model()
    num_layers = model.config.num_hidden_layers
    systems = plan_systems(s, model.config)  # validates every method before any evaluation
    inputs = eval_inputs(tokenizer, ev, output_dir)
    skip = s.skip.flexidepth()

    def builder(system: dict):
        def apply(model):
            method = system["method"] or {"name": checkpoint_method(system["ckpt"])}
            applied = build_method(method).apply(model, tokenizer=tokenizer, ckpt=system["ckpt"], skip=skip)
            model.to(device)
            if system.get("k") is not None:  # threshold matched to k on calibration text (training side)
                tau = tau_for_k(model, calibration_batches(tokenizer, Calibration(texts=16)), system["k"])
                set_tau(model, tau)
                applied.k, applied.details["tau"] = system["k"], tau
                log.info("compare: %s threshold %.4f for k=%s", system["label"], tau, system["k"])
            log.info("compare: %s (%s)", system["label"], applied.label)
            return applied

        return apply

    # retention intervals keep compare.json's bootstrap seed (0), as before the shared loop
    loop = evaluate_against_base(
        model,
        tokenizer,
        ev,
        inputs,
        [(system["label"], builder(system)) for system in systems],
        fresh_model=fresh_model,
        retention_seed=0,
    )
    del model  # the loop holds the only reference: each system's fresh model replaces it
    rows = [table_row(next(loop), "main")]  # the base model
    for system, res in zip(systems, loop, strict=True):
        rows.append(table_row(res, system["table"]))
    results = {
        "model": str(s.model.name_or_path),
        "num_layers": num_layers,
        "k": sorted({r["k_target"] for r in rows if r["k_target"] is not None}),
        "settings": asdict(ev),
        "ablation_reference": s.ablation_reference,
        "rows": rows,
    }
    atomic_write_text(output_dir / "compare.json", json.dumps(results, indent=2, sort_keys=True))
    atomic_write_text(output_dir / "compare.md", compare_markdown(results))
    return results


def run_curves(s) -> dict[str, Any]:
    """Held-out perplexity vs layers skipped *on each held-out set* (src/eval/curves.py).

    The base model once; every trained FlexiDepth entry of `trained` (table main) as a threshold curve (its
    own tau plus the thresholds that skip `curves.curve_k` layers on calibration text); every baseline of
    `curves.baselines` at each k of `curves.k` as a point (removal skips exactly k; random skipping at a
    uniform rate k / R with an identity skip path). Writes curves.json, curves.md (the comparison at equal
    layers skipped, interpolated along each curve) and ppl_vs_skipped.png (one panel per held-out set).
    `s`: src.compare's checked settings (`CompareCommand`: curves, eval, model, skip, trained).
    """
    import copy

    import torch

    from ..data.mixture import check_heldout
    from ..flexidepth.calibrate import tau_for_k
    from ..methods import build_method, checkpoint_method
    from ..methods.base import Calibration, calibration_batches
    from ..models.loader import load_base_model
    from ..models.tokenizer import load_tokenizer, pad_token_id
    from ..utils.hardware import resolve_device
    from . import curves as C

    cc = s.curves
    names = check_heldout(list(cc.heldout), "curves.heldout")
    ks = [float(k) for k in cc.k]
    device = resolve_device(s.eval.device)
    output_dir = Path(s.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(s.model)
    torch.manual_seed(s.eval.seed)
    base = load_base_model(s.model).eval().to(device)
    num_layers = base.config.num_hidden_layers
    systems = [x for x in plan_systems(s, base.config) if x["method"] is None and "k" not in x]
    systems = [x for x in systems if x["table"] == "main" and checkpoint_method(x["ckpt"]) == "flexidepth"]
    sets = C.heldout_sets(tokenizer, names, cc.max_length, cc.max_tokens)
    pad = pad_token_id(tokenizer)
    bs = s.eval.batch_size
    base_sets = C.measure(base, sets, bs, pad)
    log.info("curves: base %s", {n: round(v["ppl"], 2) for n, v in base_sets.items()})
    curves, points = {}, {}
    for system in systems:
        model = copy.deepcopy(base)
        build_method({"name": "flexidepth"}).apply(model, ckpt=system["ckpt"])
        cal = calibration_batches(tokenizer, Calibration(texts=cc.calibration_texts))
        own = float(model.flexidepth.config.tau)
        taus = sorted({own, *(round(tau_for_k(model, cal, float(k)), 6) for k in cc.curve_k)})
        curves[system["label"]] = C.tau_curve(model, sets, taus, bs, pad)
        log.info("curves: %s at %d thresholds", system["label"], len(taus))
        del model
    skip = s.skip.flexidepth()
    for name in cc.baselines:
        for k in cc.k:
            method = {"name": name, "k": int(k), "k32": None}  # random_skip: uniform rate (no checkpoint)
            model = copy.deepcopy(base)
            applied = build_method(method).apply(model, tokenizer=tokenizer, skip=skip)
            label = f"{name}_k{int(k)}"
            points[label] = {
                "k": float(k),
                "removed": applied.removed,
                "sets": C.measure(model.to(device), sets, bs, pad, num_layers=num_layers),
            }
            log.info(
                "curves: %s %s", label, {n: round(v["ppl"], 2) for n, v in points[label]["sets"].items()}
            )
            del model
    results = {
        "model": str(s.model.name_or_path),
        "num_layers": num_layers,
        "heldout": names,
        "tokens": {n: base_sets[n]["tokens"] for n in names},
        "k": ks,
        "base": base_sets,
        "curves": curves,
        "points": points,
        "at_k": C.summary(curves, points, ks),
    }
    (output_dir / "curves.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    md = f"# Held-out perplexity vs layers skipped on `{results['model']}` ({num_layers} layers)\n\n"
    md += "Tokens per set: " + ", ".join(f"{n} {t}" for n, t in results["tokens"].items()) + ".\n\n"
    (output_dir / "curves.md").write_text(md + C.markdown(curves, points, base_sets, ks))
    C.plot(curves, points, base_sets, output_dir / "ppl_vs_skipped.png")
    return results


def table_row(res, table: str) -> dict[str, Any]:
    """One system's row of compare.json from its `SystemResult` (src/eval/run.py): scores, layers skipped,
    perplexity, retention against the base (`res.retention`; 1.0 for the base itself) and analytic MACs
    saved (a fraction; 0.0 for the base)."""
    from .run import all_scores

    applied, summary = res.applied, res.summary
    method = "base" if applied is None else applied.name
    scores = all_scores(summary)
    ret = res.retention
    macs = res.flops.get("scored")
    lay = summary["layers"]
    return {
        "label": res.label,
        "method": method,
        "table": table,
        "k_target": None if applied is None or applied.k is None else round(float(applied.k), 2),
        "removed": [] if applied is None else applied.removed,
        "layers_skipped_scored": lay["layers_skipped_scored"],
        "layers_skipped_generated": lay["layers_skipped_generated"],
        "ppl": summary["perplexity"]["ppl"],
        "scores": scores,
        "scores_ci": {
            t: [v["ci_low"], v["ci_high"]] for t, v in summary["tasks"].items() if v.get("ci_low") is not None
        },
        "layers_used_by_task": {
            t: {
                "prompt": v["layers_used_prompt"],
                "generated": v.get("layers_used_answer", v["layers_used_generated"]),
            }
            for t, v in summary["tasks"].items()
        },
        "retention": ret["retention"] if ret is not None else 1.0,
        "retention_ci": ret["interval"] if ret is not None else None,
        "macs_saved_frac": 0.0 if macs is None else macs["analytic_macs_saved_frac"],
    }
