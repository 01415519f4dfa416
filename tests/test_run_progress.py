"""Never lose a run, round 3 (issue 35): a run's progress belongs to the run, a finished run is a state, no
writes through symlinks, numeric run names, sweeps that report library failures. Tiny model, few steps.

The command-line tests run `python -m src.train` (through `main()`, so Hydra's folder handling and the exit
statuses are the real ones); where a failure has to happen at a given step, a small script patches the
module's `on_train_batch_end` (after the checkpoint callbacks of that step ran) and then calls `main()`.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from src.utils.errors import RunFolderError
from src.utils.files import append_text, atomic_write_text
from src.utils.runs import RunFinished, check_run_name, run_finished
from tests.test_data_safety import tree
from tests.test_runs import _train

ROOT = Path(__file__).resolve().parents[1]
# 8 steps, checkpoints at 2, 4, 6, 8 (debug=tiny), no validation: a few seconds of training
ARGS = ["debug=tiny", "logger=none", "trainer.max_steps=8", "trainer.limit_val_batches=0"]
EXIT_SIGTERM, EXIT_SIGINT = 128 + signal.SIGTERM, 128 + signal.SIGINT

ACTIONS = {
    "exception": "raise RuntimeError('simulated crash')",
    "sigterm": "os.kill(os.getpid(), signal.SIGTERM)",  # Lightning stops at the step's end (SIGTERMException)
    "sigint": "os.kill(os.getpid(), signal.SIGINT)",  # Ctrl-C: KeyboardInterrupt, Lightning exits 1 after it
    "library_error_in_point_0": "if HydraConfig.get().job.num == 0: raise RuntimeError('simulated library failure')",
}


def _env(root: Path) -> dict:
    env = dict(os.environ, PROJECT_ROOT=str(root), PYTHONPATH=str(ROOT))
    env.pop("FLEXIDEPTH_TRACEBACK", None)
    return env


def train_cli(args, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=ROOT, env=_env(root), capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def train_cli_failing(args, root: Path, step: int, action: str, hashes: Path) -> subprocess.CompletedProcess:
    """`python -m src.train <args>` whose module, at the end of global step `step` (its checkpoints written),
    records the sha256 of every file in checkpoints/ into `hashes` and then does ACTIONS[action]."""
    script = textwrap.dedent(
        f"""
        import hashlib, json, os, runpy, signal, sys
        from pathlib import Path
        import torch
        from hydra.core.hydra_config import HydraConfig
        from src.lit.module import FlexiDepthModule

        original = FlexiDepthModule.on_train_batch_end

        def at_step(self, *args):
            original(self, *args)
            if self.global_step == {step}:
                ckpts = Path(self.trainer.default_root_dir) / "checkpoints"
                files = sorted(ckpts.iterdir()) if ckpts.is_dir() else []
                digests = {{p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
                Path({str(hashes)!r}).write_text(json.dumps(digests))
                {ACTIONS[action]}

        FlexiDepthModule.on_train_batch_end = at_step
        sys.argv = ["src.train", *{list(args)!r}]
        runpy.run_module("src.train", run_name="__main__", alter_sys=True)  # as `python -m src.train`
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=_env(root), capture_output=True, text=True, timeout=900
    )


def runs_dir(root: Path) -> Path:
    return root / "outputs" / "train" / "runs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One run of ARGS that nobody interrupts, under the numeric run_name 12345 (item 6: Hydra reads it as
    an int; it is the folder name "12345")."""
    root = tmp_path_factory.mktemp("uninterrupted")
    res = train_cli([*ARGS, "run_name=12345"], root)
    assert res.returncode == 0, res.stderr[-3000:]
    return runs_dir(root) / "12345"


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------ kind 1: progress is kept
@pytest.mark.slow
@pytest.mark.parametrize(
    "action,step,status",
    [("exception", 3, 1), ("sigterm", 4, EXIT_SIGTERM), ("sigint", 5, EXIT_SIGINT)],
    ids=["exception-step3", "sigterm-step4", "sigint-step5"],
)
def test_a_failure_after_the_first_checkpoint_keeps_the_run_and_resume_is_bit_identical(
    tmp_path, uninterrupted, action, step, status
):
    run = runs_dir(tmp_path) / "x"
    args = [*ARGS, "run_name=x"]
    hashes = tmp_path / "hashes.json"
    res = train_cli_failing(args, tmp_path, step, action, hashes)
    assert res.returncode == status, res.stderr[-3000:]
    assert "removed what the failed command created" not in res.stderr
    assert f"the run keeps its folder {run}" in res.stderr, res.stderr[-3000:]
    assert "python -m src.train debug=tiny logger=none trainer.max_steps=8" in res.stderr
    assert "run_name=x resume=auto" in res.stderr
    kept = json.loads(hashes.read_text())
    assert kept and digests(run / "checkpoints") == kept  # every checkpoint there, byte for byte
    assert run_finished(run) is None

    res = train_cli([*args, "resume=auto"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(uninterrupted / "flexidepth" / "flexidepth.safetensors")
    b = load_file(run / "flexidepth" / "flexidepth.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    full = json.loads((uninterrupted / "metrics.json").read_text())
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["global_step"] == full["global_step"] == 8
    timing = ("train/tokens_per_s",)  # wall-clock throughput: the one metric that may differ
    assert {k: v for k, v in resumed["metrics"].items() if k not in timing} == {
        k: v for k, v in full["metrics"].items() if k not in timing
    }
    assert run_finished(run)["global_step"] == 8


@pytest.mark.slow
def test_a_failure_before_the_first_checkpoint_removes_only_its_own_scaffolding(tmp_path):
    run = runs_dir(tmp_path) / "early"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("a user's file\n")
    before = tree(run)
    res = train_cli_failing(
        [*ARGS, "run_name=early", "resume=auto"], tmp_path, 1, "sigterm", tmp_path / "h.json"
    )
    assert res.returncode == EXIT_SIGTERM, res.stderr[-3000:]  # not 0
    assert "removed what the failed command created" in res.stderr
    after = tree(run)  # .hydra, history, log: gone; the user's file: kept; the lock file stays (empty)
    assert {k: v for k, v in after.items() if k != ".run.lock"} == before
    assert (run / ".run.lock").read_text() == ""
    res = train_cli_failing([*ARGS, "run_name=new"], tmp_path, 1, "exception", tmp_path / "h.json")
    assert res.returncode == 1 and "simulated crash" in res.stderr
    assert not (runs_dir(tmp_path) / "new").exists()


def test_nan_loss_message_is_true(tmp_path, monkeypatch):
    """The non-finite-loss stop says the checkpoints stay; in process nothing is cleaned up at all."""
    from src.lit import module as lit_module

    real_forward = lit_module.FlexiDepthModule.forward

    def nan_from_step_5(self, batch):
        out = real_forward(self, batch)
        if self.global_step >= 5:
            out.lm_loss_sum = out.lm_loss_sum * float("nan")
        return out

    monkeypatch.setattr(lit_module.FlexiDepthModule, "forward", nan_from_step_5)
    with pytest.raises(FloatingPointError, match="Checkpoints written before this step stay"):
        _train(["trainer.max_steps=8"], tmp_path / "run")
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert run_finished(tmp_path / "run") is None


# ------------------------------------------------------------------------------ kind 2: finished runs
def _empty_checkpoints(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()


def _only_safetensors(run: Path) -> None:
    _empty_checkpoints(run)
    shutil.copy(run / "flexidepth" / "flexidepth.safetensors", run / "checkpoints" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("state", ["checkpoints", "emptied", "safetensors_only", "damaged_last"])
def test_resume_auto_on_a_finished_run_changes_nothing_and_exits_0(tmp_path, uninterrupted, state):
    run = runs_dir(tmp_path) / "done"
    shutil.copytree(uninterrupted, run, symlinks=True)
    if state == "emptied":
        _empty_checkpoints(run)
    elif state == "safetensors_only":
        _only_safetensors(run)
    elif state == "damaged_last":
        (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    before = tree(run)
    res = train_cli([*ARGS, "run_name=done", "resume=auto"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{run} already finished (step 8" in res.stdout, res.stdout[-2000:]
    assert tree(run) == before  # every file byte-identical, .hydra/, log, lock and history included


def test_finished_state_in_process(tmp_path, caplog):
    """resume=auto raises RunFinished touching nothing; resume=extend continues (and needs a checkpoint);
    a fit that trains nothing never rewrites metrics.json; resume=false still refuses."""
    run = tmp_path / "run"
    _train([], run)
    record = run_finished(run)
    assert record["event"] == "finish" and record["global_step"] == 2 and record["n"] == 0
    before = tree(run)
    with pytest.raises(RunFinished, match="already finished"):
        _train(["resume=auto", "trainer.max_steps=4"], run)
    assert tree(run) == before
    with pytest.raises(RunFolderError, match="already holds a run"):
        _train([], run)
    assert tree(run) == before

    metrics = (run / "metrics.json").read_bytes()
    _train(["resume=extend"], run)  # already at max_steps: nothing trained
    assert (run / "metrics.json").read_bytes() == metrics  # not rewritten with empty metrics
    assert json.loads(metrics)["metrics"]
    _train(["resume=extend", "trainer.max_steps=3"], run)
    assert run_finished(run)["global_step"] == 3
    events = [json.loads(x)["event"] for x in (run / "history" / "events.jsonl").read_text().splitlines()]
    assert events == ["start", "finish", "extend", "finish", "extend", "finish"]

    _empty_checkpoints(run)
    before = tree(run)
    with pytest.raises(RunFinished):
        _train(["resume=auto"], run)
    with pytest.raises(RunFolderError, match="resume=extend: .* finished run .* no intact checkpoint"):
        _train(["resume=extend", "trainer.max_steps=4"], run)
    assert tree(run) == before


def test_run_finished_reads_only_the_latest_event(tmp_path):
    assert run_finished(tmp_path / "missing") is None
    history = tmp_path / "history"
    history.mkdir()
    lines = [{"n": 0, "event": "start"}, {"n": 0, "event": "finish", "global_step": 5}]
    (history / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run_finished(tmp_path)["global_step"] == 5
    with open(history / "events.jsonl", "a") as handle:
        handle.write(json.dumps({"n": 1, "event": "extend"}) + "\n{not json\n")
    assert run_finished(tmp_path) is None


# ------------------------------------------------------------------------------ kind 4: symlinks
def test_a_symlinked_lock_is_refused_and_its_target_kept(tmp_path, no_model_load):
    outside = tmp_path / "precious.txt"
    outside.write_text("not a lock\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".run.lock").symlink_to(outside)
    with pytest.raises(RunFolderError, match=rf"{run / '.run.lock'} is a symbolic link"):
        _train([], run)
    assert outside.read_text() == "not a lock\n"


@pytest.fixture(name="no_model_load")
def _no_model_load(monkeypatch):
    from tests.test_runs import no_model_load

    return no_model_load(monkeypatch)


@pytest.mark.parametrize("name", ["history/events.jsonl", "layer_usage.jsonl"])
def test_symlinked_appended_files_are_refused_on_resume(tmp_path, name):
    run = tmp_path / "run"
    _train(["trainer.max_steps=2"], run)
    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's file\n")
    (run / name).unlink()
    (run / name).symlink_to(outside)
    with pytest.raises(RunFolderError, match=rf"{run / name} is a symbolic link"):
        _train(["resume=extend", "trainer.max_steps=4"], run)
    assert outside.read_text() == "someone else's file\n"


def test_replaced_files_replace_the_link_not_its_target(tmp_path):
    """metrics.json, status.json, checkpoints, the heatmap: written atomically, so a symlink under the name
    is replaced by the new file and the file it pointed to stays byte-identical."""
    run = tmp_path / "run"
    _train(["trainer.max_steps=2"], run)
    outside = {n: tmp_path / f"outside-{n}" for n in ("metrics.json", "run_fraction_heatmap.png")}
    for name, target in outside.items():
        target.write_bytes(b"keep me")
        (run / name).unlink()
        (run / name).symlink_to(target)
    _train(["resume=extend", "trainer.max_steps=4"], run)
    for name, target in outside.items():
        assert target.read_bytes() == b"keep me"
        assert not (run / name).is_symlink()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 4

    from src.utils.cli import write_point_status

    target = tmp_path / "status-target"
    target.write_text("x")
    (tmp_path / "point").mkdir()
    (tmp_path / "point" / "status.json").symlink_to(target)
    write_point_status(tmp_path / "point", None)
    assert target.read_text() == "x" and json.loads((tmp_path / "point" / "status.json").read_text())


def test_file_writers_never_write_through_a_link(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("original\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    atomic_write_text(link, "new\n")
    assert target.read_text() == "original\n" and not link.is_symlink() and link.read_text() == "new\n"
    link.unlink()
    link.symlink_to(target)
    with pytest.raises(OSError, match=rf"{link} is a symbolic link; refusing to append"):
        append_text(link, "more\n")
    assert target.read_text() == "original\n"
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(OSError, match="symbolic link"):
        append_text(dangling, "x\n")
    assert not (tmp_path / "nowhere.txt").exists()


@pytest.mark.slow
def test_hydra_files_through_a_link_are_refused_before_hydra_writes(tmp_path):
    run = runs_dir(tmp_path) / "linked"
    (run / ".hydra").mkdir(parents=True)
    outside = tmp_path / "outside.yaml"
    outside.write_text("mine: 1\n")
    (run / ".hydra" / "config.yaml").symlink_to(outside)
    before = tree(tmp_path)
    res = train_cli([*ARGS, "run_name=linked"], tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"error: {run / '.hydra' / 'config.yaml'} is a symbolic link" in res.stderr
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------ kind 6: names and sweeps
@pytest.mark.parametrize("name,folder", [(12345, "12345"), (0, "0"), (2.5, "2.5"), ("007", "007")])
def test_numeric_run_names_are_their_folder_name(name, folder):
    assert check_run_name(name) == folder


@pytest.mark.parametrize("name", [True, False, None, ""])
def test_booleans_null_and_empty_names_are_still_refused(name):
    with pytest.raises(RunFolderError, match="run_name"):
        check_run_name(name)


@pytest.mark.slow
def test_numeric_run_name_on_the_command_line(uninterrupted):
    assert uninterrupted.name == "12345" and (uninterrupted / "metrics.json").is_file()
    assert json.loads((uninterrupted / "metrics.json").read_text())["run_name"] == "12345"
    assert run_finished(uninterrupted)["global_step"] == 8


@pytest.mark.slow
def test_a_sweep_point_with_a_library_error_reports_every_point_and_exits_non_zero(tmp_path):
    sweep = tmp_path / "sweep"
    short = ["debug=tiny", "logger=none", "trainer.max_steps=2", "trainer.limit_val_batches=0"]
    args = ["--multirun", *short, "seed=1,2", f"hydra.sweep.dir={sweep}"]
    res = train_cli_failing(args, tmp_path, 1, "library_error_in_point_0", tmp_path / "h.json")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" in res.stderr and "RuntimeError: simulated library failure" in res.stderr
    assert "1 sweep point(s) failed" in res.stderr and f"sweep done: {sweep}" in res.stdout
    points = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert (
        len(points) == 2 and points[0].name.startswith("0_seed=1,") and points[1].name.startswith("1_seed=2,")
    )
    first = json.loads((points[0] / "status.json").read_text())
    assert first["status"] == "failed" and first["user_error"] is False
    assert json.loads((points[1] / "status.json").read_text())["status"] == "ok"
    assert (points[1] / "metrics.json").is_file()  # the point after the failed one ran


def test_a_run_stopped_after_its_last_checkpoint_is_not_finished_without_its_metrics(tmp_path):
    """A stop between the last checkpoint (at max_steps) and the final validation leaves no metrics.json: a
    resume that has nothing to train must not record such a run as finished; it says how to complete it."""
    run = tmp_path / "run"
    _train([], run)
    events = run / "history" / "events.jsonl"
    lines = events.read_text().splitlines()
    assert json.loads(lines[-1])["event"] == "finish"
    events.write_text("\n".join(lines[:-1]) + "\n")  # as if stopped before fit ended
    (run / "metrics.json").unlink()
    with pytest.raises(
        RunFolderError, match=r"not finished: continue it with resume=auto trainer.max_steps=3"
    ):
        _train(["resume=auto"], run)
    assert run_finished(run) is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir())  # its checkpoints are kept
    _train(["resume=auto", "trainer.max_steps=3"], run)
    assert run_finished(run)["global_step"] == 3 and json.loads((run / "metrics.json").read_text())["metrics"]
