"""A run folder is enough: every command that takes `ckpt_path=<run>` (src.export, src.eval, src.speed,
src.generate) reads the model the run was trained with from the run's own `.hydra/config.yaml`; a `model=`
that contradicts it is refused naming both, before anything is loaded or written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_data_safety import assert_user_error

ROOT = Path(__file__).resolve().parents[1]
SPEED = ["taus=[0.5]", "shortgpt_k=[1]", "prompts=1", "prompt_length=8", "new_tokens=2", "batch=0",
         "prefill_length=0", "rounds=1", "warmup=0", "heldout=[lee]", "ppl_max_tokens=32", "ppl_max_length=16",
         "calibration_texts=1", "text_decode=false"]  # fmt: skip
EVAL = ["logger=none", "eval.tasks=[cloze]", "eval.n_per_task=1", "eval.ppl_max_articles=1",
        "eval.ppl_max_length=32", "eval.max_new_tokens=2"]  # fmt: skip


def cli(args, root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PROJECT_ROOT=str(root), PYTHONPATH=str(ROOT))
    env.pop("FLEXIDEPTH_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run trained with `debug=tiny` (conf/model/tiny_llama.yaml, not the default model), by the command."""
    root = tmp_path_factory.mktemp("runs")
    res = cli(["src.train", "debug=tiny", "logger=none", "run_name=tiny", "trainer.max_steps=2",
               "trainer.val_check_interval=2", "trainer.enable_progress_bar=false"], root)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    run = root / "outputs" / "train" / "runs" / "tiny"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "flexidepth").is_dir()
    return run


@pytest.mark.slow
def test_export_eval_and_speed_take_the_model_from_the_run(tiny_run, tmp_path):
    out = tmp_path / "export"
    res = cli(["src.export", f"ckpt_path={tiny_run}", f"out_dir={out}"], tmp_path)  # no model=
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["flexidepth"]["base_model"] == "tiny-random-llama" and config["num_hidden_layers"] == 4

    res = cli(["src.eval", f"ckpt_path={tiny_run}", "run_name=e", *EVAL], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "evaluate" / "runs" / "e" / "results.json").read_text())
    assert results["model"] == "tiny-random-llama" and results["num_layers"] == 4

    res = cli(["src.speed", f"ckpt_path={tiny_run}", "run_name=s", *SPEED], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    speed = json.loads((tmp_path / "outputs" / "speed" / "runs" / "s" / "speed.json").read_text())
    assert speed["model"] == "tiny-random-llama" and speed["num_layers"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("command", ["src.export", "src.eval", "src.speed", "src.generate"])
def test_a_contradicting_model_is_refused_naming_both(tiny_run, tmp_path, command):
    extra = {"src.export": [f"out_dir={tmp_path / 'export'}"], "src.eval": EVAL, "src.speed": SPEED,
             "src.generate": ["max_new_tokens=1"]}[command]  # fmt: skip
    res = cli([command, f"ckpt_path={tiny_run}", "model=tiny_qwen2", *extra], tmp_path)
    assert_user_error(
        res,
        "model=tiny_qwen2 (model.name_or_path='tiny-random-qwen2', model.arch={'model_type': 'qwen2'",
    )
    assert f"contradicts ckpt_path={tiny_run}, a run trained with model.name_or_path='tiny-random-llama'" in (
        res.stderr
    )
    assert f"({tiny_run / '.hydra' / 'config.yaml'}); leave model= out" in res.stderr
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # nothing written (Hydra's folders: gone)
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
def test_the_same_model_given_explicitly_is_accepted_and_a_bare_checkpoint_keeps_model(tiny_run, tmp_path):
    """In process (no command line: the composed model counts as given): the run's own model passes, another
    is refused; a FlexiDepth folder outside a run keeps the composed model (checked against the checkpoint
    by the command's checks)."""
    import shutil

    from src.config.run_model import adopt_run_model
    from src.utils.errors import ConfigError
    from tests.helpers.configs import compose_tiny

    same = compose_tiny("evaluate", [f"ckpt_path={tiny_run}"])
    adopt_run_model(same)
    assert same.model.name_or_path == "tiny-random-llama"
    other = compose_tiny("evaluate", [f"ckpt_path={tiny_run}", "model=tiny_mistral"])
    with pytest.raises(ConfigError, match=r"^model \(model\.name_or_path='tiny-random-mistral'.*"):
        adopt_run_model(other)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_run / "flexidepth", bare)
    outside = compose_tiny("evaluate", [f"ckpt_path={bare}", "model=tiny_mistral"])
    adopt_run_model(outside)
    assert outside.model.name_or_path == "tiny-random-mistral"
