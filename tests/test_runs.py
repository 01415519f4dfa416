"""Runs you can trust (issue 13): one run per folder, checked resume, atomic files, validation before heavy
work, user errors without tracebacks, a console that says where things are. Tiny random models only."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from src.flexidepth.checkpoint import CONFIG, WEIGHTS, CheckpointError
from src.models.config import ModelConfig
from src.models.loader import load_base_model as _LOAD_BASE
from src.utils.cli import is_user_error
from src.utils.errors import ConfigError, PreflightError, RunFolderError
from tests.test_train import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["debug=tiny", "logger=none", "trainer.max_steps=2", "trainer.limit_val_batches=0"]


def _train(overrides, folder):
    from src.train import train

    return train(compose_cfg([*SHORT, *overrides], folder))


def no_model_load(monkeypatch):
    """Fail the test if anything loads a base model (the refusals must come before)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a base model was loaded before the refusal")

    import src.lit.module
    import src.models.loader

    monkeypatch.setattr(src.models.loader, "load_base_model", refuse)
    monkeypatch.setattr(src.lit.module, "load_base_model", refuse)
    return refuse


@pytest.fixture(name="no_model_load")
def _no_model_load_fixture(monkeypatch):
    return no_model_load(monkeypatch)


def _tiny_export(folder, family_cfg="tiny_llama", poison=None):
    """A FlexiDepth checkpoint folder for the tiny model of conf/model/<family_cfg>.yaml (no training)."""
    from omegaconf import OmegaConf

    from src.flexidepth import FlexiDepthConfig, inject, save_flexidepth

    cfg = compose_cfg([f"model={family_cfg}"])
    model = _LOAD_BASE(ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True)))
    inject(model, FlexiDepthConfig())
    if poison is not None:
        with torch.no_grad():
            dict(model.named_parameters())[poison].fill_(float("nan"))
    return save_flexidepth(model, folder)


# ------------------------------------------------------------------------------------- 1. one run, one folder
def test_fresh_start_into_a_run_folder_refuses_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)  # as Hydra writes it before the task runs
    (run / ".hydra" / "config.yaml").write_text("first start\n")
    _train([], run)
    out = capsys.readouterr().out
    # the closing summary (item 5): folder, steps, export and how to evaluate it
    assert f"run finished: {run}" in out and "steps: 2 optimizer steps" in out
    assert f"export: {run / 'flexidepth'}" in out and f"python -m src.eval ckpt_path={run}" in out
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)

    (run / ".hydra" / "config.yaml").write_text("refused start\n")  # Hydra rewrote it for the next command
    with pytest.raises(RunFolderError, match=r"already holds a run \(checkpoints, flexidepth") as err:
        _train([], run)
    assert "resume=auto" in str(err.value) and "overwrite=true" in str(err.value)
    again = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert again["global_step"] == first["global_step"] == 2  # untouched
    assert (run / ".hydra" / "config.yaml").read_text() == "first start\n"  # put back

    _train(["overwrite=true", "seed=7"], run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    hist = sorted(p.name for p in (run / "history").iterdir())
    # the overwritten run's history went with it
    assert hist == ["config-000.yaml", "events.jsonl", "hydra-000"]
    assert yaml.safe_load((run / "history" / "config-000.yaml").read_text())["seed"] == 7


def test_a_second_process_fails_fast_naming_the_holder(tmp_path, no_model_load):
    from src.utils.runs import RunLock

    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderError, match=rf"is in use by pid {os.getpid()} on "):
            _train([], tmp_path / "run")
    # released: the lock file no longer names a holder
    assert (tmp_path / "run" / ".run.lock").read_text() == ""


def test_resume_refuses_model_defining_changes_naming_the_keys(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _train([], run)
    no_model_load(monkeypatch)  # the refusals come before any model load
    for override, keys in (
        ("model=tiny_qwen2", ["model.arch.model_type: 'llama' -> 'qwen2'", "model.name_or_path"]),
        ("skip.layers=[1,2,3]", ["skip.layers: 'last_half' -> [1, 2, 3]"]),
        ("skip.adapter_rank=4", ["skip.adapter_rank: None -> 4"]),
    ):
        with pytest.raises(RunFolderError, match="model-defining settings") as err:
            _train([override, "resume=extend"], run)
        for key in keys:
            assert key in str(err.value), (override, str(err.value))
    assert len(list((run / "history").glob("config-*.yaml"))) == 1  # refusals leave no history


def test_resume_prints_changes_and_never_overwrites_the_first_config(tmp_path, caplog):
    run = tmp_path / "run"
    _train([], run)
    with caplog.at_level(logging.WARNING, logger="src.train"):
        _train(["resume=extend", "trainer.max_steps=3", "loss.alpha=0.05", "optim.lr=0.01"], run)
    assert "loss.alpha: 0.001 -> 0.05" in caplog.text and "trainer.max_steps: 2 -> 3" in caplog.text
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    first = yaml.safe_load((run / "history" / "config-000.yaml").read_text())
    second = yaml.safe_load((run / "history" / "config-001.yaml").read_text())
    assert first["loss"]["alpha"] == 0.001 and first["trainer"]["max_steps"] == 2
    assert second["loss"]["alpha"] == 0.05 and second["optim"]["lr"] == 0.01
    events = [json.loads(line) for line in (run / "history" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "finish", "extend", "finish"]
    assert events[2]["changes"]["loss.alpha"] == [0.001, 0.05]
    assert events[2]["changes"]["optim.lr"] == [0.0001, 0.01]


def test_resume_that_finds_nothing_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="src.train"):
        _train(["resume=auto"], tmp_path / "run")
    assert f"resume=auto: nothing to resume in {tmp_path / 'run'}" in caplog.text
    events = (tmp_path / "run" / "history" / "events.jsonl").read_text().splitlines()
    assert [json.loads(e)["event"] for e in events] == ["start", "finish"]


# ------------------------------------------------------------------------------------- 2. crash-safe files
def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A save killed half-way (here: a full disk) leaves the previous checkpoint intact and no partial file."""
    from src.config.commands import TrainCommand
    from src.config.schemas import load
    from src.train import trainer_arguments
    from src.utils.runs import atomic_checkpoint_io

    plugins = trainer_arguments(load(compose_cfg(SHORT), TrainCommand))["plugins"]
    assert any(type(p).__name__ == "AtomicCheckpointIO" for p in plugins)

    io = atomic_checkpoint_io()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(3)}}, target)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"\x80\x02partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.zeros(3)}}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=False)["global_step"] == 2
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    _train(["trainer.limit_val_batches=1", "trainer.val_check_interval=2"], run)
    best = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert best, "the final validation writes a best checkpoint"
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")  # killed while writing, on another filesystem
    with caplog.at_level(logging.WARNING, logger="src.train"):
        _train(["resume=extend", "trainer.max_steps=3"], run)
    assert f"{run / 'checkpoints' / 'last.ckpt'}: empty file" in caplog.text
    assert f"taking {best[-1].name} (step 2): the intact checkpoint with the most progress" in caplog.text
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_damaged_files_give_errors_naming_the_file(tmp_path):
    from src.convert import convert
    from src.flexidepth import load_flexidepth
    from src.flexidepth.checkpoint import read_checkpoint_config
    from src.models.loader import load_base_model

    folder = _tiny_export(tmp_path / "fd")
    assert (folder / WEIGHTS).stat().st_mode & 0o777 == 0o666 & ~_umask()  # 0644, like every other file
    assert (folder / CONFIG).stat().st_mode & 0o777 == 0o666 & ~_umask()
    model_cfg = dict(compose_cfg(["model=tiny_llama"]).model)

    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{folder / WEIGHTS}: damaged safetensors file"):
        load_flexidepth(load_base_model(ModelConfig(**model_cfg)), folder)
    (folder / CONFIG).write_text('{"flexidepth": ')
    with pytest.raises(CheckpointError, match=rf"{folder / CONFIG}: damaged json"):
        read_checkpoint_config(folder)

    empty = tmp_path / "last.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{empty}: empty file"):
        convert(empty, tmp_path / "out")
    truncated = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"model.layers.2.router.head.weight": torch.ones(3)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=rf"{truncated}: damaged checkpoint file"):
        convert(truncated, tmp_path / "out")


def test_metrics_and_exports_are_replaced_atomically(tmp_path, monkeypatch):
    from src.utils.files import atomic_write_text

    path = atomic_write_text(tmp_path / "metrics.json", '{"ok": 1}')
    real_replace = os.replace

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed between write and rename

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"ok": 2, "partial')
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# ------------------------------------------------------------------------------------- 3. refuse early
def _compose(name, overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def _eval_cfg(tmp_path, overrides):
    from tests.helpers.configs import compose_tiny

    return compose_tiny(
        "evaluate", ["eval.n_per_task=1", "eval.max_new_tokens=2", *overrides], tmp_path / "eval_out"
    )


def test_eval_refuses_before_loading_anything(tmp_path, no_model_load):
    from src.eval.__main__ import run

    llama = _tiny_export(tmp_path / "llama_fd")
    cases = [
        (
            ["model=tiny_qwen2", f"ckpt_path={llama}"],
            r"ckpt_path: .*was trained on another base model.*model_type='llama' \(this model: 'qwen2'\)",
        ),
        ([f"ckpt_path={llama}", "eval.tau=1.5"], r"eval\.tau must be null or a number in \[0, 1\], got 1\.5"),
        ([f"ckpt_path={tmp_path / 'nope'}"], r"ckpt_path='.*nope': no such file or folder"),
        (
            ["eval.device=cuda"],
            r"eval\.device=cuda but this machine has no CUDA GPU.*use eval\.device=cpu to run",
        ),
    ]
    if torch.cuda.is_available():
        cases.pop()
    for overrides, message in cases:  # a value, a missing checkpoint, what the settings point at
        with pytest.raises((ConfigError, CheckpointError, PreflightError), match=message) as err:
            run(_eval_cfg(tmp_path, overrides))
        assert is_user_error(err.value)  # one `error:` line, exit 2
        assert not (tmp_path / "eval_out").exists()


@pytest.mark.slow
def test_eval_refuses_unknown_task_names_before_loading(tmp_path, no_model_load):
    from src.eval.__main__ import run

    with pytest.raises(PreflightError, match=r"eval\.tasks: unknown task\(s\) \['no_such_task'\]"):
        run(_eval_cfg(tmp_path, ["eval.tasks=[copy,no_such_task]"]))


def test_nan_weights_are_refused_everywhere(tmp_path, no_model_load):
    from src.generate import run as generate_run

    key = "model.layers.3.adapter.down_proj.weight"
    folder = _tiny_export(tmp_path / "nan_fd", poison=key)
    with pytest.raises(PreflightError, match=rf"ckpt_path: {folder / WEIGHTS}: tensor {key} holds NaN/inf"):
        from src.eval.__main__ import run

        run(_eval_cfg(tmp_path, [f"ckpt_path={folder}"]))
    with pytest.raises(PreflightError, match=rf"{key} holds NaN/inf"):
        generate_run(_compose("generate", ["model=tiny_llama", f"ckpt_path={folder}"]))
    with pytest.raises(PreflightError, match=rf"init_from: .*{key} holds NaN/inf"):
        _train([f"init_from={folder}"], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_nan_weights_refused_by_the_loader(tmp_path):
    from omegaconf import OmegaConf

    from src.flexidepth import load_flexidepth
    from src.models.loader import load_base_model

    key = "model.layers.2.router.head.weight"
    folder = _tiny_export(tmp_path / "nan_fd", poison=key)
    model = load_base_model(ModelConfig(**OmegaConf.to_container(compose_cfg(["model=tiny_llama"]).model)))
    with pytest.raises(CheckpointError, match=rf"{folder / WEIGHTS}: tensor {key} holds NaN/inf"):
        load_flexidepth(model, folder)


def test_train_refuses_gpu_offline_hub_and_missing_paths_before_loading(tmp_path, no_model_load):
    run = tmp_path / "run"
    if not torch.cuda.is_available():
        with pytest.raises(
            PreflightError, match=r"trainer\.accelerator=gpu but this machine has no CUDA GPU"
        ) as err:
            _train(["trainer.accelerator=gpu"], run)
        assert "use trainer.accelerator=cpu (or trainer=cpu)" in str(err.value)
    with pytest.raises(PreflightError) as err:
        _train(["data.source=allenai/tulu-3-sft-mixture"], run)
    assert "data.source='allenai/tulu-3-sft-mixture' is a Hugging Face hub dataset" in str(err.value)
    assert "HF_HUB_OFFLINE=1" in str(err.value)
    with pytest.raises(PreflightError, match=r"data\.source='/no/such/file\.jsonl': no such file"):
        _train(["data.source=/no/such/file.jsonl"], run)
    assert not run.exists()


# ------------------------------------------------------------------------------------- 4. actionable messages
def test_offline_hub_model_message_names_repo_gating_offline_mode_and_gpu(no_model_load, tmp_path):
    from src.train import train

    with pytest.raises(PreflightError) as err:
        train(compose_cfg(["model=llama3_8b", "logger=none"], tmp_path / "run"))
    msg = str(err.value)
    for part in (
        "model.name_or_path='meta-llama/Meta-Llama-3-8B' is a Hugging Face hub model",
        "the Makefile and the test setup turn offline mode on by default",
        "it may be gated -- accept its licence on https://huggingface.co/meta-llama/Meta-Llama-3-8B",
        "HF_TOKEN",
        "conf/recipe/_gpu.yaml",
    ):
        assert part in msg, part


def test_missing_local_model_path_is_not_called_a_repo_id(no_model_load, tmp_path):
    from src.train import train

    with pytest.raises(PreflightError, match=r"model\.name_or_path='/no/such/model': no such folder") as err:
        train(compose_cfg(["model.name_or_path=/no/such/model", "logger=none"], tmp_path / "run"))
    assert "repo" not in str(err.value).lower()


def test_user_errors_print_one_message_and_library_errors_keep_traceback(monkeypatch, capsys):
    from src.utils.cli import user_errors
    from src.utils.errors import ConfigError

    monkeypatch.delenv("FLEXIDEPTH_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        with user_errors():
            raise ConfigError("optim.lr must be > 0, got 0")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == "error: optim.lr must be > 0, got 0"
    with pytest.raises(RuntimeError, match="a library failure"):
        with user_errors():
            raise RuntimeError("a library failure")
    monkeypatch.setenv("FLEXIDEPTH_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        with user_errors():
            raise ConfigError("shown with its traceback")


def test_failed_command_prints_no_traceback_and_leaves_no_folder(tmp_path):
    env = dict(os.environ, PROJECT_ROOT=str(tmp_path))
    env.pop("FLEXIDEPTH_TRACEBACK", None)
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "src.train", "debug=tiny", "optim.lr=0", f"hydra.run.dir={run}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # like the other CLI tests: a loaded shared machine can take minutes to start Python
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "error: optim.lr must be > 0, got 0" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not run.exists()  # no empty run folder (nor a W&B run inside it) is left behind


# ------------------------------------------------------------------------------------- 5. console
def test_validation_counts_optimizer_steps_and_every_run_validates_at_its_end(tmp_path, monkeypatch):
    """accumulate 2, val_check_interval 4, max_steps 6: validation at optimizer steps 4 and 6 (the end);
    the progress bar's total is the run's 12 micro-batches, not the epoch's."""
    from src.lit.module import FlexiDepthModule
    from src.train import train

    seen = []
    original = FlexiDepthModule.on_validation_epoch_end

    def record(self):
        original(self)
        seen.append((self.global_step, self.trainer.progress_bar_callback.total_train_batches))

    monkeypatch.setattr(FlexiDepthModule, "on_validation_epoch_end", record)
    cfg = compose_cfg(
        [
            "debug=tiny",
            "logger=none",
            "trainer.accumulate_grad_batches=2",
            "trainer.val_check_interval=4",
            "trainer.max_steps=6",
            "trainer.limit_val_batches=1",
            "data.micro_batch_size=2",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert seen == [(4, 12), (6, 12)]
    assert metrics["val/ppl"] > 1
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"]["val/ppl"] == metrics["val/ppl"]


def test_third_party_noise_is_silenced_at_the_source(caplog):
    import lightning as L

    from src.utils.quiet import silence_third_party

    assert compose_cfg().trainer.enable_model_summary is False
    silence_third_party()
    with caplog.at_level(logging.INFO):
        L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert "GPU available" not in caplog.text and "Tip" not in caplog.text


def test_eval_folder_is_named_after_the_checkpoint():
    from tests.helpers.configs import compose_tiny

    cfg = compose_tiny("evaluate", ["ckpt_path=outputs/train/runs/alpha3/flexidepth"])
    assert cfg.run_name.startswith("alpha3_")
    assert compose_tiny(
        "evaluate", ["ckpt_path='outputs/train/sweeps/alpha_x/1_skip.alpha=0.1'"]
    ).run_name.startswith("alpha_x_1_skip.alpha=0.1_")
    assert compose_tiny("evaluate", []).run_name.startswith("base_")
    assert compose_tiny("evaluate", ["method=shortgpt"]).run_name.startswith("shortgpt_")


def test_sweeps_print_their_folder(capsys):
    from omegaconf import OmegaConf

    from src.utils.hydra_callbacks import PrintSweepFolder

    hydra_cfg = OmegaConf.load(ROOT / "conf" / "hydra" / "default.yaml")
    assert hydra_cfg.callbacks.sweep_folder._target_ == "src.utils.hydra_callbacks.PrintSweepFolder"
    cfg = OmegaConf.create({"task_name": "train", "hydra": {"sweep": {"dir": "/x/sweeps/alpha_1"}}})
    cb = PrintSweepFolder()
    cb.on_multirun_start(cfg)
    cb.on_multirun_end(cfg)
    assert capsys.readouterr().out.splitlines() == [
        "sweep folder: /x/sweeps/alpha_1",
        "sweep done: /x/sweeps/alpha_1",
        "  summary: python -m src.sweep_summary sweep_dir=/x/sweeps/alpha_1",
    ]


def test_hub_load_failure_names_the_repo_and_what_to_do():
    from src.models.loader import load_base_model

    with pytest.raises(PreflightError) as err:
        _LOAD_BASE(ModelConfig(**{"name_or_path": "some-org/not-cached-model", "dtype": "float32"}))
    msg = str(err.value)
    assert msg.startswith(
        "model.name_or_path='some-org/not-cached-model': the Hugging Face hub model could not"
    )
    assert "https://huggingface.co/some-org/not-cached-model" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(PreflightError, match=r"model\.name_or_path='/no/such/dir': cannot load a model from"):
        load_base_model(ModelConfig(**{"name_or_path": "/no/such/dir", "dtype": "float32"}))


def test_sweep_summary_lists_a_damaged_metrics_file_by_name(tmp_path):
    from src.utils.sweeps import read_sweep

    job = tmp_path / "0_skip.alpha=0.1"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- skip.alpha=0.1\n")
    (job / "metrics.json").write_text('{"metrics": {"val/ppl": 3')  # truncated
    (point,) = read_sweep(tmp_path)
    assert point.status.startswith(f"damaged {job / 'metrics.json'} (JSONDecodeError")


def test_compare_refuses_foreign_and_nan_checkpoints_before_loading(tmp_path, no_model_load):
    from src.config.commands import CompareCommand
    from src.config.schemas import load

    qwen = _tiny_export(tmp_path / "runs" / "qwen_fd", "tiny_qwen2")
    nan = _tiny_export(tmp_path / "runs" / "nan_fd", poison="model.layers.2.router.head.weight")
    from tests.helpers.configs import compose_tiny

    cfg = compose_tiny(
        "compare",
        [
            f"runs_dir={tmp_path / 'runs'}",
            "trained={}",
            f"+trained.other={{ckpt: '{qwen}', table: main}}",
            f"+trained.diverged={{ckpt: '{nan}', table: main}}",
            f"+trained.gone={{ckpt: '{tmp_path / 'missing'}', table: main}}",  # left out, as before
            "eval.tau=-1",
        ],
        tmp_path / "compare_out",
    )
    with pytest.raises(ConfigError, match=r"eval\.tau must be null or a number in \[0, 1\], got -1"):
        load(cfg, CompareCommand).check()
    cfg.eval.tau = None
    with pytest.raises(PreflightError) as err:
        load(cfg, CompareCommand).check()
    msg = str(err.value)
    assert "trained.other.ckpt: " in msg and "model_type='qwen2' (this model: 'llama')" in msg
    assert (
        f"trained.diverged.ckpt: {nan / WEIGHTS}: tensor model.layers.2.router.head.weight holds NaN" in msg
    )
    assert "trained.gone" not in msg
