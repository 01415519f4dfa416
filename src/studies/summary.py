"""A study's results across seeds (src/studies/runner.py measures them; src/render/study.py draws them).

Per row and held-out set: the mean perplexity and layers skipped at each point's own threshold with 95%
t-intervals over seeds, the validation metrics, and paired per-seed changes in held-out perplexity against the
row's comparison row (`study.against`, else the reference;
`StudySpec.comparison_row`) (src/studies/stats.py):
- `vs_comparison`: at each point's own threshold. Rows trained to one budget skip about as many layers on
  training text, but not necessarily on held-out text, so this mixes quality and depth;
- `at_equal_skip` (when the study measured extra thresholds, `study.taus`): at equal held-out layers skipped,
  per seed: the row's perplexity interpolated along its threshold curve (log-linear, src/eval/curves.py
  `interpolate`) at the layers the comparison point of the same seed skipped on that set, against that
  point's perplexity; where the row's curve does not reach that depth (a static row is one point), the row's
  own point against the comparison row's curve interpolated at the row's depth. A seed where neither curve
  reaches the other's depth is left out (never extrapolated); `n` says how many remain.
With the speed stage (`study.speed`, src/studies/speed.py), per row the measured batch-1 decode speedups at
the own threshold, and per set:
- `at_equal_speed`: against the row's comparison row (`study.against`, else the reference) at equal measured
  speedup on the set's own text (`text_b1@<set>`; `decode_b1` without text decoding), paired by seed: the
  comparison row's perplexity interpolated along its threshold curve of (speedup, ppl) at the row's own
  speedup, or, where that curve does not reach it (or the comparison row is one static point), the row's curve
  interpolated at the comparison row's speedup; n < seeds where neither reaches;
- `frontier`: every row's (speedup, ppl) per threshold, averaged over seeds (ppl geometrically), with the
  share of its skipped layers that are routed (not static), and the best-perplexity frontier over them;
- `saving_per_layer`: the share of the base's per-token time the row saves per layer it skips on the set,
  (1 - 1/speedup) / layers skipped at its own threshold (what a skipped layer is worth in time);
- `break_even` (against a comparison row with a threshold curve): the saving per skipped layer the comparison
  row would need to match this row at equal speed and equal ppl, per seed (1 - 1/speedup of this row) / the
  depth at which the comparison row's held-out curve reaches this row's ppl (`curves.depth_at`), beside the
  comparison row's measured saving per skipped layer: routing pays against a static row where the measured
  saving exceeds the required one.
"""

from __future__ import annotations

import math
from typing import Any

from ..eval.curves import depth_at, interpolate
from . import stats
from .spec import StudySpec


def summarise(
    spec: StudySpec,
    results: list[dict],
    base: dict,
    speeds: dict[str, dict] | None = None,
    evals: dict[str, dict] | None = None,
) -> dict:
    """The summary dict of `results` (one per point: row, seed, sets, curve, val), the base's result, the
    points' speed records (`speeds`: run name -> src/studies/speed.py record; None or {}: no speed columns) and
    their evaluation records (`evals`: run name -> src/studies/evaluate.py record; None or {}: none)."""
    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    rows = []
    for row in spec.rows:
        rs = sorted(by_row.get(row, []), key=lambda r: r["seed"])
        if not rs:
            rows.append({"row": row, "seeds": [], "sets": {}})
            continue
        entry: dict[str, Any] = {"row": row, "seeds": [r["seed"] for r in rs], "sets": {}, "val": {}}
        other = spec.comparison_row(row)
        comparison = {r["seed"]: r for r in by_row.get(other, [])} if other else {}
        for name in spec.heldout:
            cell = {
                "ppl": stats.mean_interval([r["sets"][name]["ppl"] for r in rs]).as_dict(),
                "layers_skipped": stats.mean_interval(
                    [r["sets"][name]["layers_skipped"] for r in rs]
                ).as_dict(),
            }
            if comparison:
                own = stats.paired_log_ratio(
                    {r["seed"]: r["sets"][name]["ppl"] for r in rs},
                    {s: r["sets"][name]["ppl"] for s, r in comparison.items()},
                )
                cell["vs_comparison"] = relative(own)
                if spec.taus:
                    cell["at_equal_skip"] = relative(at_equal_skip(rs, comparison, name))
            random = {r["seed"]: r for r in rs if "random" in r}
            if random:
                cell["random"] = random_cell(random, name)
            entry["sets"][name] = cell
        if speeds:
            add_speed(spec, entry, rs, by_row, speeds)
        mine = {s: (evals or {}).get(f"{row}__s{s}") for s in entry["seeds"]}
        if any(mine.values()):
            ref_evals = {s: (evals or {}).get(f"{spec.reference}__s{s}") for s in spec.seeds}
            entry["evaluate"] = evaluate_cell(
                {s: r for s, r in mine.items() if r},
                {s: r for s, r in ref_evals.items() if r} if spec.reference and row != spec.reference else {},
            )
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
        "reference_taus": list(spec.reference_taus),
        "base": {n: base["sets"][n]["ppl"] for n in spec.heldout},
        "rows": rows,
        "curves": {f"{r['row']}__s{r['seed']}": r["curve"] for r in results if len(r.get("curve", [])) > 1},
        "against": {row: spec.comparison_row(row) for row in spec.rows if spec.comparison_row(row)},
        "axis": dict(spec.axis),
        "axis_label": spec.axis_label,
        **({"frontier": frontier(spec, results, speeds)} if speeds else {}),
    }


def _depth_curve(point: dict, name: str) -> list[tuple[float, float]]:
    """A measured point's threshold curve on set `name` as (layers skipped, ppl) pairs."""
    return [(p["sets"][name]["layers_skipped"], p["sets"][name]["ppl"]) for p in point["curve"]]


def at_equal_skip(rs: list[dict], comparison: dict[int, dict], name: str) -> stats.Interval | None:
    """Paired log ratio (row / comparison row) of held-out perplexity on set `name` at equal layers skipped,
    per seed both have: the row's curve at the comparison point's depth, else (the row's curve does not reach
    it, e.g. a static row) the row's own point against the comparison row's curve at the row's depth; a seed
    where neither reaches is left out (module docstring). None without a seed."""
    row_ppl, other_ppl = {}, {}
    for r in rs:
        c = comparison.get(r["seed"])
        if c is None:
            continue
        at_other = interpolate(_depth_curve(r, name), c["sets"][name]["layers_skipped"])
        if at_other is not None:
            row_ppl[r["seed"]], other_ppl[r["seed"]] = at_other, c["sets"][name]["ppl"]
            continue
        at_row = interpolate(_depth_curve(c, name), r["sets"][name]["layers_skipped"])
        if at_row is not None:
            row_ppl[r["seed"]], other_ppl[r["seed"]] = r["sets"][name]["ppl"], at_row
    return stats.paired_log_ratio(row_ppl, other_ppl)


def evaluate_cell(records: dict[int, dict], reference: dict[int, dict]) -> dict:
    """A row's evaluation records (seed -> src/studies/evaluate.py record) across seeds: the task suite's
    retention (mean and 95% interval; `vs_reference`: the paired relative change against the reference row's,
    'better' when higher) and per token-type claim its measured value (mean and interval over seeds) with the
    per-seed verdicts counted ({"reversed": 3}: the claim's direction reversed at every seed)."""
    ret = {s: r["retention"]["value"] for s, r in records.items() if r["retention"]["value"] is not None}
    ref = {s: r["retention"]["value"] for s, r in reference.items() if r["retention"]["value"] is not None}
    positive = lambda d: {s: v for s, v in d.items() if v > 0}  # noqa: E731  (a log ratio needs both > 0)
    cell: dict[str, Any] = {
        "seeds": sorted(records),
        "retention": stats.mean_interval(list(ret.values())).as_dict() if ret else None,
        "retention_vs_reference": relative(
            stats.paired_log_ratio(positive(ret), positive(ref)), worse_if_positive=False
        )
        if ref
        else None,
        "claims": {},
    }
    for name in sorted({c for r in records.values() for c in r["claims"]}):
        claims = [r["claims"][name] for r in records.values() if name in r["claims"]]
        values = [c["value"] for c in claims if c["value"] is not None]
        verdicts: dict[str, int] = {}
        for c in claims:
            verdicts[str(c["verdict"])] = verdicts.get(str(c["verdict"]), 0) + 1
        cell["claims"][name] = {
            "value": stats.mean_interval(values).as_dict() if values else None,
            "verdicts": verdicts,
        }
    return cell


def random_cell(results: dict[int, dict], name: str) -> dict:
    """Random routes at the learned per-layer rates against the learned routes of the same points, on set
    `name`: their ppl and layers skipped (means over seeds), and the paired change in ppl against the learned
    curve interpolated at the depth the random routes reached on the set (`vs_learned`; a seed whose curve does
    not reach that depth is left out)."""
    rand, learned = {}, {}
    for seed, r in results.items():
        cell = r["random"]["sets"][name]
        value = interpolate(_depth_curve(r, name), cell["layers_skipped"])
        if value is not None:
            rand[seed], learned[seed] = cell["ppl"], value
    return {
        "ppl": stats.mean_interval([r["random"]["sets"][name]["ppl"] for r in results.values()]).as_dict(),
        "layers_skipped": stats.mean_interval(
            [r["random"]["sets"][name]["layers_skipped"] for r in results.values()]
        ).as_dict(),
        "vs_learned": relative(stats.paired_log_ratio(rand, learned)),
    }


def speed_mode(record: dict, name: str) -> str:
    """The mode a speed record timed held-out set `name` in: its own text (text_b1@name) if timed, else
    greedy continuations of the study's prompts (decode_b1)."""
    return f"text_b1@{name}" if f"text_b1@{name}" in record["modes"] else "decode_b1"


def speed_curve(result: dict, record: dict, name: str) -> list[dict]:
    """One point's (threshold, speedup on set `name`, ppl and layers skipped on it, routed share) joined by
    threshold from its held-out result and its speed record; a static point (tau None) gives one entry at its
    own result."""
    mode = speed_mode(record, name)
    by_tau = {round(p["tau"], 6): p["sets"][name] for p in result["curve"]}
    out = []
    for system in record["systems"]:
        tau = system["tau"]
        cell = result["sets"][name] if tau is None else by_tau.get(round(tau, 6))
        if cell is None:
            continue
        skipped = cell["layers_skipped"]
        routed = 0.0 if skipped <= 0 else max(0.0, skipped - record["static_layers"]) / skipped
        out.append({"tau": tau, "speedup": system["speed"][mode]["speedup_wall"], "ppl": cell["ppl"],
                    "layers_skipped": skipped, "routed_share": routed})  # fmt: skip
    return sorted(out, key=lambda p: p["speedup"])


def _at_own_tau(items: list[dict], tau: float) -> dict:
    """The entry of `items` (speed systems or speed-curve entries) at the point's own threshold `tau`; a static
    point's single entry (tau None)."""
    return next(x for x in items if x["tau"] is None or round(x["tau"], 6) == round(tau, 6))


def add_speed(spec: StudySpec, entry: dict, rs: list[dict], by_row: dict, speeds: dict) -> None:
    """The row's speed columns (`entry["speed"]`: speedup per mode at the own threshold) and, per set, its
    saving per skipped layer, its comparison at equal measured speed (`at_equal_speed`) and the break-even
    saving of its comparison row (`break_even`; module docstring)."""
    timed = [(r, speeds[f"{r['row']}__s{r['seed']}"]) for r in rs if f"{r['row']}__s{r['seed']}" in speeds]
    if not timed:
        return
    modes = [m for m in timed[0][1]["modes"] if all(m in rec["modes"] for _, rec in timed)]
    entry["speed"] = {}
    for m in modes:
        own = [_at_own_tau(rec["systems"], r["tau"])["speed"][m]["speedup_wall"] for r, rec in timed]
        entry["speed"][m] = stats.mean_interval(own).as_dict()
    other = spec.comparison_row(entry["row"])
    others = {} if other is None else {
        r["seed"]: r for r in by_row.get(other, []) if f"{other}__s{r['seed']}" in speeds
    }  # fmt: skip
    for name in spec.heldout:
        saving, mine, theirs, required, their_saving = [], {}, {}, [], []
        for r, rec in timed:
            a = speed_curve(r, rec, name)
            a_own = _at_own_tau(a, r["tau"])
            if a_own["layers_skipped"] > 0:
                saving.append(saving_per_layer(a_own))
            o = others.get(r["seed"])
            if o is None:
                continue
            b = speed_curve(o, speeds[f"{other}__s{o['seed']}"], name)
            b_own = _at_own_tau(b, o["tau"])
            value = (
                interpolate([(p["speedup"], p["ppl"]) for p in b], a_own["speedup"]) if len(b) > 1 else None
            )
            if value is not None:
                mine[r["seed"]], theirs[r["seed"]] = a_own["ppl"], value
            else:
                value = (
                    interpolate([(p["speedup"], p["ppl"]) for p in a], b_own["speedup"])
                    if len(a) > 1
                    else None
                )
                if value is not None:
                    mine[r["seed"]], theirs[r["seed"]] = value, b_own["ppl"]
            depth = depth_at(_depth_curve(o, name), a_own["ppl"])
            if depth and depth > 0 and b_own["layers_skipped"] > 0:
                required.append((1 - 1 / a_own["speedup"]) / depth)
                their_saving.append(saving_per_layer(b_own))
        cell = entry["sets"][name]
        if saving:
            cell["saving_per_layer"] = stats.mean_interval(saving).as_dict()
        if other is not None:
            cell["at_equal_speed"] = relative(stats.paired_log_ratio(mine, theirs))
        if required:
            cell["break_even"] = {"required": stats.mean_interval(required).as_dict(),
                                  "measured": stats.mean_interval(their_saving).as_dict()}  # fmt: skip


def saving_per_layer(point: dict) -> float:
    """The share of the base model's per-token decode time a point saves per layer it skips:
    (1 - 1 / speedup) / layers skipped (a layer of an L-layer model is at most ~1/L of it)."""
    return (1 - 1 / point["speedup"]) / point["layers_skipped"]


def frontier(spec: StudySpec, results: list[dict], speeds: dict) -> dict:
    """Per held-out set: every timed row's points per threshold ({row, tau, speedup, ppl, layers_skipped,
    routed_share, n}: means over seeds, ppl geometric) and `best`: the points no other point beats in both
    speedup and ppl, by speedup (the best held-out ppl reachable at each measured speedup)."""
    out = {}
    for name in spec.heldout:
        groups: dict[tuple, list[dict]] = {}
        for r in results:
            rec = speeds.get(f"{r['row']}__s{r['seed']}")
            if rec is None:
                continue
            for p in speed_curve(r, rec, name):
                tau = None if p["tau"] is None else round(p["tau"], 6)
                groups.setdefault((r["row"], tau), []).append(p)
        points = []
        for (row, tau), ps in groups.items():
            n = len(ps)
            points.append({
                "row": row, "tau": tau, "n": n,
                "speedup": sum(p["speedup"] for p in ps) / n,
                "ppl": math.exp(sum(math.log(p["ppl"]) for p in ps) / n),
                "layers_skipped": sum(p["layers_skipped"] for p in ps) / n,
                "routed_share": sum(p["routed_share"] for p in ps) / n,
            })  # fmt: skip
        best = [p for p in points
                if not any(q["speedup"] >= p["speedup"] and q["ppl"] < p["ppl"] for q in points if q is not p)]  # fmt: skip
        out[name] = {"points": points, "best": sorted(best, key=lambda p: p["speedup"])}
    return out


def relative(diff: stats.Interval | None, worse_if_positive: bool = True) -> dict | None:
    """A paired log-ratio interval as relative changes: exp(mean) - 1 and its bounds, with the verdict (an
    increase is worse, as for perplexity, unless `worse_if_positive` is False)."""
    if diff is None:
        return None
    return {
        "mean": math.exp(diff.mean) - 1,
        "low": math.exp(diff.low) - 1,
        "high": math.exp(diff.high) - 1,
        "n": diff.n,
        "verdict": stats.verdict(diff, worse_if_positive),
    }
