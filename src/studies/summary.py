"""A study's results across seeds (src/studies/runner.py measures them; src/render/study.py draws them).

Per row and held-out set: the mean perplexity and layers skipped at each point's own threshold with 95%
t-intervals over seeds, the validation metrics, and, against the reference row, paired per-seed changes in
held-out perplexity (src/studies/stats.py):
- `vs_reference`: at each point's own threshold. Rows trained to one budget skip about as many layers on
  training text, but not necessarily on held-out text, so this mixes quality and depth;
- `at_reference_skip` (when the study measured extra thresholds, `study.taus`): the row's perplexity
  interpolated along its threshold curve (log-linear, src/eval/curves.py `interpolate`) at the layers the
  reference point of the same seed skipped on that set: the comparison at equal held-out layers skipped. A
  seed whose curve does not reach that depth is left out (never extrapolated); `n` says how many remain.
"""

from __future__ import annotations

import math
from typing import Any

from ..eval.curves import interpolate
from . import stats
from .spec import StudySpec


def summarise(spec: StudySpec, results: list[dict], base: dict) -> dict:
    """The summary dict of `results` (one per point: row, seed, sets, curve, val) and the base's result."""
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    ref = {r["seed"]: r for r in by_row.get(spec.reference, [])} if spec.reference else {}
    rows = []
    for row in spec.rows:
        rs = sorted(by_row.get(row, []), key=lambda r: r["seed"])
        if not rs:
            rows.append({"row": row, "seeds": [], "sets": {}})
            continue
        entry: dict[str, Any] = {"row": row, "seeds": [r["seed"] for r in rs], "sets": {}, "val": {}}
        for name in spec.heldout:
            cell = {
                "ppl": stats.mean_interval([r["sets"][name]["ppl"] for r in rs]).as_dict(),
                "layers_skipped": stats.mean_interval(
                    [r["sets"][name]["layers_skipped"] for r in rs]
                ).as_dict(),
            }
            if ref and row != spec.reference:
                ref_ppl = {s: r["sets"][name]["ppl"] for s, r in ref.items()}
                own = stats.paired_log_ratio({r["seed"]: r["sets"][name]["ppl"] for r in rs}, ref_ppl)
                cell["vs_reference"] = relative(own)
                if spec.taus:
                    at_k = {}
                    for r in rs:
                        if r["seed"] in ref:
                            k = ref[r["seed"]]["sets"][name]["layers_skipped"]
                            curve = [
                                (p["sets"][name]["layers_skipped"], p["sets"][name]["ppl"])
                                for p in r["curve"]
                            ]
                            value = interpolate(curve, k)
                            if value is not None:
                                at_k[r["seed"]] = value
                    cell["at_reference_skip"] = relative(stats.paired_log_ratio(at_k, ref_ppl))
            entry["sets"][name] = cell
        # each seed draws its own validation split, so val ppl is compared as a ratio to the base's on it
        ratios = [r["val"]["val/ppl"] / r["val"]["val/base_ppl"] for r in rs if "val/base_ppl" in r["val"]]
        if len(ratios) == len(rs):
            entry["val"]["ppl_ratio"] = stats.mean_interval(ratios).as_dict()
        skipped = [r["val"]["val/layers_skipped_mean"] for r in rs if "val/layers_skipped_mean" in r["val"]]
        if len(skipped) == len(rs):
            entry["val"]["layers_skipped"] = stats.mean_interval(skipped).as_dict()
        rows.append(entry)
    return {
        "study": spec.name,
        "description": spec.description,
        "reference": spec.reference,
        "seeds": list(spec.seeds),
        "heldout": list(spec.heldout),
        "taus": list(spec.taus),
        "base": {n: base["sets"][n]["ppl"] for n in spec.heldout},
        "rows": rows,
        "curves": {f"{r['row']}__s{r['seed']}": r["curve"] for r in results if len(r.get("curve", [])) > 1},
    }


def relative(diff: stats.Interval | None) -> dict | None:
    """A paired log-ratio interval as relative changes: exp(mean) - 1 and its bounds, with the verdict."""
    if diff is None:
        return None
    return {
        "mean": math.exp(diff.mean) - 1,
        "low": math.exp(diff.low) - 1,
        "high": math.exp(diff.high) - 1,
        "n": diff.n,
        "verdict": stats.verdict(diff),
    }
