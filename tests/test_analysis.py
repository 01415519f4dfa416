"""What the router learned (src/eval/uncertainty.py, src/eval/analysis.py, src/analyze.py): the base model's
per-token entropy / loss, token categories from known token sequences, forced routing patterns recovered by
the analysis, and empty categories reported as empty."""

from __future__ import annotations

import json
import math

import pytest
import torch

from src.eval.uncertainty import add_base_stats, token_stats


def _records(model_label: str, example: str, ids: list[int], segments: list[str]) -> list[dict]:
    return [
        {
            "model": model_label,
            "task": "t",
            "example_id": example,
            "segment": seg,
            "position": j,
            "token_id": tid,
            "token": str(tid),
            "text": str(tid),
            "layers_used": 4,
            "gates": [],
            "run": [],
        }
        for j, (tid, seg) in enumerate(zip(ids, segments, strict=True))
    ]


# ---------------------------------------------------------------------------------------- base stats
def test_base_stats_match_a_direct_forward_and_ignore_routing():
    """Entropy / loss at token t come from the base's distribution at t - 1 (None at t = 0); an injected
    model with routing on gives the base's numbers (its routing is off for the pass, restored after)."""
    from src.flexidepth import flexi_layers
    from tests.test_streamer import mixed_tiny_llama

    torch.manual_seed(0)
    model = mixed_tiny_llama()
    seqs = [[5, 17, 300, 17, 300, 9], [42, 7, 8]]
    recs = _records("flexidepth", "a", seqs[0], ["prompt"] * 3 + ["generated"] * 3)
    recs += _records("flexidepth", "b", seqs[1], ["prompt", "choice", "choice"])
    recs = recs[::-1]  # any order
    assert add_base_stats(model, recs, batch_size=1, pad_id=0, method="flexidepth")
    assert all(layer.routing for layer in flexi_layers(model))  # restored

    for layer in flexi_layers(model):
        layer.routing = False
    with torch.no_grad():
        logits = model(torch.tensor([seqs[0]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    by_pos = {r["position"]: r for r in recs if r["example_id"] == "a"}
    assert by_pos[0]["base_entropy"] is None and by_pos[0]["base_loss"] is None
    for t in range(1, 6):
        h = float(-(logp[t - 1].exp() * logp[t - 1]).sum())
        assert by_pos[t]["base_entropy"] == pytest.approx(h, rel=1e-4)
        assert by_pos[t]["base_loss"] == pytest.approx(float(-logp[t - 1, seqs[0][t]]), rel=1e-4)
    # padding changes nothing: a batch of both sequences gives the single-sequence numbers
    batched = token_stats(model, seqs, batch_size=2, pad_id=0)
    single = token_stats(model, [seqs[1]], batch_size=1, pad_id=0)
    assert batched[1][0][1:] == pytest.approx(single[0][0][1:], rel=1e-4)
    assert batched[1][1][1:] == pytest.approx(single[0][1][1:], rel=1e-4)


def test_base_stats_refused_positions_and_laco_nulls():
    from tests.test_streamer import mixed_tiny_llama

    model = mixed_tiny_llama()
    recs = _records("m", "a", [1, 2, 3], ["prompt"] * 3)
    assert add_base_stats(model, recs, method="laco") is False  # merged weights: the base is lost
    assert all(r["base_entropy"] is None and r["base_loss"] is None for r in recs)
    gap = _records("m", "a", [1, 2, 3], ["prompt"] * 3)
    gap[2]["position"] = 5
    with pytest.raises(ValueError, match="positions are not"):
        add_base_stats(model, gap)


# ---------------------------------------------------------------------------------------- categories
def test_categories_of_a_known_token_sequence():
    from src.eval.analysis import CATEGORIES, token_categories

    texts = ["Compute", ":", " ", "1", "2", " +", " ", "5", " =", " ", "1", "7", "<|im_end|>"]
    ids = [10, 11, 12, 1, 2, 13, 12, 5, 14, 12, 1, 7, 99]
    segs = ["prompt"] * 9 + ["generated"] * 4
    cats = token_categories(ids, texts, texts, segs)
    assert all(c <= set(CATEGORIES) for c in cats)
    assert [("arithmetic_digit" in c) for c in cats] == [False] * 10 + [True, True, False]
    assert all(("arithmetic_context" in c) != ("arithmetic_digit" in c) for c in cats)
    assert [i for i, c in enumerate(cats) if "punctuation" in c] == [1]  # '+' and '=' are symbols, not P*
    assert [i for i, c in enumerate(cats) if "end_of_turn" in c] == [12]
    assert [i for i, c in enumerate(cats) if "answer" in c] == [9, 10, 11, 12]
    assert [i for i, c in enumerate(cats) if "prompt" in c] == list(range(9))
    assert "copied" not in cats[0] and "novel" not in cats[1]  # positions < n - 1: neither
    assert all("copied" not in c for c in cats)  # no 3-gram repeats here

    # copies, words, function words; no arithmetic question, so no arithmetic categories
    texts = ["The", " cat", " sat", ".", " The", " cat", " sat", " un", "bel", "ievable", " of", "ten", " of"]
    ids = [1, 2, 3, 4, 1, 2, 3, 6, 7, 8, 9, 10, 9]
    cats = token_categories(ids, texts, texts, ["prompt"] * 6 + ["choice"] * 7)
    assert [i for i, c in enumerate(cats) if "copied" in c] == [6]  # the 3-gram (The, cat, sat) again
    assert [i for i, c in enumerate(cats) if "word_continuation" in c] == [8, 9, 11]
    assert [i for i, c in enumerate(cats) if "word_start" in c] == [0, 1, 2, 4, 5, 6, 7, 10, 12]
    assert [i for i, c in enumerate(cats) if "function_word" in c] == [0, 4, 12]  # " of" + "ten" is a word
    assert not any({"arithmetic_digit", "arithmetic_context", "end_of_turn"} & c for c in cats)
    with pytest.raises(ValueError, match="same length"):
        token_categories([1, 2], ["a"], ["a"], ["prompt"])


# ---------------------------------------------------------------------------------------- forced patterns
NUM_LAYERS, ROUTED = 4, [2, 3]  # 2 unrouted layers + 2 routed: a token uses 2, 3 or 4 layers


def forced_depthmap(examples, produced_runs, entropy=None) -> list[dict]:
    """Synthetic DepthMap rows whose routes are forced per *produced* token: `produced_runs(e, t, cats)` ->
    the 2 routed layers' run flags of the forward that predicted token t of example e. As in src.eval, a
    generated row carries the routes of the forward that produced it, a prompt / choice row those of its own
    position (so the forward producing token t sits in row t - 1). `entropy(e, t)` -> base_entropy."""
    from src.eval.analysis import token_categories

    rows = []
    for e, (ids, texts, segs) in enumerate(examples):
        cats = token_categories(ids, texts, texts, segs)
        own = [[True, True] for _ in ids]  # the routes each row carries
        for t in range(1, len(ids)):
            run = produced_runs(e, t, cats[t])
            if segs[t] == "generated":
                own[t] = run
            if segs[t] != "generated" or segs[t - 1] == "prompt":
                own[t - 1] = run  # the prompt's last row carries the forward of generated token 0
        for t, tid in enumerate(ids):
            rows.append(
                {
                    "model": "flexidepth",
                    "task": "synthetic",
                    "example_id": f"ex-{e}",
                    "segment": segs[t],
                    "position": t,
                    "token_id": tid,
                    "token": texts[t],
                    "text": texts[t],
                    "layers_used": 2 + sum(own[t]),
                    "gates": [0.9 if r else 0.1 for r in own[t]],
                    "run": own[t],
                    "base_entropy": None if t == 0 or entropy is None else entropy(e, t),
                    "base_loss": None if t == 0 or entropy is None else 2.0 * entropy(e, t),
                }
            )
    return rows


def _examples(n: int = 12):
    """n examples, each a prompt with a repeated phrase and an answer that copies part of it."""
    out = []
    for e in range(n):
        words = [f" w{e}_{j}" for j in range(4 + e % 3)]
        texts = ["Say", *words, ".", *words, "<|im_end|>"]
        ids = [hash(t) % 10_000 for t in texts]
        segs = ["prompt"] * (len(words) + 2) + ["generated"] * (len(words) + 1)
        if e % 2:  # half of them scored as a choice instead of generated
            segs = ["prompt"] * (len(words) + 2) + ["choice"] * (len(words) + 1)
        out.append((ids, texts, segs))
    return out


def test_forced_skip_of_repeated_tokens_is_recovered():
    """Skip both routed layers for every copied token, run them otherwise: the analysis recovers copied = 2,
    novel = 4 layers, the difference -2 with a degenerate interval, and claim (i) holds; end-of-turn tokens
    (never copied here) use 4; categories absent from the data are empty (n 0, null), not 0."""
    from src.eval.analysis import analyze_rows

    rows = forced_depthmap(
        _examples(), lambda e, t, cats: [False, False] if "copied" in cats else [True, True]
    )
    a = analyze_rows(rows, ROUTED, n_boot=200, seed=0)
    cat = a["categories"]
    assert cat["copied"]["n"] > 20 and cat["novel"]["n"] > 20
    assert cat["copied"]["mean"] == 2.0 and cat["copied"]["ci"] == [2.0, 2.0]
    assert cat["novel"]["mean"] == 4.0 and cat["end_of_turn"]["mean"] == 4.0
    d = a["differences"]["copied - novel"]
    assert d["mean"] == -2.0 and d["ci"] == [-2.0, -2.0]
    assert a["claims"]["copied_fewer_layers"]["verdict"] == "holds"
    for empty in ("arithmetic_digit", "arithmetic_context", "function_word"):
        assert cat[empty] == {"n": 0, "mean": None, "ci": None}, empty
    assert a["claims"]["arithmetic_more_layers"]["verdict"] == "untestable"
    assert a["claims"]["arithmetic_more_layers"]["mean"] is None
    # every layer of a copied token skipped, every layer of a novel one run
    assert a["run_fraction"]["routed_layers"] == ROUTED
    assert a["run_fraction"]["by_category"]["copied"] == [0.0, 0.0]
    assert a["run_fraction"]["by_category"]["novel"] == [1.0, 1.0]
    assert a["run_fraction"]["by_category"]["arithmetic_digit"] is None
    # the recorded view (each row's own routes) is not the produced one for prompt / choice rows
    assert a["recorded_categories"]["copied"]["mean"] != 2.0

    # the reverse pattern reverses the verdict; a pattern blind to copying shows no difference
    rev = forced_depthmap(_examples(), lambda e, t, cats: [True, True] if "copied" in cats else [False, True])
    assert analyze_rows(rev, ROUTED, n_boot=200)["claims"]["copied_fewer_layers"]["verdict"] == "reversed"
    import random

    coin = random.Random(0)  # a coin per token, blind to its category (the draw is fixed)
    flat = forced_depthmap(_examples(), lambda e, t, cats: [True, coin.random() < 0.5])
    d = analyze_rows(flat, ROUTED, n_boot=200)["differences"]["copied - novel"]
    assert d["ci"][0] <= 0 <= d["ci"][1]


def test_forced_arithmetic_digits_and_monotone_uncertainty():
    """Answer digits of arithmetic prompts forced to all layers, the rest to one routed layer: claim (ii)
    holds with difference +1. Layers used a strictly increasing (decreasing) function of the base entropy:
    Spearman exactly +1 (-1), interval included; entropy deciles increase."""
    from src.eval.analysis import analyze_rows

    examples = []
    for e in range(10):
        texts = ["Compute", ":", " ", str(e + 1), " +", " ", "3", " =", " ", *str(e + 4)]
        segs = ["prompt"] * 8 + ["choice"] * (len(texts) - 8)
        examples.append(([hash(t) % 1000 + 7 for t in texts], texts, segs))
    rows = forced_depthmap(
        examples, lambda e, t, cats: [True, True] if "arithmetic_digit" in cats else [True, False]
    )
    a = analyze_rows(rows, ROUTED, n_boot=100)
    assert a["categories"]["arithmetic_digit"]["mean"] == 4.0
    assert a["categories"]["arithmetic_context"]["mean"] == 3.0
    c = a["claims"]["arithmetic_more_layers"]
    assert (c["mean"], c["ci"], c["verdict"]) == (1.0, [1.0, 1.0], "holds")

    def level(e, t):  # 0, 1 or 2 routed layers run, from the token's position
        return (e + t) % 3

    for sign, verdict in ((+1, "holds"), (-1, "reversed")):
        rows = forced_depthmap(
            _examples(),
            lambda e, t, cats: [level(e, t) >= 1, level(e, t) >= 2],
            entropy=lambda e, t: 1.0 + sign * 0.5 * level(e, t),
        )
        a = analyze_rows(rows, ROUTED, n_boot=100)
        s = a["spearman"]
        assert s["entropy"]["rho"] == pytest.approx(sign) and s["loss"]["rho"] == pytest.approx(sign)
        assert s["entropy"]["ci"] == pytest.approx([sign, sign])
        assert a["claims"]["layers_rise_with_uncertainty"]["verdict"] == verdict
        means = [d["mean"] for d in a["entropy_deciles"] if d["n"]]
        assert means == sorted(means, reverse=sign < 0) and means[0] != means[-1]
    # every token using the same layers (routing off, or all skipped): no correlation, untestable
    rows = forced_depthmap(_examples(), lambda e, t, cats: [True, True], entropy=lambda e, t: float(t))
    a = analyze_rows(rows, ROUTED, n_boot=50)
    assert a["spearman"]["entropy"]["rho"] is None
    assert a["claims"]["layers_rise_with_uncertainty"]["verdict"] == "untestable"


def test_bootstrap_intervals_cover_the_mean_and_depend_on_examples():
    from src.eval.analysis import analyze_rows

    rows = forced_depthmap(_examples(20), lambda e, t, cats: [e % 2 == 0, t % 3 == 0])
    a = analyze_rows(rows, ROUTED, n_boot=300, seed=3)
    for name, s in a["categories"].items():
        if s["n"]:
            assert s["ci"][0] <= s["mean"] <= s["ci"][1], name
    assert a["categories"]["answer"]["ci"][1] - a["categories"]["answer"]["ci"][0] > 0.1
    assert analyze_rows(rows, ROUTED, n_boot=300, seed=3) == a  # deterministic for a seed
    with pytest.raises(ValueError, match="several models"):
        analyze_rows(rows + [{**rows[0], "model": "base", "example_id": "other"}], ROUTED)


# ---------------------------------------------------------------------------------------- files and CLI
def test_write_analysis_files_and_command(tmp_path, capsys):
    from src.analyze import main
    from src.eval.depthmap import write_depthmap
    from tests.helpers.configs import run_main

    rows = forced_depthmap(
        _examples(), lambda e, t, cats: [False, False] if "copied" in cats else [True, True]
    )
    write_depthmap(rows, tmp_path / "depthmap.parquet", ROUTED, NUM_LAYERS)
    (tmp_path / "results.json").write_text(json.dumps({"routed_layers": ROUTED}))
    run_main(main, [f"eval_dir={tmp_path}", "n_boot=50", "seed=1"])
    out = capsys.readouterr().out
    assert "copied tokens use fewer layers than novel ones" in out and "holds" in out
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["categories"]["copied"]["mean"] == 2.0 and saved["n_boot"] == 50
    assert saved["categories"]["arithmetic_digit"] == {"n": 0, "mean": None, "ci": None}
    assert saved["claims"] and all(f"| {c['claim']} |" in out for c in saved["claims"].values())  # printed
    md = (tmp_path / "analysis.md").read_text()
    assert "| arithmetic_digit (empty) | 0 | - | - |" in md and "| L2 | L3 |" in md
    assert (tmp_path / "analysis_categories.png").stat().st_size > 5000
    assert not math.isnan(saved["spearman"]["entropy"]["n"])

    for argv, message in (
        ([f"eval_dir={tmp_path / 'nope'}"], "eval_dir=.*no such folder"),
        ([f"eval_dir={tmp_path.parent}"], "no depthmap.parquet"),
        (
            [f"eval_dir={tmp_path}", "bootstrap=3"],
            r"Key 'bootstrap' not in 'AnalyzeCommand' \(key: bootstrap\)",
        ),
        (
            [f"eval_dir={tmp_path}", "n_boot=x"],
            r"n_boot=x: Value 'x' of type 'str' could not be converted to Integer",
        ),
        ([f"eval_dir={tmp_path}", "n_boot=0"], "n_boot must be an integer >= 1"),
        (["n_boot=5"], "eval_dir is required: eval_dir=<evaluation folder>"),
    ):
        with pytest.raises(SystemExit) as exc:
            run_main(main, argv)
        assert exc.value.code == 2
        import re

        assert re.search(message, capsys.readouterr().err), message


def test_html_hover_shows_categories():
    from src.render.html import token_title

    rec = {"token": "Ġthe", "text": " the", "segment": "prompt", "position": 3, "layers_used": 3}
    assert "categories" not in token_title(rec, NUM_LAYERS, ROUTED)
    title = token_title({**rec, "categories": ["function_word", "word_start"]}, NUM_LAYERS, ROUTED)
    assert "categories: function_word, word_start" in title.splitlines()
