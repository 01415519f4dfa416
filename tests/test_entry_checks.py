"""Values are checked where they enter, and user errors are one line (issue 35, kinds 5, 6 and 7).

Weights loaded by `load_released` (NaN/inf, another base model), lengths against the position window
(training data, generation prompts), counts (0 or negative refused naming the key), files asked for, and the
commands that used to end in a traceback (sweep summaries, chat templates, the harness without EOS, speed
with a MindSkip checkpoint, nothing to train), plus the tokenizer line of an export that must not prompt.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir

from src.config.registry import COMMANDS
from src.config.schemas import load
from src.flexidepth import FlexiDepthConfig, export_released, inject, load_released, released_config
from src.flexidepth.checkpoint import RELEASED_WEIGHTS, CheckpointError
from src.models.config import ModelConfig
from src.utils.errors import ConfigError, DataError, PreflightError
from tests.conftest import tiny_model
from tests.helpers.configs import CONF, compose_tiny
from tests.test_data_safety import assert_user_error, cli, tree
from tests.test_runs import _tiny_export, no_model_load
from tests.test_train import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(name="no_model_load")
def _no_model_load(monkeypatch):
    return no_model_load(monkeypatch)


# ------------------------------------------------------------------------------ weights: load_released
def _released_folder(folder: Path, family: str = "llama") -> Path:
    model = tiny_model(family)
    inject(model, FlexiDepthConfig(router_bias=False, gate_mode="released", layers=[2, 3]))
    return export_released(model, folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_load_released_refuses_non_finite_weights(tmp_path, bad):
    from safetensors.torch import load_file, save_file

    folder = _released_folder(tmp_path / "rel")
    tensors = load_file(str(folder / RELEASED_WEIGHTS))
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = bad
    save_file(tensors, str(folder / RELEASED_WEIGHTS))
    target = tiny_model("llama")
    inject(target, released_config(folder))
    for source in (folder, folder / RELEASED_WEIGHTS, tensors):
        with pytest.raises(CheckpointError, match=rf"{key} holds NaN/inf"):
            load_released(target, source)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_load_released_refuses_an_export_of_another_base_model(tmp_path, family):
    folder = _released_folder(tmp_path / "rel", "llama")
    target = tiny_model(family)
    inject(target, released_config(folder))
    for source in (folder, folder / RELEASED_WEIGHTS):
        with pytest.raises(
            CheckpointError, match=rf"another base model: base_model.model_type='llama'.*{family}"
        ):
            load_released(target, source)
    same = tiny_model("llama")
    inject(same, released_config(folder))
    load_released(same, folder)  # the right base loads


def test_load_released_refuses_an_empty_folder(tmp_path):
    target = tiny_model("llama")
    inject(target, FlexiDepthConfig(router_bias=False, gate_mode="released", layers=[2, 3]))
    with pytest.raises(CheckpointError, match="no \\*.safetensors file"):
        load_released(target, tmp_path)


# ------------------------------------------------------------------------------ lengths and counts
@pytest.mark.parametrize("max_length", [1025, 4096])
def test_training_data_longer_than_the_position_window_is_refused(tmp_path, max_length, no_model_load):
    from src.train import train

    with pytest.raises(
        PreflightError, match=rf"data.max_length={max_length} exceeds .*max_position_embeddings=1024"
    ):
        train(compose_cfg(["debug=tiny", "logger=none", f"data.max_length={max_length}"], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "tokens,new,match", [(40, 1, "prompt is 40 tokens"), (20, 30, "lower max_new_tokens to <= 12")]
)
def test_a_prompt_longer_than_the_position_window_is_refused(tokens, new, match):
    from src.generate import check_prompt_length

    config = SimpleNamespace(max_position_embeddings=32)
    with pytest.raises(ConfigError, match=match):
        check_prompt_length(tokens, new, config)
    check_prompt_length(20, 12, config)


def test_generate_refuses_a_prompt_beyond_the_window_in_one_line(tmp_path):
    res = cli(
        [
            "src.generate",
            "model=tiny_llama",
            "model.arch.max_position_embeddings=16",
            "chat=false",
            "prompt=" + "word " * 40,
        ],
        tmp_path,
    )
    assert_user_error(res, "prompt is ")
    assert "max_position_embeddings=16" in res.stderr


@pytest.mark.parametrize(
    "config,key,value",
    [
        ("compare", "curves.max_tokens", 0),
        ("compare", "curves.max_length", 1),
        ("compare", "curves.calibration_texts", -1),
        ("compare", "eval.n_per_task", 0),
        ("evaluate", "eval.batch_size", 0),
        ("evaluate", "eval.max_new_tokens", -3),
        ("evaluate", "eval.ppl_max_articles", 0),
        ("evaluate", "eval.ppl_max_length", 1),
    ],
)
def test_zero_or_negative_counts_are_refused_naming_the_key(config, key, value):
    cfg = compose_tiny(config, [f"{key}={value}"])
    with pytest.raises(ConfigError, match=rf"^{key} must be an integer >= \d+.*got {value}$"):
        load(cfg, COMMANDS[config]).validate()


@pytest.mark.parametrize(
    "key,value", [("data.micro_batch_size", 0), ("data.max_train_examples", 0), ("data.max_length", 4)]
)
def test_training_counts_are_refused_naming_the_key(tmp_path, key, value, no_model_load):
    from src.train import train

    with pytest.raises(ConfigError, match=rf"{key} must be an integer"):
        train(compose_cfg(["debug=tiny", "logger=none", f"{key}={value}"], tmp_path / "run"))


def test_compare_with_zero_max_tokens_exits_2(tmp_path):
    res = cli(
        [
            "src.compare",
            "model=tiny_llama",
            "logger=none",
            "curves.max_tokens=0",
            f"hydra.run.dir={tmp_path / 'c'}",
        ],
        tmp_path,
    )
    assert_user_error(res, "curves.max_tokens must be an integer >= 1 or null (all), got 0")


# ------------------------------------------------------------------------------ one line, exit 2
def _sweep(root: Path) -> Path:
    for i, (alpha, ppl) in enumerate([(0.1, 12.0), (0.2, 13.0)]):
        job = root / f"{i}_loss.alpha={alpha}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- loss.alpha={alpha}\n")
        (job / "metrics.json").write_text(
            json.dumps({"metrics": {"val/ppl": ppl, "val/layers_skipped_mean": 1.0}})
        )
    return root


def _summary(args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "src.sweep_summary", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


@pytest.mark.parametrize(
    "value, message",
    [
        ("nan", "every setting must be a finite number; not finite: baseline_ppl=nan"),
        ("inf", "every setting must be a finite number; not finite: baseline_ppl=inf"),
        ("-1", "baseline_ppl must be a finite perplexity > 0, got -1.0"),
        ("0", "baseline_ppl must be a finite perplexity > 0, got 0.0"),
    ],
)
def test_sweep_summary_refuses_a_bad_baseline_ppl(tmp_path, value, message):
    sweep = _sweep(tmp_path / "sweep")
    before = tree(sweep)
    res = _summary([f"sweep_dir={sweep}", f"baseline_ppl={value}"], tmp_path)
    assert_user_error(res, message)
    assert tree(sweep) == before


def test_sweep_summary_on_a_mistyped_path_creates_nothing(tmp_path):
    res = _summary([f"sweep_dir={tmp_path / 'swep'}", f"out_dir={tmp_path / 'out'}"], tmp_path)
    assert_user_error(res, f"{tmp_path / 'swep'}: no such sweep folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["- [unclosed\n", "key: value\n", b"\xff\xfe\x00bad"])
def test_sweep_summary_on_a_damaged_overrides_file_exits_2(tmp_path, text):
    sweep = _sweep(tmp_path / "sweep")
    path = sweep / "1_loss.alpha=0.2" / ".hydra" / "overrides.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    res = _summary([f"sweep_dir={sweep}"], tmp_path)
    assert_user_error(res, f"{path}: ")
    assert res.stderr.count("error:") == 1


def test_sweep_summary_lists_damaged_metrics_and_ignores_non_numbers(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    (sweep / "0_loss.alpha=0.1" / "metrics.json").write_text(
        '{"metrics": {"val/ppl": "x", "val/skip_rate": 0.5}}'
    )
    (sweep / "1_loss.alpha=0.2" / "metrics.json").write_text('{"metrics": [1, 2')
    res = _summary([f"sweep_dir={sweep}", "baseline_ppl=10"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "damaged" in res.stdout and "0.5" in res.stdout


def test_a_tokenizer_without_a_chat_template_is_a_data_error():
    from src.data.sft import tokenize_example

    tokenizer = SimpleNamespace(chat_template=None, name_or_path="plain-tok")
    with pytest.raises(DataError, match="'plain-tok' has no chat template.*model.tokenizer"):
        tokenize_example(tokenizer, {"messages": [{"role": "user", "content": "hi"}]}, 64)


@pytest.mark.parametrize("bos", [None, 1])
def test_the_harness_refuses_a_tokenizer_without_eos(bos):
    from src.eval.harness import check_harness_tokenizer

    tokenizer = SimpleNamespace(eos_token_id=None, bos_token_id=bos, name_or_path="no-eos")
    with pytest.raises(ConfigError, match="'no-eos' has no EOS token.*model.tokenizer"):
        check_harness_tokenizer(tokenizer)
    check_harness_tokenizer(SimpleNamespace(eos_token_id=2, bos_token_id=None))


def test_speed_refuses_a_mindskip_checkpoint_before_loading(tmp_path, no_model_load):
    from omegaconf import open_dict

    folder = _tiny_export(tmp_path / "ms")
    meta = json.loads((folder / "flexidepth_config.json").read_text())
    (folder / "flexidepth_config.json").write_text(json.dumps({**meta, "method": "mindskip"}))
    flexi = _tiny_export(tmp_path / "fd")
    for overrides in ([f"ckpt_path={folder}"], [f"ckpt_path={flexi}", f"more_ckpts=[{folder}]"]):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("speed", overrides=["model=tiny_llama", *overrides, "shortgpt_k=[1]"])
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "speed_out")
        with pytest.raises(
            PreflightError, match="holds a method=mindskip checkpoint; src.speed times FlexiDepth"
        ):
            load(cfg, COMMANDS["speed"]).check()


@pytest.mark.parametrize("always", ["[2,3]", "[3,2]"])
def test_nothing_to_train_is_refused_before_the_model_load(tmp_path, always, no_model_load):
    from src.train import train

    overrides = [
        "debug=tiny",
        "logger=none",
        "skip.layers=[2,3]",
        f"skip.always_skip={always}",
        "skip.adapter=none",
    ]
    with pytest.raises(PreflightError, match="nothing to train: .*skip.always_skip.*skip.adapter=swiglu"):
        train(compose_cfg(overrides, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ leftovers: the README line
def test_the_readme_tokenizer_line_loads_an_export_without_a_prompt(tmp_path):
    from src import export as ex
    from tests.test_export import compose_export, trained_checkpoint

    trained_checkpoint("tiny_llama", tmp_path / "ckpt")
    out = tmp_path / "out"
    ex.run(compose_export(["model=tiny_llama", f"ckpt_path={tmp_path / 'ckpt'}", f"out_dir={out}"]))
    readme = (ROOT / "README.md").read_text()
    line = next(
        x for x in readme.splitlines() if x.startswith('tokenizer = AutoTokenizer.from_pretrained("exports')
    )
    code = line.split("#")[0].replace('"exports/<name>"', repr(str(out)))
    child = (
        f"from transformers import AutoTokenizer\n{code}\nprint(tokenizer('What is 12 + 30?')['input_ids'])"
    )
    res = subprocess.run(
        [sys.executable, "-c", child],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "custom code" not in res.stdout + res.stderr  # no trust_remote_code prompt
    from src.models.tokenizer import load_tokenizer

    expected = load_tokenizer(
        ModelConfig(**{"name_or_path": "tiny-random-llama", "tokenizer": "embedded:smollm2-135m-instruct"})
    )
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected("What is 12 + 30?")["input_ids"]
