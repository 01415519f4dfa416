"""Self-contained HTML depth map: every token of the evaluated examples, shaded by the layers it used.

    write_depthmap_html(records, "depthmap.html", num_layers=30, routed_layers=list(range(15, 30)))

`records` are DepthMap token records (`run_suite`'s second return value, or `load_depthmap(...).to_list()`).
The page has one section per task and one block per example; each token is a `<span class="tok">` whose
background goes from pale (few layers: every routed layer skipped) to teal (all layers), see
`layer_colour`. Generated tokens are underlined. Hovering a token shows its per-layer gates and run/skip
decisions (a small inline script; without JavaScript the same text is the span's `title`). The file has
no external resources: CSS and JS are inline, so it opens offline and inside W&B's `wandb.Html`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# Colour scale (light YlGnBu): t = 0 (fewest layers possible) ... t = 1 (all layers). Light enough that
# black text stays readable on every stop.
COLOUR_STOPS: tuple[tuple[int, int, int], ...] = ((255, 255, 204), (161, 218, 180), (65, 182, 196))


# ---------------------------------------------------------------------------------------- colours
def layer_colour(layers_used: float, num_layers: int, min_layers: int) -> tuple[int, int, int]:
    """RGB of a token that used `layers_used` of `num_layers` layers (`min_layers`: all routed skipped).

    Linear interpolation between `COLOUR_STOPS` over t = (used - min) / (num - min), clipped to [0, 1];
    with nothing routed (num == min) every token gets the all-layers colour.
    """
    span = num_layers - min_layers
    t = 1.0 if span <= 0 else min(max((float(layers_used) - min_layers) / span, 0.0), 1.0)
    segments = len(COLOUR_STOPS) - 1
    k = min(int(t * segments), segments - 1)
    local = t * segments - k
    lo, hi = COLOUR_STOPS[k], COLOUR_STOPS[k + 1]
    return tuple(round(a + (b - a) * local) for a, b in zip(lo, hi))  # type: ignore[return-value]


def css_rgb(rgb: Sequence[int]) -> str:
    """`rgb(r, g, b)`: the form a browser reports as the computed style of an opaque colour."""
    r, g, b = rgb
    return f"rgb({r}, {g}, {b})"


# ---------------------------------------------------------------------------------------- selection
def example_key(record: dict[str, Any]) -> tuple[str, str, str]:
    """(model, task, example_id): one block of the page."""
    return str(record["model"]), str(record["task"]), str(record["example_id"])


def select_records(
    records: Iterable[dict[str, Any]], max_examples: int | None = None
) -> list[dict[str, Any]]:
    """The records the page shows, in page order.

    Tasks and examples keep the order of their first appearance; at most `max_examples` examples per task
    (None: all). Within an example, prompt tokens come first, then generated ones, each by position.
    """
    examples: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    per_task: dict[str, int] = {}
    for rec in records:
        key = example_key(rec)
        if key not in examples:
            task = key[1]
            if max_examples is not None and per_task.get(task, 0) >= max_examples:
                continue
            per_task[task] = per_task.get(task, 0) + 1
            examples[key] = []
        examples[key].append(rec)
    tasks = list(per_task)
    ordered = sorted(examples.items(), key=lambda item: tasks.index(item[0][1]))  # stable within a task
    out = []
    for _, recs in ordered:
        out += sorted(recs, key=lambda r: (r["segment"] != "prompt", int(r["position"])))
    return out


# ---------------------------------------------------------------------------------------- token text
def visible_text(text: str, token: str = "") -> tuple[str, int]:
    """What a token's span shows, and how many line breaks follow it.

    Newlines become '↵' (and a real line break after the span), tabs '⇥', carriage returns '␍', other
    control characters '\\xNN'; a token of spaces only shows '␣' per space. An empty decoded text falls
    back to the token string (or '∅'). The result is not yet HTML-escaped.
    """
    if text == "":
        return (token or "∅"), 0
    breaks = text.count("\n")
    if text.strip(" ") == "":
        return "␣" * len(text), 0
    shown = []
    for ch in text:
        if ch == "\n":
            shown.append("↵")
        elif ch == "\t":
            shown.append("⇥")
        elif ch == "\r":
            shown.append("␍")
        elif ord(ch) < 32 or ord(ch) == 127:
            shown.append(f"\\x{ord(ch):02x}")
        else:
            shown.append(ch)
    return "".join(shown), breaks


def token_title(record: dict[str, Any], num_layers: int, routed_layers: Sequence[int]) -> str:
    """Hover text: the token, its segment and position, layers used, its token categories (when the record
    has "categories") and one line per routed layer."""
    lines = [
        f"{record['token']!r} = {record['text']!r}",
        f"{record['segment']} token, position {record['position']}",
        f"layers used {record['layers_used']} / {num_layers}",
    ]
    if record.get("categories"):  # src/eval/analysis.py's token categories, when computed
        lines.append("categories: " + ", ".join(record["categories"]))
    gates, run = list(record.get("gates") or []), list(record.get("run") or [])
    if not gates:
        lines.append("routing off: every layer ran")
    for i, gate in enumerate(gates):
        layer = routed_layers[i] if i < len(routed_layers) else f"r{i}"
        decision = "run" if (run[i] if i < len(run) else True) else "skip"
        lines.append(f"L{layer}  g={float(gate):.3f}  {decision}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- page
_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 1.5em; color: #111; }
.fd-root h1 { font-size: 1.4em; margin: 0 0 .3em; }
.fd-root h2 { font-size: 1.15em; margin: 1.4em 0 .4em; border-bottom: 1px solid #ccc; }
.fd-root h3 { font-size: .95em; margin: .9em 0 .3em; font-weight: 600; }
.fd-meta, .fd-stats { color: #555; font-size: .85em; }
.fd-legend { display: flex; flex-wrap: wrap; align-items: center; gap: .6em; margin: .8em 0;
  padding: .5em .7em; border: 1px solid #ddd; border-radius: 6px; font-size: .85em; }
.fd-scale { display: inline-flex; }
.fd-swatch { display: inline-block; min-width: 1.8em; text-align: center; padding: .1em 0;
  font-family: ui-monospace, monospace; font-size: .8em; }
.fd-text { font-family: ui-monospace, 'SFMono-Regular', Menlo, monospace; font-size: .85em;
  line-height: 1.9; white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 2px; padding: 1px 0; cursor: default; }
.tok[data-segment="generated"], .fd-sample-gen { text-decoration: underline; text-decoration-thickness: 2px;
  text-underline-offset: 3px; font-weight: 600; }
.tok:hover { outline: 1px solid #333; }
.fd-sep { color: #c00; font-weight: bold; padding: 0 .2em; }
#fd-tip { position: fixed; display: none; z-index: 10; max-width: 28em; padding: .4em .6em;
  background: #222; color: #eee; border-radius: 4px; font: 12px/1.35 ui-monospace, monospace;
  white-space: pre-wrap; overflow-wrap: anywhere; pointer-events: none; }
"""

# The title attribute carries the hover text; the script moves it into data-title (so the browser's own
# tooltip does not show twice) and shows it in a positioned box instead.
_JS = """
(function () {
  var tip = document.getElementById('fd-tip');
  document.querySelectorAll('.tok[title]').forEach(function (el) {
    el.setAttribute('data-title', el.getAttribute('title'));
    el.removeAttribute('title');
  });
  function place(ev) {
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) x = Math.max(0, ev.clientX - tip.offsetWidth - 8);
    if (y + tip.offsetHeight > window.innerHeight) y = Math.max(0, ev.clientY - tip.offsetHeight - 8);
    tip.style.left = x + 'px'; tip.style.top = y + 'px';
  }
  document.addEventListener('mouseover', function (ev) {
    var el = ev.target.closest ? ev.target.closest('.tok') : null;
    if (!el) { tip.style.display = 'none'; return; }
    tip.textContent = el.getAttribute('data-title');
    tip.style.display = 'block';
    place(ev);
  });
  document.addEventListener('mousemove', function (ev) {
    if (tip.style.display === 'block') place(ev);
  });
})();
"""


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _legend(num_layers: int, min_layers: int) -> str:
    swatches = []
    for used in range(min_layers, num_layers + 1):
        colour = css_rgb(layer_colour(used, num_layers, min_layers))
        swatches.append(f'<span class="fd-swatch" style="background: {colour}">{used}</span>')
    return (
        '<div class="fd-legend" id="fd-legend">'
        f"<span>layers used (of {num_layers}):</span>"
        f'<span class="fd-scale">{"".join(swatches)}</span>'
        '<span><span class="fd-sample" style="background: #eee">prompt token</span> '
        '<span class="fd-sample fd-sample-gen" style="background: #eee">generated token</span></span>'
        '<span><span class="fd-sep">▶</span>generation starts</span>'
        "<span>Hover a token for its gates per routed layer. A generated token's layers are those of the "
        "forward that produced it.</span>"
        "</div>"
    )


def _token_span(rec: dict[str, Any], num_layers: int, min_layers: int, routed_layers: Sequence[int]) -> str:
    shown, breaks = visible_text(str(rec["text"]), str(rec["token"]))
    colour = css_rgb(layer_colour(rec["layers_used"], num_layers, min_layers))
    gates = " ".join(f"{float(g):.3f}" for g in rec.get("gates") or [])
    run = "".join("1" if r else "0" for r in rec.get("run") or [])
    attrs = {
        "class": "tok",
        "data-layers": str(int(rec["layers_used"])),
        "data-segment": str(rec["segment"]),
        "data-position": str(int(rec["position"])),
        "data-gates": gates,
        "data-run": run,
        "style": f"background: {colour}",
        "title": token_title(rec, num_layers, routed_layers),
    }
    attr_text = " ".join(f'{k}="{html.escape(v, quote=True)}"' for k, v in attrs.items())
    return f"<span {attr_text}>{html.escape(shown, quote=False)}</span>" + "<br>" * breaks


def _example_block(
    key: tuple[str, str, str], recs: list[dict], num_layers: int, min_layers: int, routed: Sequence[int]
) -> str:
    model, _, example_id = key
    prompt = [float(r["layers_used"]) for r in recs if r["segment"] == "prompt"]
    gen = [float(r["layers_used"]) for r in recs if r["segment"] == "generated"]
    parts, seen_generated = [], False
    for rec in recs:
        if rec["segment"] == "generated" and not seen_generated:
            parts.append('<span class="fd-sep" title="generation starts">▶</span>')
            seen_generated = True
        parts.append(_token_span(rec, num_layers, min_layers, routed))
    stats = (
        f"prompt: {len(prompt)} tokens, mean layers {_fmt(_mean(prompt))}; "
        f"generated: {len(gen)} tokens, mean layers {_fmt(_mean(gen))}"
    )
    return (
        f'<div class="fd-example" data-example="{html.escape(example_id, quote=True)}">'
        f"<h3>{html.escape(example_id)} <span class='fd-meta'>({html.escape(model)})</span></h3>"
        f'<div class="fd-stats">{stats}</div>'
        f'<div class="fd-text">{"".join(parts)}</div></div>'
    )


def depthmap_html(
    records: Iterable[dict[str, Any]],
    num_layers: int,
    routed_layers: Sequence[int],
    title: str = "FlexiDepth depth map",
    max_examples: int | None = None,
) -> str:
    """The whole page as one string (see the module docstring); `max_examples` is per task."""
    routed_layers = [int(i) for i in routed_layers]
    min_layers = num_layers - len(routed_layers)
    shown = select_records(records, max_examples)
    blocks: dict[tuple[str, str, str], list[dict]] = {}
    for rec in shown:
        blocks.setdefault(example_key(rec), []).append(rec)
    by_task: dict[str, list[tuple[str, str, str]]] = {}
    for key in blocks:
        by_task.setdefault(key[1], []).append(key)

    sections, toc = [], []
    for task, keys in by_task.items():
        recs = [r for k in keys for r in blocks[k]]
        anchor = "task-" + "".join(c if c.isalnum() else "-" for c in task)
        prompt = [float(r["layers_used"]) for r in recs if r["segment"] == "prompt"]
        gen = [float(r["layers_used"]) for r in recs if r["segment"] == "generated"]
        toc.append(f'<a href="#{html.escape(anchor, quote=True)}">{html.escape(task)}</a>')
        body = "".join(_example_block(k, blocks[k], num_layers, min_layers, routed_layers) for k in keys)
        sections.append(
            f'<section class="fd-task" id="{html.escape(anchor, quote=True)}">'
            f"<h2>{html.escape(task)} <span class='fd-meta'>{len(keys)} example{'s' if len(keys) != 1 else ''}; mean layers "
            f"prompt {_fmt(_mean(prompt))}, generated {_fmt(_mean(gen))}</span></h2>{body}</section>"
        )
    routed_text = ", ".join(map(str, routed_layers)) if routed_layers else "none (routing off)"
    meta = (
        f"{len(shown)} tokens, {len(blocks)} examples; {num_layers} layers, routed: {routed_text}. "
        f"Tasks: {' · '.join(toc) if toc else 'none'}"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><div class='fd-root'><h1>{html.escape(title)}</h1><div class='fd-meta'>{meta}</div>"
        f"{_legend(num_layers, min_layers)}{''.join(sections)}</div>"
        f"<div id='fd-tip'></div><script>{_JS}</script></body></html>\n"
    )


def write_depthmap_html(
    records: Iterable[dict[str, Any]],
    path: str | Path,
    num_layers: int,
    routed_layers: Sequence[int],
    title: str = "FlexiDepth depth map",
    max_examples: int | None = None,
) -> Path:
    """Write `depthmap_html(...)` to `path` (utf-8) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(depthmap_html(records, num_layers, routed_layers, title, max_examples), encoding="utf-8")
    return path


__all__ = [
    "COLOUR_STOPS",
    "css_rgb",
    "depthmap_html",
    "layer_colour",
    "select_records",
    "token_title",
    "visible_text",
    "write_depthmap_html",
]
