"""`python -m src.compare` end to end on a tiny model: matched-k baselines, a trained checkpoint, its random
control and the ablation table, written to compare.md / compare.json."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_compare_end_to_end(tmp_path):
    from src.compare import log_compare
    from src.eval.compare import run_compare
    from src.train import train
    from tests.test_train import compose_cfg

    runs = tmp_path / "runs"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "compare",
            overrides=[
                "model=tiny_llama",
                "logger=csv",
                f"runs_dir={runs}",
                "k32=[8,16]",  # 4 layers: k = 1, 2
                "baselines=[shortgpt,early_exit,random_skip]",
                "method_overrides={shortgpt: {calibration: {texts: 2, max_length: 32}}}",
                "+trained.tiny={ckpt: '${runs_dir}/tiny_flexi', table: main, match_k32: [8]}",
                "+trained.tiny_abl={ckpt: '${runs_dir}/tiny_flexi', table: ablation}",
                "+trained.gone={ckpt: '${runs_dir}/missing', table: main}",
                "ablation_reference=tiny",
                "random_matched_to=[tiny]",
                "eval.n_per_task=1",
                "eval.max_new_tokens=3",
                "eval.ppl_max_articles=1",
                "eval.ppl_max_length=32",
                "eval.tasks=[copy,addition]",
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.trained = {k: v for k, v in cfg.trained.items() if k in ("tiny", "tiny_abl", "gone")}
    train(compose_cfg(["debug=tiny", "logger=none"], runs / "tiny_flexi"))
    from src.config.commands import CompareCommand
    from src.config.schemas import load

    s = load(cfg, CompareCommand)
    res = run_compare(s)
    log_compare(s, res)
    labels = [r["label"] for r in res["rows"]]
    assert labels == [
        "base",
        "tiny",
        "tiny@k1",  # the same router, threshold set to skip 1 layer (tau_for_k)
        "tiny_abl",
        "shortgpt_k1",
        "early_exit_k1",
        "random_skip_k1",
        "shortgpt_k2",
        "early_exit_k2",
        "random_skip_k2",
        "random_matched_tiny",
    ]  # "gone" has no checkpoint: left out
    rows = {r["label"]: r for r in res["rows"]}
    assert rows["base"]["layers_skipped_scored"] == 0.0 and rows["base"]["retention"] == 1.0
    for k in (1, 2):
        assert rows[f"early_exit_k{k}"]["removed"] == list(range(4 - k, 4))
        assert rows[f"shortgpt_k{k}"]["layers_skipped_scored"] == pytest.approx(k)
        assert rows[f"early_exit_k{k}"]["macs_saved_frac"] > 0
        assert 0 <= rows[f"random_skip_k{k}"]["layers_skipped_scored"] <= 2
    # tiny_flexi's fresh gates (sigmoid(3) > tau) run every layer; so does its matched random control
    assert rows["tiny"]["layers_skipped_scored"] == pytest.approx(
        rows["random_matched_tiny"]["layers_skipped_scored"], abs=0.1
    )
    assert rows["tiny@k1"]["k_target"] == 1.0
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "## Main table" in md and "## Ablations" in md and "| shortgpt_k2 |" in md
    ablation = md[md.index("## Ablations") : md.index("## Mean layers")]
    assert "| tiny |" in ablation and "| tiny@k1 |" in ablation and "| tiny_abl |" in ablation
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["rows"][0]["label"] == "base"


@pytest.mark.parametrize(
    ("module", "key"),
    [("src.compare", "curves:"), ("src.train", "loss:"), ("src.eval", "eval:"), ("src.speed", "taus:")],
)
def test_entry_points_are_hydra_commands(module, key):
    """`python -m <entry point> --cfg job` composes its primary config (the Hydra decorator sits on main)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", module, "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert key in out.stdout


def test_compare_checks_accept_untrained_baselines_only():
    """`'~trained'` (the README's untrained-baselines command) removes the node: the checks must not crash,
    and an entry added back (`+trained={...}`, docs/baselines.md) is typed, naming a wrong key."""
    from src.utils.errors import ConfigError
    from tests.helpers.configs import compose_tiny, settings_tiny

    assert compose_tiny("compare", ["~trained", "random_matched_to=[]"]).get("trained") is None
    s = settings_tiny("compare", ["~trained", "random_matched_to=[]"])
    assert s.trained is None
    s.check()
    s = settings_tiny("compare", ["~trained", "+trained={one: {ckpt: /nowhere, table: ablation}}"])
    assert s.trained["one"].ckpt == "/nowhere" and s.trained["one"].table == "ablation"
    with pytest.raises(ConfigError, match=r"^trained\.one\.tabel: Key 'tabel' not in 'TrainedSystem'$"):
        settings_tiny("compare", ["~trained", "+trained={one: {ckpt: /nowhere, tabel: main}}"])
