"""Nothing is lost (issue 22): every destructive path of the entry points, tried on tiny models.

Each test fills folders with files the command did not create (earlier runs, a user's notes, a working
directory), runs the real entry point (`python -m src.<command>` where Hydra's own folder handling matters,
`train(cfg)` in process otherwise) and asserts that every one of those files is byte-identical afterwards.
Kinds: unsafe run names (K1), concurrent starts (K1), failing commands in a folder holding other files (K1),
overwrite with a late error (K1), resume in every folder state (K2), non-finite or out-of-range settings (K3),
reports that describe the artefact and sweeps that run every point (K4), data files in other encodings and
user errors as one line (K5/K6).
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.models.config import ModelConfig
from src.utils.cli import is_user_error
from src.utils.errors import RunFolderError
from src.utils.runs import RunLock, check_run_name, find_resume_checkpoint
from tests.helpers.configs import compose_tiny
from tests.test_runs import SHORT, _train, no_model_load
from tests.test_train import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(name="no_model_load")
def _no_model_load(monkeypatch):
    """Fail the test if a base model is loaded (the refusals must come before)."""
    return no_model_load(monkeypatch)


# ------------------------------------------------------------------------------------------------ helpers
def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256 of the bytes, or 'dir'} of everything under `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_kept(before: dict[str, str], root: Path, ignore=()) -> None:
    """Every path of `before` still exists under `root` with the same bytes (paths in `ignore` excepted)."""
    after = tree(root)
    changed = [p for p, digest in before.items() if p not in ignore and after.get(p) != digest]
    assert not changed, f"changed or deleted: {changed}"


def fake_run(folder: Path) -> None:
    """A run folder as src.train leaves it (what matters here: files other commands must not touch)."""
    (folder / "history" / "hydra-000").mkdir(parents=True)
    (folder / "history" / "config-000.yaml").write_text("seed: 1\n")
    (folder / "history" / "hydra-000" / "config.yaml").write_text("seed: 1\n")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(os.urandom(256))
    (folder / "metrics.json").write_text('{"metrics": {"val/ppl": 12.5}}')
    (folder / "wandb_id.txt").write_text("abc123")
    (folder / "train.log").write_text("an earlier run's log\n")


def user_tree(root: Path) -> dict[str, str]:
    """Two earlier runs and a user's own file under `<root>/outputs`; returns their tree."""
    runs = root / "outputs" / "train" / "runs"
    for name in ("week1", "week2"):
        (runs / name).mkdir(parents=True)
        fake_run(runs / name)
    (root / "outputs" / "notes.md").write_text("my notes\n")
    return tree(root)


def cli(args, root: Path, cwd: Path = ROOT, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PROJECT_ROOT=str(root), PYTHONPATH=str(ROOT))
    env.pop("FLEXIDEPTH_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(res: subprocess.CompletedProcess, text: str) -> None:
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"error: {text}" in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout


# ------------------------------------------------------------------------------------ K1: run names
@pytest.mark.parametrize("name", ["", " ", ".", "..", "../..", "a/b", "/abs", "x\x00y", " lead", "x" * 300])
def test_run_names_must_be_one_safe_folder_name(name):
    with pytest.raises(RunFolderError, match="run_name"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["myrun", "2026-12-02_10-00-00", "a.b_c-d", "run=1,x=2"])
def test_ordinary_run_names_pass(name):
    assert check_run_name(name) == name


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [["run_name=", "resume=auto"], ["run_name=", "overwrite=true"], ["run_name=../..", "overwrite=true"]],
    ids=["empty-resume", "empty-overwrite", "dotdot-overwrite"],
)
def test_unsafe_run_names_touch_nothing(tmp_path, overrides):
    before = user_tree(tmp_path)
    res = cli(["src.train", "debug=tiny", "logger=none", "trainer.max_steps=2", *overrides], tmp_path)
    assert_user_error(res, "run_name")
    assert tree(tmp_path) == before  # nothing deleted, changed or added, not even .hydra/


# ------------------------------------------------------------------------------------ K1: concurrent starts
@pytest.mark.slow
def test_a_refused_second_start_leaves_the_running_run_intact(tmp_path):
    run = tmp_path / "outputs" / "train" / "runs" / "r"
    run.mkdir(parents=True)
    fake_run(run)
    with RunLock(run):  # the running first start (this process)
        before = tree(run)
        res = cli(["src.train", "debug=tiny", "logger=none", "run_name=r", "resume=auto"], tmp_path)
        assert_user_error(res, f"run folder {run} is in use by pid {os.getpid()}")
        # everything byte-identical, .hydra/ and the lock included; only the shared log gained lines
        assert_kept(before, run, ignore={"train.log"})
        assert (run / "train.log").read_text().startswith("an earlier run's log\n")
        assert set(tree(run)) == set(before)
        # the lock file is still the one held: a third start is refused too
        with pytest.raises(RunFolderError, match="in use by"):
            RunLock(run).acquire()


# ------------------------------------------------------------------------------------ K1: failing commands
@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["max_new_tokens=-1"], "max_new_tokens must be an integer >= 0"),
        (["ckpt_path=/nonexistent/run"], "ckpt_path"),
    ],
    ids=["bad-argument", "bad-ckpt-path"],
)
def test_failing_generate_deletes_nothing_in_the_working_directory(tmp_path, args, message):
    work = tmp_path / "work"
    for rel in ("wandb/run-1/files.txt", ".hydra/config.yaml", "history/config-000.yaml"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(rel)
    (work / "job.log").write_text("log\n")
    before = tree(work)
    res = cli(["src.generate", "model=tiny_llama", *args], tmp_path, cwd=work)
    assert_user_error(res, message)
    assert tree(work) == before


@pytest.mark.slow
def test_a_failed_command_deletes_only_what_it_created(tmp_path):
    """A config error in a folder that holds a user's files (even names our runs use): all kept, byte for
    byte, .hydra/ and the log included; what the command added is gone. In a new folder: the folder is gone."""
    folder = tmp_path / "mine"
    (folder / "wandb").mkdir(parents=True)
    (folder / "wandb" / "keep.txt").write_text("a user's W&B folder")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("an earlier config\n")
    (folder / "train.log").write_text("earlier lines\n")
    (folder / "notes.txt").write_text("notes")
    before = tree(folder)
    res = cli(["src.train", "debug=tiny", "optim.lr=0", f"hydra.run.dir={folder}"], tmp_path)
    assert_user_error(res, "optim.lr must be > 0, got 0")
    assert tree(folder) == before
    fresh = tmp_path / "fresh"
    res = cli(["src.train", "debug=tiny", "optim.lr=0", f"hydra.run.dir={fresh}"], tmp_path)
    assert_user_error(res, "optim.lr must be > 0, got 0")
    assert not fresh.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command,args,message",
    [
        ("src.eval", ["eval.tau=2"], "eval.tau must be null or a number in [0, 1], got 2.0"),
        (
            "src.compare",
            ["curves.max_tokens=nan"],
            "Error merging override curves.max_tokens=nan: Value 'nan' of type 'float' could not be converted",
        ),
    ],
    ids=["eval", "compare"],
)
def test_failed_eval_and_compare_keep_a_folder_they_did_not_create(tmp_path, command, args, message):
    folder = tmp_path / "results"
    fake_run(folder)
    before = tree(folder)
    res = cli([command, "model=tiny_llama", "logger=none", *args, f"hydra.run.dir={folder}"], tmp_path)
    assert_user_error(res, message)
    assert tree(folder) == before


# ------------------------------------------------------------------------------------ K1: overwrite
def _local_data(tmp_path: Path, text: bytes) -> list[str]:
    path = tmp_path / "data.jsonl"
    path.write_bytes(text)
    return ["data=local", f"data.source={path}", "data.val_fraction=0.5"]


@pytest.mark.parametrize("late", ["data_row", "budget", "init_from_shape", "data_encoding"])
def test_overwrite_with_a_late_error_keeps_the_old_run(tmp_path, late):
    run = tmp_path / "run"
    _train([], run)
    (run / "notes.txt").write_text("not a run file")
    before = tree(run)
    if late == "data_row":
        overrides = _local_data(tmp_path, b'{"text": "fine"}\n{"messages": 5}\n')
        match = r"data\.jsonl line 2"
    elif late == "data_encoding":
        overrides = _local_data(tmp_path, '{"text": "café"}\n'.encode("latin-1"))
        match = r"data\.jsonl line 1: byte 0xe9 .* is not UTF-8"
    elif late == "budget":
        overrides, match = ["loss.target_layers_skipped=3"], r"exceeds the 2 routed layers"
    else:  # a checkpoint of another adapter width: the shapes do not fit
        from omegaconf import OmegaConf

        from src.flexidepth import FlexiDepthConfig, inject, save_flexidepth
        from src.models.loader import load_base_model

        model = load_base_model(
            ModelConfig(**OmegaConf.to_container(compose_cfg(["debug=tiny"]).model, resolve=True))
        )
        inject(model, FlexiDepthConfig(adapter_rank=4))
        save_flexidepth(model, tmp_path / "other")
        overrides, match = [f"init_from={tmp_path / 'other'}"], "has shape"
    with pytest.raises(Exception, match=match) as err:
        _train(["overwrite=true", *overrides], run)
    assert is_user_error(err.value)  # printed as one `error:` line, exit 2
    assert tree(run) == before


def test_overwrite_deletes_only_run_files(tmp_path):
    run = tmp_path / "run"
    _train([], run)
    (run / "notes.txt").write_text("a user's file")
    _train(["overwrite=true", "seed=3"], run)
    assert (run / "notes.txt").read_text() == "a user's file"
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2


def test_overwrite_refuses_a_folder_that_was_not_started_as_a_run(tmp_path, no_model_load):
    folder = tmp_path / "folder"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "mine.ckpt").write_bytes(b"user data")
    before = tree(folder)
    with pytest.raises(RunFolderError, match="was not started as a run"):
        _train(["overwrite=true"], folder)
    assert_kept(before, folder)
    assert set(tree(folder)) - set(before) == {".run.lock"}  # the in-process call's lock (the CLI removes it)


# ------------------------------------------------------------------------------------ K2: resume
def test_resume_takes_the_checkpoint_with_the_most_progress(tmp_path, caplog):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _train(["trainer.max_steps=2"], run)
    step2 = ckpts / "step2.keep"
    shutil.copy(ckpts / "last.ckpt", step2)
    # a changed last-checkpoint key on resume: one last.ckpt, no last-v1.ckpt beside it
    _train(["resume=extend", "trainer.max_steps=4", "callbacks.last_checkpoint.every_n_train_steps=1"], run)
    assert sorted(p.name for p in ckpts.glob("last*.ckpt")) == ["last.ckpt"]
    # a folder as older versions left it: last.ckpt at step 2, last-v1.ckpt at step 4 (written later)
    os.replace(ckpts / "last.ckpt", ckpts / "last-v1.ckpt")
    shutil.copy(step2, ckpts / "last.ckpt")
    os.utime(ckpts / "last.ckpt", (1, 1))  # older on disk as well
    path, ckpt, notes = find_resume_checkpoint(ckpts)
    assert path.name == "last-v1.ckpt" and ckpt["global_step"] == 4
    assert any(
        "taking last-v1.ckpt (step 4): the intact checkpoint with the most progress" in n for n in notes
    )
    with caplog.at_level(logging.WARNING, logger="src.train"):
        _train(["resume=extend", "trainer.max_steps=6"], run)
    assert "taking last-v1.ckpt (step 4)" in caplog.text
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6


def test_resume_ties_go_to_the_newest_file(tmp_path):
    run = tmp_path / "run"
    _train([], run)
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "last.ckpt", ckpts / "copy.ckpt")
    os.utime(ckpts / "last.ckpt", (1, 1))
    assert find_resume_checkpoint(ckpts)[0].name == "copy.ckpt"


@pytest.mark.parametrize("state", ["missing", "empty", "history_only", "user_files"])
def test_resume_auto_in_every_folder_state(tmp_path, state):
    """Nothing to resume: a fresh start, keeping every file that is not a run's."""
    run = tmp_path / "run"
    if state != "missing":
        run.mkdir()
    if state == "history_only":  # a start that failed before its first checkpoint
        (run / "history").mkdir()
        (run / "history" / "config-000.yaml").write_text("seed: 1\n")
    if state == "user_files":
        (run / "notes.txt").write_text("kept")
    _train(["resume=auto"], run)
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 2
    assert sorted(p.name for p in (run / "history").glob("config-*.yaml")) == ["config-000.yaml"]
    if state == "user_files":
        assert (run / "notes.txt").read_text() == "kept"


# ------------------------------------------------------------------------------------ K3: values
@pytest.mark.parametrize(
    "override,key",
    [
        ("loss.alpha=nan", "loss.alpha=nan"),
        ("loss.target_layers_skipped=nan", "loss.target_layers_skipped=nan"),
        ("loss.temperature=nan", "loss.temperature=nan"),
        ("loss.temperature=1e-40", "loss.temperature must be in"),
        ("optim.lr=inf", "optim.lr=inf"),
        ("skip.tau=nan", "skip.tau=nan"),
        ("data.val_fraction=nan", "data.val_fraction=nan"),
        ("optim.betas=[0.9,nan]", "optim.betas[1]=nan"),
        ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val=inf"),
        ("+method.k=nan", "method.k=nan"),
    ],
)
def test_non_finite_and_out_of_range_settings_are_refused_by_name(tmp_path, override, key, no_model_load):
    with pytest.raises(Exception, match=key.replace("[", r"\[").replace("]", r"\]")) as err:
        _train([override], tmp_path / "run")
    assert is_user_error(err.value)
    assert not (tmp_path / "run").exists()


def test_every_float_of_every_schema_refuses_nan():
    """The kind: every float setting of the typed groups, not a list of cases."""
    import dataclasses

    from src.config.commands import EvaluateCommand, TrainCommand
    from src.config.schemas import load
    from src.utils.errors import ConfigError

    groups = {g: type(getattr(TrainCommand(), g)) for g in ("skip", "loss", "optim", "data")}
    groups["eval"] = type(EvaluateCommand().eval)
    checked = set()
    for group, schema in groups.items():
        for f in dataclasses.fields(schema):
            if "float" not in str(f.type) or "list" in str(f.type) or "dict" in str(f.type):
                continue
            checked.add(f"{group}.{f.name}")
            override = f"{group}.{f.name}=nan"
            cfg = (
                compose_tiny("evaluate", [override])
                if group == "eval"
                else compose_cfg(["debug=tiny", override])
            )
            with pytest.raises(ConfigError, match=rf"{group}\.{f.name}=nan"):
                load(cfg, EvaluateCommand if group == "eval" else TrainCommand)
    # not vacuous: the walk reached the float settings of every group that has them
    assert {
        "skip.tau",
        "loss.alpha",
        "loss.temperature",
        "optim.lr",
        "data.val_fraction",
        "eval.tau",
    } <= checked


@pytest.mark.parametrize(
    "args,flag",
    [
        (["gpus=0", "zero=2"], "error: gpus must be an integer >= 1, got 0"),
        (["gpus=-8"], "error: gpus must be an integer >= 1, got -8"),
        (["seq=-1"], "error: seq must be an integer >= 1, got -1"),
        (["micro_batch=0"], "error: micro_batch must be an integer >= 1, got 0"),
        (["adapter_rank=0"], "error: adapter_rank must be an integer >= 1, got 0"),
        (["gpu_mem=nan"], "error: every setting must be a finite number; not finite: gpu_mem=nan"),
        (["gpu_mem=0"], "error: gpu_mem must be > 0, got 0.0"),
        (["routed_layers=99"], "error: routed_layers=99 exceeds the model's 32 layers"),
        (["arch=llama9"], "error: arch must be one of"),
        (["zero=5"], "error: zero must be 0, 1, 2 or 3, got 5"),
        (["gpus=two"], "error: Error merging override gpus=two: Value 'two' of type 'str' could not be"),
    ],
)
def test_memory_planner_refuses_impossible_values(args, flag, capsys):
    from src.memory_planner import main
    from tests.helpers.configs import run_main

    with pytest.raises(SystemExit) as exit_:
        run_main(main, args)
    assert exit_.value.code == 2 and flag in capsys.readouterr().err


# ------------------------------------------------------------------------------------ K4: reports
def test_metrics_and_summary_describe_the_exported_model(tmp_path, capsys):
    """Trained to a budget, the export's tau is calibrated; metrics.json and the summary are measured at it."""
    from src.data.datamodule import SFTDataModule
    from src.flexidepth import load_flexidepth
    from src.lit.module import FlexiDepthModule

    run = tmp_path / "run"
    budget = ["loss.target_layers_skipped=1", "trainer.limit_val_batches=2", "trainer.max_steps=4"]
    _train(budget, run)
    record = json.loads((run / "metrics.json").read_text())
    export = json.loads((run / "flexidepth" / "flexidepth_config.json").read_text())
    assert record["skip"]["tau"] == pytest.approx(export["flexidepth"]["tau"])
    assert record["metrics"]["val/tau"] == pytest.approx(export["flexidepth"]["tau"])
    out = capsys.readouterr().out
    skipped = record["metrics"]["val/layers_skipped_mean"]
    assert f"layers skipped {skipped:.2f} of 2 routed" in out and "calibrated tau" in out
    # measure the export itself on the same validation split: the same numbers
    from src.config.commands import TrainCommand
    from src.config.schemas import load

    s = load(compose_cfg([*SHORT, *budget], run), TrainCommand)
    model_cfg = s.model.to_dict()
    dm = SFTDataModule(s.data, tokenizer_path=s.model.tokenizer_path())
    dm.setup("fit")
    module = FlexiDepthModule(model=model_cfg, skip=s.skip.flexidepth(), optim=s.optim, loss=s.loss)
    load_flexidepth(module.model, run / "flexidepth")
    module.flexi_cfg.tau = export["flexidepth"]["tau"]
    measured = module.measure(dm.val_dataloader())
    assert measured["val/layers_skipped_mean"] == pytest.approx(skipped, abs=1e-6)
    assert measured["val/ppl"] == pytest.approx(record["metrics"]["val/ppl"], rel=1e-5)


@pytest.mark.slow
def test_a_sweep_runs_every_point_and_lists_the_failed_ones(tmp_path):
    sweep = tmp_path / "sweep"
    res = cli(
        [
            "src.train",
            "--multirun",
            "debug=tiny",
            "logger=none",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "loss.target_layers_skipped=null",
            "loss.temperature=1e-40,1",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert res.returncode == 2, res.stderr[-3000:]
    assert "1 sweep point(s) failed" in res.stderr and "loss.temperature must be in" in res.stderr
    points = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(points) == 2 and "loss.temperature=1e-40" in points[0] and "loss.temperature=1," in points[1]
    assert json.loads((sweep / points[0] / "status.json").read_text())["status"] == "failed"
    assert json.loads((sweep / points[1] / "status.json").read_text())["status"] == "ok"
    assert (sweep / points[1] / "metrics.json").is_file()  # the point after the failed one ran
    from src.utils.sweeps import read_sweep

    status = {p.job: p.status for p in read_sweep(sweep)}
    assert status[points[1]] == "ok" and status[points[0]].startswith("failed: ")


# ------------------------------------------------------------------------------------ K5/K6: clear failures
@pytest.mark.parametrize(
    "data,match",
    [
        ('{"text": "naïve"}\n'.encode("latin-1"), r"line 1: byte 0xef .* is not UTF-8"),
        ('{"text": "a"}\n{"text": "b"}\n'.encode("utf-16"), r"the file is UTF-16"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"line 2: byte 0xe9"),
    ],
    ids=["latin1", "utf16", "latin1-line2"],
)
def test_data_files_in_other_encodings_are_named(tmp_path, data, match):
    from src.data.datamodule import read_utf8
    from src.utils.errors import DataError

    for suffix in (".jsonl", ".json", ".txt"):
        path = tmp_path / f"d{suffix}"
        path.write_bytes(data)
        with pytest.raises(DataError, match=rf"data\.source={path}(:| line \d+:)"):
            read_utf8(path, "data.source")
        with pytest.raises(DataError, match=match):
            read_utf8(path, "data.source")


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "hello there"}\n')
    from src.data.datamodule import read_utf8

    assert read_utf8(path, "data.source") == '{"text": "hello there"}\n'


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["data.mixture={lee: -1}", "data=mixture"], "data.mixture"),
        (["data=mixture", "data.heldout=[nope]"], "held-out"),
        (["loss.target_layers_skipped=5"], "exceeds the 2 routed layers"),
    ],
)
def test_setting_errors_are_user_errors_before_any_model_load(tmp_path, overrides, match, no_model_load):
    with pytest.raises(Exception, match=match) as err:
        _train(overrides, tmp_path / "run")
    assert is_user_error(err.value)


def test_convert_failures_are_one_line(tmp_path, capsys):
    from src.convert import main
    from tests.helpers.configs import run_main

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    for target in (bad, tmp_path / "missing.ckpt"):
        with pytest.raises(SystemExit) as exit_:
            run_main(main, [f"checkpoint={target}", f"out_dir={tmp_path / 'out'}"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(target) in err
    assert not (tmp_path / "out").exists()
