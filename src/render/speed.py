"""`python -m src.speed`'s results drawn: speed.md (`speed_markdown`, `ideal_markdown`) and
ppl_vs_speedup.png (`plot_speed`: held-out perplexity against measured speedup, a panel per held-out set and
speed basis), from the dict src/eval/speed.py measures."""

from __future__ import annotations

from pathlib import Path


def set_mode(results: dict, mode: str, name: str) -> str:
    """`<mode>@<name>` when the run timed held-out set `name` in that mode (decode_b1: per_set_speed, its own
    prompts; text_b1: text_decode, its own text), else `mode`."""
    return f"{mode}@{name}" if f"{mode}@{name}" in results.get("modes", []) else mode


def speed_markdown(results: dict) -> str:
    """speed.md: the machine, the speed table (per system: layers skipped on generated tokens, tokens/s
    and speedups per mode, FLOP-ideal), held-out ppl per set and the comparison at equal measured speedup."""
    m = results["machine"]
    st = results["settings"]
    modes = results["modes"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of the listed"
    lines = [
        f"# Measured speed of `{results['ckpt']}` on `{results['model']}` ({results['num_layers']} layers)",
        "",
        *(
            [
                "Checkpoints (one tau curve each): "
                + "; ".join(f"`{n}` = `{p}`" for n, p in results["ckpts"].items())
                + ".",
                "",
            ]
            if len(results["ckpts"]) > 1
            else []
        ),
        f"Machine: {m['cpu_model']} ({m['logical_cpus']} logical CPUs; flags: {flags}); {m['threads']} "
        f"thread(s), {m['dtype']}, torch {m['torch']}, transformers {m['transformers']}; 1-min load "
        f"{'unknown' if m['load_avg_1min'] is None else round(m['load_avg_1min'], 2)}. Ratios are only comparable on like hardware; on a shared machine compare the "
        "CPU-time ratios too.",
        "",
        f"{st['prompts']} held-out prompts of {st['prompt_length']} tokens, {st['new_tokens']} new tokens "
        f"(greedy; decode steps timed, not the prefill), batch {st['batch']}, prefill of "
        f"{st['prefill_length']} tokens; {st['rounds']} rounds after {st['warmup']} warm-up (decode in lockstep: "
        "step t of every system before step t + 1 of any; prefill interleaved). Speedup = median over rounds of "
        "base seconds / system seconds in the same round (wall; CPU in brackets); tok/s from median seconds. "
        "`decode_b1@<set>`: greedy "
        "continuations of that set's prompts; `text_b1@<set>`: that set's own text decoded teacher-forced, one "
        "token per step (held-out text, not a model's own continuation).",
        "",
    ]
    head = ["system", "layers skipped / gen. token", "FLOP-ideal"]
    for mode in modes:
        head += [f"{mode} tok/s", f"{mode} speedup"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in results["systems"].items():
        cells = [
            label,
            f"{s['speed']['layers_skipped']['decode_b1']:.2f}",
            f"{s['flop_ideal']['decode_b1']:.3f}",
        ]
        for mode in modes:
            r = s["speed"][mode]
            cells += [f"{r['tokens_per_s']:.1f}", f"{r['speedup_wall']:.3f} ({r['speedup_cpu']:.3f})"]
        lines.append("| " + " | ".join(cells) + " |")
    always_run = {label: s["always_run"] for label, s in results["systems"].items() if s.get("always_run")}
    if always_run:
        lines += [
            "",
            "Routed layers run without their router (`<checkpoint>+ar`: at most "
            f"{st['always_run_max_skip']:g} of the calibration tokens skip them at that tau): "
            + "; ".join(f"`{label}` {layers}" for label, layers in always_run.items())
            + ".",
        ]
    ref = results.get("loop_vs_hf")
    if ref:
        lines += [
            "",
            f"Our loop against HF `generate` on the base model (batch 1, prefill included): {ref['ours_s']:.3f} s vs "
            f"{ref['hf_s']:.3f} s, HF / ours = {ref['hf_over_ours']:.3f}; a speedup above times this is the "
            "speedup over HF `generate`.",
        ]
    lines += ["", *ideal_markdown(results)]
    sets = results["heldout"]
    if not sets:  # ppl_max_tokens=0: speed only
        return "\n".join(lines) + "\n"
    lines += ["", "## Held-out perplexity (layers skipped on the set / ppl)", ""]
    lines += ["| system | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for label, s in results["systems"].items():
        cells = [f"{s['ppl'][n]['layers_skipped']:.2f} / {s['ppl'][n]['ppl']:.2f}" for n in sets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## At equal measured decode speedup (batch 1)",
        "",
        "FlexiDepth's ppl interpolated (log-linear) along its (measured speedup, ppl) curve at each baseline's "
        "measured speedup, by wall time and by CPU time; '-' = outside the speedups its taus reached. Basis "
        "`set's text`: speed on the set's own text; `own prompts`: speed on greedy continuations.",
        "",
        "| held-out set | checkpoint | baseline | basis | speedup | baseline ppl | FlexiDepth ppl | FlexiDepth better |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["equal_speedup"]:
        f = "-" if r["flexidepth_ppl"] is None else f"{r['flexidepth_ppl']:.2f}"
        win = "-" if r["flexidepth_wins"] is None else ("yes" if r["flexidepth_wins"] else "no")
        lines.append(
            f"| {r['set']} | {r.get('checkpoint', 'flexidepth')} | {r['baseline']} | {basis_cell(r)} | {r['speedup']:.3f} | "
            f"{r['baseline_ppl']:.2f} | {f} | {win} |"
        )
    lines += ["", *faster_and_better_markdown(results)]
    return "\n".join(lines) + "\n"


def faster_and_better(results: dict, mode: str = "decode_b1") -> list[dict]:
    """Per held-out set and ShortGPT point: among the FlexiDepth systems (every checkpoint, variant and tau)
    measured at least as fast in `mode` (wall time), the one with the lowest ppl on the set, and in how many
    paired rounds its decode took less time than the baseline's (the same round of the lockstep timing).

    A comparison of measured points, no interpolation: it also answers a baseline that no tau curve passes
    through. Rows: {set, baseline, speedup, baseline_ppl, system (None: no system that fast), system_speedup,
    system_ppl, better, faster_rounds, rounds}."""
    systems = results["systems"]
    flexi = {label: s for label, s in systems.items() if s["kind"] == "flexidepth" and mode in s["speed"]}
    rows = []
    for name in results["heldout"]:
        for label, b in systems.items():
            if b["kind"] not in ("shortgpt", "layer_replacement") or mode not in b["speed"]:
                continue
            x, b_ppl = b["speed"][mode]["speedup_wall"], b["ppl"][name]["ppl"]
            fast = [
                (s["ppl"][name]["ppl"], k) for k, s in flexi.items() if s["speed"][mode]["speedup_wall"] >= x
            ]
            row = {"set": name, "baseline": label, "speedup": x, "baseline_ppl": b_ppl, "system": None}
            if fast:
                ppl, best = min(fast)
                pairs = list(
                    zip(b["speed"][mode]["wall_s"], flexi[best]["speed"][mode]["wall_s"], strict=True)
                )
                row.update(
                    system=best, system_speedup=flexi[best]["speed"][mode]["speedup_wall"], system_ppl=ppl
                )
                row.update(
                    better=ppl < b_ppl, faster_rounds=sum(bt > t for bt, t in pairs), rounds=len(pairs)
                )
            rows.append(row)
    return rows


def faster_and_better_markdown(results: dict) -> list[str]:
    lines = [
        "## Best FlexiDepth point at least as fast as each baseline (batch-1 greedy decoding, wall time)",
        "",
        "Measured points only (any checkpoint, variant and tau), no interpolation; `faster in`: paired rounds in "
        "which the system's decode took less time than the baseline's.",
        "",
        "| held-out set | baseline | speedup | baseline ppl | system | its speedup | its ppl | better | faster in |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in faster_and_better(results):
        head = f"| {r['set']} | {r['baseline']} | {r['speedup']:.3f} | {r['baseline_ppl']:.2f} |"
        if r["system"] is None:
            lines.append(head + " - | - | - | - | - |")
            continue
        lines.append(
            head + f" {r['system']} | {r['system_speedup']:.3f} | {r['system_ppl']:.2f} | "
            f"{'yes' if r['better'] else 'no'} | {r['faster_rounds']} of {r['rounds']} |"
        )
    return lines


def ideal_markdown(results: dict) -> list[str]:
    """Per system and batch-1 mode: routed layers skipped per decoded token, FLOP-ideal speedup at that
    depth, measured speedup (wall) and measured / ideal (issue 23's T1 reads this table)."""
    modes = [m for m in results["modes"] if m.startswith(("decode_b1", "text_b1"))]
    lines = [
        "## Batch-1 speedup against its FLOP-ideal (layers skipped per decoded token: measured / ideal)",
        "",
        "| system | " + " | ".join(modes) + " |",
        "|" + "---|" * (len(modes) + 1),
    ]
    for label, s in results["systems"].items():
        cells = []
        for mode in modes:
            sk, ideal = s["speed"]["layers_skipped"][mode], s["flop_ideal"][mode]
            got = s["speed"][mode]["speedup_wall"]
            cells.append(f"{sk:.2f}: {got:.3f} / {ideal:.3f} = {got / ideal:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def basis_cell(row: dict) -> str:
    """`wall` / `cpu`, plus `, set's text` (teacher-forced decode of the set's own text) or `, own prompts`
    (greedy continuations of the set's prompts) when timed per set."""
    mode = row.get("mode", "")
    own = ", set's text" if mode.startswith("text_b1@") else (", own prompts" if "@" in mode else "")
    return f"{row.get('basis', 'wall')}{own}"


def plot_speed(results: dict, path: str | Path) -> Path:
    """Held-out ppl vs measured batch-1 decode speedup, one panel per set: FlexiDepth's tau curve (line, in
    tau order), the base at 1.0 and the static baselines as points. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["heldout"]
    systems = results["systems"]
    bases = [
        b for b in ("text_b1", "decode_b1") if any(set_mode(results, b, n) in results["modes"] for n in names)
    ]
    titles = {"text_b1": "speed on the set's text (teacher-forced)", "decode_b1": "speed on greedy decoding"}
    fig, axes = plt.subplots(
        len(bases), len(names), figsize=(4.2 * len(names), 3.6 * len(bases)), squeeze=False
    )
    for row, basis in enumerate(bases):
        for ax, name in zip(axes[row], names, strict=True):
            m = set_mode(results, basis, name)
            if m not in results["modes"]:
                ax.set_visible(False)
                continue
            _panel(ax, systems, m, name, f"{name}: {titles[basis]}")
        axes[row][0].set_ylabel("held-out perplexity")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    from ..utils.files import atomic_save_figure

    try:
        return atomic_save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def _panel(ax, systems: dict, m: str, name: str, title: str) -> None:
    """One panel of `plot_speed`: ppl on set `name` against the speedup measured in mode `m`."""
    ckpts = list(dict.fromkeys(s["ckpt"] for s in systems.values() if s["kind"] == "flexidepth"))
    for ckpt in ckpts:
        flexi = [s for s in systems.values() if s["kind"] == "flexidepth" and s["ckpt"] == ckpt]
        xs = [s["speed"][m]["speedup_wall"] for s in flexi]
        ys = [s["ppl"][name]["ppl"] for s in flexi]
        label = "FlexiDepth (tau curve)" if len(ckpts) == 1 else f"{ckpt} (tau curve)"
        ax.plot(xs, ys, "-o", ms=3, label=label)
        for s, x, y in zip(flexi, xs, ys, strict=True):
            ax.annotate(f"{s['tau']:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    names = {
        "base": "base",
        "shortgpt": "ShortGPT (pruned)",
        "layer_replacement": "layer replacement (static)",
    }
    for kind, marker in (("base", "*"), ("shortgpt", "s"), ("layer_replacement", "D")):
        pts = [
            (s["speed"][m]["speedup_wall"], s["ppl"][name]["ppl"])
            for s in systems.values()
            if s["kind"] == kind
        ]
        if pts:
            ax.scatter(
                [p[0] for p in pts], [p[1] for p in pts], marker=marker, s=40, label=names[kind], zorder=3
            )
    ax.set_yscale("log")
    ax.set_xlabel("measured decode speedup vs base (batch 1)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
