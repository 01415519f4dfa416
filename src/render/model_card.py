"""The model card (README.md) of a Hugging Face export, written from the run's own files: its config and
command line (`.hydra/` or `history/`), metrics.json, and src.compare's compare.json / held-out curves.
`src.export` calls `model_card` and copies the files `curve_files` names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..utils.run_config import run_config

FIGURE = "ppl_vs_skipped.png"  # src.compare's held-out curves figure, copied into the export when given


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def model_card(
    routing: dict[str, Any],
    num_layers: int,
    run_dir: Path | None,
    compare_json: Path | None = None,
    license_name: str | None = None,
    base_model: str | None = None,
) -> str:
    """README.md of the export: Hugging Face metadata header, then what the run's own files say.

    Next to `compare_json`, src.compare's held-out curves are used when present: `curves.md` (per held-out set:
    perplexity against layers skipped, FlexiDepth and the baselines) is included, and `ppl_vs_skipped.png` is
    shown (`curve_files` copies it into the export).

    Sources (each optional; a number that is not in them is left out, never estimated): the routing block;
    `<run>/.hydra/config.yaml` (base model, data, steps, seed) and `overrides.yaml` (the training command);
    `<run>/metrics.json` (steps, val ppl, base ppl, layers skipped); `compare_json` (src.compare's table:
    layers skipped, ppl, retention with its interval per system). `base_model` is a hub id or None (local
    or embedded models are named in the text only).
    """
    cfg, overrides = run_config(run_dir) if run_dir else (None, None)
    metrics = _read_json(run_dir / "metrics.json") if run_dir else None
    compare = _read_json(compare_json) if compare_json else None
    cfg = cfg if isinstance(cfg, dict) else {}
    base_name = routing.get("base_model") or (cfg.get("model") or {}).get("name_or_path") or "unknown"

    meta = ["---", "library_name: transformers"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    if license_name:
        meta.append(f"license: {license_name}")
    meta += [
        "tags:",
        "- flexidepth",
        "- layer-skipping",
        "- adaptive-computation",
        "- custom_code",
        "---",
        "",
    ]

    routed = routing["layers"]
    lines = [
        f"# FlexiDepth on {base_name}",
        "",
        "Adaptive layer skipping (FlexiDepth, arXiv 2503.23798) on a frozen base model: in each routed layer a "
        "router decides per token whether to run the layer (attention + FFN) or skip it (K/V still cached, "
        "a small adapter instead of the FFN). The base weights are unchanged.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("<this folder or repo>", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo>", trust_remote_code=False)',
        'out = model.generate(**tokenizer("What is 12 + 30?", return_tensors="pt"), max_new_tokens=20)',
        "print(tokenizer.decode(out[0]))",
        "print(model.flexidepth_generation.layers_used)  # [batch, new tokens]: layers each new token used",
        "```",
        "",
        f"- Threshold: `from_pretrained(..., trust_remote_code=True, flexidepth_tau={routing['tau']})` "
        "sets tau at load (a token runs a routed layer iff its gate g > tau; higher tau skips more); "
        "`model.set_flexidepth_tau(t)` changes it later.",
        "- `model.flexidepth_routes` holds the gates / decisions of the last forward "
        "(`.gates`, `.run`: [batch, positions, routed layers]; `.layers_used`: [batch, positions]).",
        "- Real skipping (skipped tokens run no query, attention or FFN) is used whenever autograd is off "
        "with the `sdpa` or `eager` attention implementation.",
        "",
        "## Routing",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | {base_name} ({routing['base_model_type']}, {num_layers} layers) |",
        f"| routed layers | {routed[0]}..{routed[-1]} ({len(routed)} layers) |"
        if routed == list(range(routed[0], routed[-1] + 1))
        else f"| routed layers | {routed} |",
        f"| always skipped (adapter only, every token) | {routing.get('always_skip') or 'none'} |",
        f"| tau | {routing['tau']} |",
        f"| gate mode | {routing['gate_mode']} |",
        f"| router | {routing['router']} (width {routing['router_width']}, bias {routing['router_bias']}) |",
        f"| adapter | {routing['adapter']} (width {routing['adapter_width']}) |",
        "",
    ]

    training: list[str] = []
    if isinstance(overrides, list):
        cmd = "python -m src.train" + "".join(f" {o}" for o in overrides)
        training += ["Command (FlexiDepth repository):", "", "```", cmd, "```", ""]
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else None
    rows = []
    if metrics and isinstance(metrics.get("global_step"), int):
        rows.append(("optimizer steps", metrics["global_step"]))
    elif isinstance((cfg.get("trainer") or {}).get("max_steps"), int) and cfg["trainer"]["max_steps"] > 0:
        rows.append(("max steps (configured)", cfg["trainer"]["max_steps"]))
    if data:
        source = data.get("source")
        if source is not None:
            rows.append(("data source", source))
        if isinstance(data.get("mixture"), dict):
            mix = ", ".join(f"{k} {v}" for k, v in data["mixture"].items())
            rows.append(("data mixture (weights)", mix))
    if cfg.get("seed") is not None:
        rows.append(("seed", cfg["seed"]))
    loss = (metrics or {}).get("loss") or cfg.get("loss")
    if isinstance(loss, dict):
        rows += [(f"loss.{k}", v) for k, v in sorted(loss.items()) if isinstance(v, (int, float, str))]
    if rows:
        training += ["| | |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rows], ""]
    if training:
        lines += ["## Training", "", *training]

    results: list[str] = []
    values = (metrics or {}).get("metrics") or {}
    val = [
        (label, values[key])
        for key, label in (
            ("val/ppl", "validation perplexity"),
            ("val/base_ppl", "validation perplexity of the base model"),
            ("val/layers_skipped_mean", f"routed layers skipped per token (of {len(routed)}, validation)"),
            ("val/skip_rate", "skip rate (validation)"),
        )
        if isinstance(values.get(key), (int, float))
    ]
    if val:
        results += ["From the run's metrics.json:", "", "| | |", "|---|---|"]
        results += [f"| {k} | {_fmt(float(v))} |" for k, v in val] + [""]
    if compare and isinstance(compare.get("rows"), list):
        results += [
            f"From src.compare ({compare_json.name}):",
            "",
            "| system | layers skipped (scored) | ppl | retention | retention interval |",
            "|---|---|---|---|---|",
        ]
        for row in compare["rows"]:
            ci = row.get("retention_ci")
            ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else ""
            ppl = row.get("ppl")
            results.append(
                f"| {row.get('label')} | {_fmt(row.get('layers_skipped_scored'), 2)} | "
                f"{_fmt(ppl) if ppl is not None else ''} | {_fmt(row.get('retention'))} | {ci_text} |"
            )
        results.append("")
    curves = curve_files(compare_json)
    if "curves.md" in curves:
        text = curves["curves.md"].read_text()
        text = re.sub(r"^(#+)", lambda m: "#" * min(6, len(m.group(1)) + 2), text, flags=re.M)
        results += [
            f"Held-out sets, from src.compare (curves.md next to {compare_json.name}):",
            "",
            text.strip(),
            "",
        ]
    if FIGURE in curves:
        results += [f"![perplexity against layers skipped, per held-out set]({FIGURE})", ""]
    if results:
        lines += ["## Results", "", *results]
    lines += [
        "## Files",
        "",
        "`config.json` (base config + `flexidepth` routing block + `auto_map`), `modeling_flexidepth.py` "
        "(torch + transformers only), `model.safetensors` (base weights and router/adapter tensors), tokenizer "
        "files, `generation_config.json`. Loading needs `trust_remote_code=True`; without it transformers "
        "refuses the unknown model type `flexidepth`.",
        "",
    ]
    return "\n".join(meta + lines)


def curve_files(compare_json: Path | None) -> dict[str, Path]:
    """src.compare's held-out curve outputs next to `compare_json` that exist: {name: path}."""
    if compare_json is None:
        return {}
    return {n: compare_json.parent / n for n in ("curves.md", FIGURE) if (compare_json.parent / n).is_file()}


def card_license(base_path: str | None) -> str | None:
    """The base model's license from its own README.md metadata header, when the base is a local folder."""
    if not base_path:
        return None
    readme = Path(base_path) / "README.md"
    if not readme.is_file():
        return None
    match = re.search(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
    if not match:
        return None
    found = re.search(r"^license:\s*(\S+)", match.group(1), re.M)
    return found.group(1) if found else None
