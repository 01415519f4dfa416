"""The HTML depth map (src/render/html.py): escaping and structure in Python, then the page rendered by headless
Chromium (token count, computed colours, hover text, legend, no external resources)."""

from __future__ import annotations

import html
import os
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from src.models.config import ModelConfig
from src.render.html import (
    css_rgb,
    depthmap_html,
    layer_colour,
    select_records,
    visible_text,
    write_depthmap_html,
)

NUM_LAYERS, ROUTED = 6, [3, 4, 5]  # min layers used: 3
EVIL = "<script>window.__pwned = 1</script>"


def _rec(task, example, segment, position, text, used, gates, token=None):
    return {
        "model": "flexidepth",
        "task": task,
        "example_id": example,
        "segment": segment,
        "position": position,
        "token_id": 100 + position,
        "token": token if token is not None else text.replace(" ", "Ġ"),
        "text": text,
        "layers_used": used,
        "gates": gates,
        "run": [g > 0.5 for g in gates],
    }


def constructed_records() -> list[dict]:
    """Two tasks; 'copy' has three examples (so max_examples=2 drops one). Gates are chosen to give the
    layers used (3 + number of gates above 0.5); odd characters and markup are in the token texts."""
    recs = []
    texts = ["Copy", " this", "\n", EVIL, " a & b", '"q"', "  ", "\t", ""]
    gate_sets = [[0.123, 0.234, 0.345], [0.987, 0.876, 0.765], [0.612, 0.111, 0.222], [0.9, 0.8, 0.1]]
    for e in range(3):
        for i, text in enumerate(texts):
            gates = gate_sets[(i + e) % len(gate_sets)]
            used = 3 + sum(g > 0.5 for g in gates)
            seg = "prompt" if i < 6 else "generated"
            recs.append(
                _rec("copy", f"copy-{e}", seg, i, text, used, gates, token="<|x|>" if text == "" else None)
            )
    for i, text in enumerate(["What", " is", " 2", "+", "2", "?", " 4"]):
        gates = gate_sets[i % len(gate_sets)]
        seg = "prompt" if i < 6 else "generated"
        recs.append(_rec("addition", "addition-0", seg, i, text, 3 + sum(g > 0.5 for g in gates), gates))
    return recs[::-1]  # page order must not depend on record order within an example


# ---------------------------------------------------------------------------------------- pure python
def test_colour_scale_endpoints_and_order():
    few, mid, full = (layer_colour(u, NUM_LAYERS, 3) for u in (3, 4.5, 6))
    assert few == (255, 255, 204) and mid == (161, 218, 180) and full == (65, 182, 196)
    assert layer_colour(2, NUM_LAYERS, 3) == few and layer_colour(9, NUM_LAYERS, 3) == full  # clipped
    assert layer_colour(4, 4, 4) == full  # nothing routed: the all-layers colour
    greens = [layer_colour(u, 30, 15)[0] for u in range(15, 31)]
    assert greens == sorted(greens, reverse=True) and len(set(greens)) > 10  # a monotone scale
    assert css_rgb((1, 2, 3)) == "rgb(1, 2, 3)"


def test_visible_text():
    assert visible_text("\n") == ("↵", 1)
    assert visible_text("a\n\n") == ("a↵↵", 2)
    assert visible_text("  ") == ("␣␣", 0)
    assert visible_text("\t") == ("⇥", 0)
    assert visible_text("x\x01") == ("x\\x01", 0)
    assert visible_text("", "<|eot|>") == ("<|eot|>", 0)
    assert visible_text(" word") == (" word", 0)


def test_select_records_groups_orders_and_limits():
    recs = constructed_records()
    shown = select_records(recs, max_examples=2)
    keys = list(dict.fromkeys((r["task"], r["example_id"]) for r in shown))
    # tasks in order of first appearance (records are reversed: addition first), examples likewise
    assert keys == [("addition", "addition-0"), ("copy", "copy-2"), ("copy", "copy-1")]
    block = [r for r in shown if r["example_id"] == "copy-1"]
    assert [r["position"] for r in block] == list(range(9))
    assert [r["segment"] for r in block] == ["prompt"] * 6 + ["generated"] * 3
    assert len(select_records(recs)) == len(recs)


def test_html_escapes_and_is_self_contained():
    recs = constructed_records()
    page = depthmap_html(recs, NUM_LAYERS, ROUTED, title="T <b>&", max_examples=None)
    assert "<script>window.__pwned" not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "<title>T &lt;b&gt;&amp;</title>" in page
    assert " a &amp; b" in page and "&quot;q&quot;" in page  # in the span text and the title attribute
    assert page.count('class="tok"') == len(recs)
    assert page.count("<script>") == 1  # only the page's own tooltip script
    # no external resources: no src/href to anything but in-page anchors, no url(...) or @import in CSS
    assert not re.search(r"\bsrc\s*=", page)
    assert re.findall(r'href="([^"]*)"', page) == ["#task-addition", "#task-copy"]
    assert "url(" not in page and "@import" not in page and "http" not in page
    # one line break after each newline token, the '↵' mark inside it
    assert page.count(">↵</span><br>") == 3


def test_html_title_attribute_holds_gates_and_decisions():
    rec = _rec("copy", "c", "generated", 7, "x", 4, [0.123, 0.987, 0.5])
    page = depthmap_html([rec], NUM_LAYERS, ROUTED)
    title = html.unescape(re.search(r'<span class="tok"[^>]* title="([^"]*)"', page).group(1))
    assert title.startswith("'x' = 'x'\ngenerated token, position 7\nlayers used 4 / 6\n")
    for line in ("L3  g=0.123  skip", "L4  g=0.987  run", "L5  g=0.500  skip"):
        assert line in title
    assert 'data-layers="4"' in page and 'data-gates="0.123 0.987 0.500"' in page and 'data-run="010"' in page
    # routing off (base model records): said so, and every token at the all-layers colour
    base = dict(rec, gates=[], run=[], layers_used=6)
    page = depthmap_html([base], NUM_LAYERS, [])
    assert "routing off: every layer ran" in page
    assert f"background: {css_rgb(layer_colour(6, 6, 6))}" in page


# ---------------------------------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]


def require_browser(paths=(CHROMIUM, CHROMEDRIVER)) -> None:
    """Skip when Chromium or chromedriver is missing, except under CI (env CI set): then fail."""
    missing = [p for p in paths if not os.access(p, os.X_OK)]
    if missing:
        msg = f"headless Chromium test needs {missing} (make install provides them via apt)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI is set, so this is an error, not a skip")
        pytest.skip(msg)


def test_missing_browser_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="/nonexistent/chromium"):
        require_browser(("/nonexistent/chromium", CHROMEDRIVER))
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_browser(("/nonexistent/chromium", CHROMEDRIVER))


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="flexidepth-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


TOKENS_JS = """
return Array.from(document.querySelectorAll('.tok')).map(function (el) {
  return [parseInt(el.dataset.layers), getComputedStyle(el).backgroundColor, el.dataset.segment,
          el.textContent, getComputedStyle(el).textDecorationLine];
});
"""


def _background(driver, element) -> str:
    """The computed background colour, as the page's own CSS engine reports it ('rgb(r, g, b)')."""
    return driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", element)


def _open(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def test_page_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    recs = constructed_records()
    path = write_depthmap_html(recs, tmp_path / "depthmap.html", NUM_LAYERS, ROUTED, max_examples=2)
    shown = select_records(recs, max_examples=2)
    _open(browser, path)

    tokens = browser.execute_script(TOKENS_JS)
    assert len(tokens) == len(shown) == len(recs) - 9  # one 'copy' example of 9 tokens left out
    # every token: its layers, segment and shown text as recorded, its colour what layer_colour says
    for (used, bg, seg, text, deco), rec in zip(tokens, shown):
        assert used == rec["layers_used"] and seg == rec["segment"]
        assert bg == css_rgb(layer_colour(used, NUM_LAYERS, 3))
        assert text == visible_text(rec["text"], rec["token"])[0]
        assert ("underline" in deco) == (seg == "generated")
    few = browser.find_element(By.CSS_SELECTOR, '.tok[data-layers="3"]')
    full = browser.find_element(By.CSS_SELECTOR, '.tok[data-layers="6"]')
    few_bg, full_bg = _background(browser, few), _background(browser, full)
    assert few_bg != full_bg
    assert few_bg == "rgb(255, 255, 204)" == css_rgb(layer_colour(3, NUM_LAYERS, 3))
    assert full_bg == "rgb(65, 182, 196)" == css_rgb(layer_colour(6, NUM_LAYERS, 3))

    # the markup inside a token is text, not a script
    assert browser.execute_script("return window.__pwned === undefined")
    assert EVIL in [t[3] for t in tokens]

    # hover: the tooltip box shows the per-layer gates and decisions of that token
    tip = browser.find_element(By.ID, "fd-tip")
    assert not tip.is_displayed()
    ActionChains(browser).move_to_element(few).perform()
    assert tip.is_displayed()
    assert "layers used 3 / 6" in tip.text
    for line in ("L3  g=0.123  skip", "L4  g=0.234  skip", "L5  g=0.345  skip"):
        assert line in tip.text
    assert few.get_attribute("data-title") == tip.text  # the title moved to data-title (no double tooltip)
    assert browser.execute_script("return arguments[0].hasAttribute('title')", few) is False
    ActionChains(browser).move_to_element(full).perform()
    assert "L3  g=0.987  run" in tip.text and "layers used 6 / 6" in tip.text

    # legend: one swatch per possible count (3..6), coloured by the same scale
    legend = browser.find_element(By.ID, "fd-legend")
    swatches = legend.find_elements(By.CLASS_NAME, "fd-swatch")
    assert [s.text for s in swatches] == ["3", "4", "5", "6"]
    assert [_background(browser, s) for s in swatches] == [
        css_rgb(layer_colour(u, NUM_LAYERS, 3)) for u in range(3, 7)
    ]
    assert "generated token" in legend.text

    # nothing was fetched: the page loads no resource at all
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0


def test_page_from_a_tiny_model_run_suite(browser, tmp_path):
    """Records from `run_suite` on the tiny injected model (mixed routing): the page shows each of them."""
    from src.eval.suite import run_suite
    from src.models.tokenizer import load_tokenizer
    from src.tasks.generation import make_task_examples
    from tests.test_streamer import TINY_LLAMA, mixed_tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tok = mixed_tiny_llama(), load_tokenizer(ModelConfig(**TINY_LLAMA))
        examples = make_task_examples(["copy", "addition"], 2, seed=0)
        _, records = run_suite(model, tok, examples, max_new_tokens=5, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    routed = list(model.flexidepth.layer_indices)
    assert routed == [2, 3] and {r["layers_used"] for r in records} == {2, 3, 4}
    path = write_depthmap_html(records, tmp_path / "d.html", 4, routed)
    _open(browser, path)
    tokens = browser.execute_script(TOKENS_JS)
    shown = select_records(records)
    assert len(tokens) == len(records) == len(shown)
    assert [t[0] for t in tokens] == [r["layers_used"] for r in shown]
    assert all(bg == css_rgb(layer_colour(u, 4, 2)) for u, bg, *_ in tokens)
    assert browser.execute_script("return document.querySelectorAll('.fd-example').length") == 4
    assert browser.execute_script("return document.querySelectorAll('section.fd-task').length") == 2
    # hover text of the first generated token lists both routed layers with its gates
    first_gen = next(r for r in shown if r["segment"] == "generated")
    title = browser.execute_script(
        "return document.querySelector('.tok[data-segment=generated]').getAttribute('data-title')"
    )
    for layer, gate in zip(routed, first_gen["gates"]):
        assert f"L{layer}  g={gate:.3f}" in title


# ---------------------------------------------------------------------------------------- W&B logging
class WandbLogger:
    """Stands in for Lightning's WandbLogger (log_results picks W&B loggers by class name)."""

    def __init__(self):
        self.metrics, self.payloads = [], []
        self.experiment = self

    def log_metrics(self, metrics, step):
        self.metrics.append(metrics)

    def log(self, payload):
        self.payloads.append(payload)

    def save(self):
        pass


def test_log_results_logs_png_as_image_and_html_as_html(tmp_path, monkeypatch):
    import wandb
    from matplotlib.figure import Figure

    import src.utils.loggers
    from src.eval.__main__ import log_results

    png = tmp_path / "task_depth.png"
    Figure(figsize=(1, 1)).savefig(png)
    page = write_depthmap_html(constructed_records(), tmp_path / "depthmap.html", NUM_LAYERS, ROUTED)
    results = {
        "tasks": {
            "flexidepth": {
                "copy": {
                    "score": 0.5,
                    "metric": "exact",
                    "n": 1,
                    "layers_used_prompt": 4.0,
                    "layers_used_generated": 3.5,
                }
            }
        },
        "perplexity": {"flexidepth": {"ppl": 10.0}},
        "layers": {"flexidepth": {"layers_used_scored": 4.0}},
        "figures": [str(png), str(page)],
    }
    logger = WandbLogger()
    monkeypatch.setattr(src.utils.loggers, "build_loggers", lambda node, out, resuming: [logger])
    log_results(SimpleNamespace(logger=None, paths=SimpleNamespace(output_dir=str(tmp_path))), results)
    (payload,) = logger.payloads
    assert isinstance(payload["eval/task_depth"], wandb.Image)
    html_obj = payload["eval/depthmap"]
    assert isinstance(html_obj, wandb.Html) and not isinstance(html_obj, wandb.Image)
    assert html_obj.html == page.read_text(encoding="utf-8")  # the page unchanged (no css injected)
    assert logger.metrics[0]["eval/flexidepth/copy/score"] == 0.5
