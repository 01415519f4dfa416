"""The offline training mixture, its held-out sets, and the held-out curves of src.compare."""

import json
import math

import pytest

from src.data import mixture as M
from src.eval import curves as C


def test_heldout_text_never_enters_training():
    lee_train, lee_held = set(M.training_texts("lee")), set(M.heldout_texts("lee"))
    assert len(lee_held) == 50 and not lee_train & lee_held
    wiki_train, wiki_held = M.training_texts("wiki"), M.heldout_texts("wiki")
    assert len(wiki_held) == math.ceil((len(wiki_train) + len(wiki_held)) / M.WIKI_HELDOUT_EVERY)
    assert not set(wiki_train) & set(wiki_held)
    play = M.heldout_texts("shakespeare")
    assert len(play) == len(M.HELDOUT_PLAYS) and play[0].startswith("HAMLET, PRINCE OF DENMARK")
    assert all("PRINCE OF DENMARK" not in t[:300] for t in M.training_texts("shakespeare"))
    docs = M.heldout_texts("python_docs")
    assert len(docs) > 50 and "python_docs" in M.OUT_OF_DOMAIN and "python_docs" not in M.TRAIN_SOURCES
    joined = " ".join(docs[:5])
    assert "object" in joined or "class" in joined  # technical prose


def test_wikitext_is_stripped_to_prose():
    raw = (
        "{{Infobox|x={{nested}}}}'''Alpha''' is a [[Greek alphabet|letter]].<ref>cite</ref> "
        "[[File:A.png|thumb|pic [[inner]]]]\n==History==\n{| class=t\n| cell\n|}\n* item [http://x.org text]"
    )
    assert M.wiki_pages.__module__ == "src.data.corpora"
    from src.data.corpora import strip_wikitext

    assert strip_wikitext(raw) == "Alpha is a letter.\nHistory\nitem text"


def test_mixture_draw_shares_and_errors():
    pools = {"lee": list(range(10)), "wiki": list(range(100, 400)), "instructions": []}
    drawn = M.draw(pools, {"lee": 1.0, "wiki": 3.0, "instructions": 1.0}, total=40, seed=0)
    assert len(drawn) == 40  # the empty source is left out of the shares
    assert sum(x < 100 for x in drawn) == 10 and sum(x >= 100 for x in drawn) == 30
    assert sorted(x for x in drawn if x < 100) == list(range(10))  # 10 of 10: no repeats needed
    assert M.draw(pools, {"lee": 1.0, "wiki": 3.0}, 40, seed=0) == drawn  # seeded
    twice = M.draw({"lee": list(range(5))}, {"lee": 1.0}, 12, seed=1)
    assert sorted(set(twice)) == list(range(5)) and len(twice) == 12  # repeated when short
    with pytest.raises(M.MixtureError, match=r"data\.mixture: unknown source\(s\) \['news'\]"):
        M.check_mixture({"news": 1.0})
    with pytest.raises(M.MixtureError, match=r"data\.mixture\.lee must be a number >= 0"):
        M.check_mixture({"lee": -1})
    with pytest.raises(M.MixtureError, match="every weight is 0"):
        M.check_mixture({"lee": 0, "wiki": 0})
    with pytest.raises(M.MixtureError, match=r"curves\.heldout: unknown held-out set\(s\) \['lea'\]"):
        M.heldout_texts("lea")


@pytest.mark.slow
def test_datamodule_mixture_draws_every_source(smollm2_dir):
    from src.data.config import DataConfig
    from src.data.datamodule import SFTDataModule

    data = DataConfig(
        source="mixture",
        max_length=64,
        mixture={"lee": 1.0, "shakespeare": 0.0, "wiki": 1.0, "instructions": 2.0},
        mixture_examples=400,
        n_synthetic=100,
        heldout=["lee", "python_docs"],
    )
    dm = SFTDataModule(data, smollm2_dir)
    dm.setup()
    assert len(dm.train_examples) == 400 and all(len(e["input_ids"]) <= 64 for e in dm.train_examples)
    chat = sum(dm.tokenizer.decode(e["input_ids"][:3]).startswith("<|im_start|>") for e in dm.train_examples)
    assert 150 <= chat <= 250  # instructions: half of the draw (weight 2 of 4), text the rest
    assert dm.val_examples  # every source's own val split
    with pytest.raises(ValueError, match=r"data\.heldout: unknown held-out set"):
        SFTDataModule(DataConfig(source="mixture", mixture={"lee": 1.0}, heldout=["hamlet"]), smollm2_dir)


def test_interpolation_at_equal_layers_skipped():
    pts = [(0.0, 10.0), (2.0, 40.0), (4.0, 160.0)]
    assert C.interpolate(pts, 1.0) == pytest.approx(20.0)  # geometric mean: linear in log ppl
    assert C.interpolate(pts, 3.0) == pytest.approx(80.0)
    assert C.interpolate(pts, 4.0) == pytest.approx(160.0)
    assert C.interpolate(pts, 4.5) is None and C.interpolate(pts, -0.1) is None  # never extrapolated
    assert C.interpolate([(2.0, 10.0), (2.0, 40.0)], 2.0) == pytest.approx(20.0)
    curves = {
        "fd": [{"tau": t, "sets": {"s": {"layers_skipped": x, "ppl": y}}} for t, (x, y) in enumerate(pts)]
    }
    points = {"shortgpt_k2": {"k": 2.0, "sets": {"s": {"layers_skipped": 2.0, "ppl": 50.0}}}}
    table = C.summary(curves, points, [2.0, 3.0])
    assert table["s@k2"] == {"fd": pytest.approx(40.0), "shortgpt_k2": 50.0}
    assert table["s@k3"] == {"fd": pytest.approx(80.0)}
    md = C.markdown(curves, points, {"s": {"ppl": 9.0}}, [2.0])
    assert "| s | 9.0 | 2 | **40.0** | 50.0 |" in md


@pytest.mark.slow
def test_compare_curves_on_a_tiny_model(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from src.eval.compare import run_curves
    from src.train import train
    from tests.test_compare import ROOT
    from tests.test_train import compose_cfg

    runs = tmp_path / "runs"
    train(
        compose_cfg(["debug=tiny", "logger=none", "callbacks.layer_usage.every_n_steps=100"], runs / "tiny")
    )
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "compare",
            overrides=[
                "model=tiny_llama",
                "logger=none",
                f"runs_dir={runs}",
                "~trained",
                "+trained={tiny: {ckpt: '${runs_dir}/tiny', table: main}}",
                "curves.heldout=[lee,python_docs]",
                "curves.max_tokens=96",
                "curves.max_length=32",
                "curves.k=[1]",
                "curves.curve_k=[0.5,1,1.5]",
                "curves.calibration_texts=2",
                "curves.baselines=[shortgpt,random_skip]",
                "method_overrides=null",
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    from src.config.commands import CompareCommand
    from src.config.schemas import load

    res = run_curves(load(cfg, CompareCommand))
    assert set(res["curves"]) == {"tiny"} and set(res["points"]) == {"shortgpt_k1", "random_skip_k1"}
    assert res["points"]["shortgpt_k1"]["sets"]["lee"]["layers_skipped"] == pytest.approx(1.0)
    curve = res["curves"]["tiny"]
    assert len(curve) >= 2 and all(set(p["sets"]) == {"lee", "python_docs"} for p in curve)
    skipped = sorted(p["sets"]["lee"]["layers_skipped"] for p in curve)
    assert skipped[0] < skipped[-1]  # thresholds spread the curve
    assert res["tokens"]["lee"] >= 96 and res["base"]["lee"]["layers_skipped"] == 0.0
    out = tmp_path / "out"
    assert json.loads((out / "curves.json").read_text())["heldout"] == ["lee", "python_docs"]
    assert "python_docs (OOD)" in (out / "curves.md").read_text()
    assert (out / "ppl_vs_skipped.png").stat().st_size > 10_000
