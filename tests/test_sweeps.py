"""Sweeps and cluster launch: sweep files, the sweep summary, submitit, requeue-safe resume after SIGKILL,
DDP on CPU (same result as one process) and multirun + DDP without duplicated folders or W&B runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from safetensors.torch import load_file

from tests.test_train import CONF, ROOT, _cli, group_options

SWEEPS = group_options("sweep")


def compose_with_hydra(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_files_compose(sweep):
    from omegaconf import OmegaConf

    assert set(SWEEPS) >= {"alpha", "tau", "adapter_rank", "grid"}
    cfg = compose_with_hydra([f"+sweep={sweep}"])
    assert cfg.hydra.mode == RunMode.MULTIRUN
    params = cfg.hydra.sweeper.params
    assert params and all(OmegaConf.select(cfg, key, default="<missing>") != "<missing>" for key in params)
    assert sweep in str(cfg.hydra.sweep.dir) and cfg.logger.wandb.group.startswith(f"{sweep}-")
    assert "sweep" in cfg.hydra.job.config.override_dirname.exclude_keys  # folders named by values only


def test_launcher_presets_compose():
    slurm = compose_with_hydra(
        ["hydra/launcher=submitit_slurm", "trainer=gpu", "trainer.devices=8"]
    ).hydra.launcher
    assert slurm.tasks_per_node == 8 and slurm.gpus_per_node == 8 and slurm.nodes == 1  # one task per GPU
    assert slurm.max_num_timeout > 0 and "${hydra.sweep.dir}" in str(
        slurm._get_node("submitit_folder")._value()
    )
    local = compose_with_hydra(["hydra/launcher=submitit_local"]).hydra.launcher
    assert local._target_.endswith("LocalLauncher")


def _fake_job(root: Path, num: int, overrides: list[str], metrics: dict | None):
    job = root / f"{num}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in ["debug=tiny", *overrides]))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps({"metrics": metrics, "global_step": 1}))


def test_sweep_summary_marks_pareto_front(tmp_path):
    from src.sweep_summary import main
    from src.utils.sweeps import read_sweep
    from tests.helpers.configs import run_main

    points = {0: (0.5, 10.0), 1: (1.0, 11.0), 2: (1.0, 12.0), 3: (2.0, 20.0), 4: (0.2, 10.5)}
    for num, (skipped, ppl) in points.items():
        _fake_job(tmp_path, num, [f"skip.alpha={num}"], {"val/layers_skipped_mean": skipped, "val/ppl": ppl})
    _fake_job(tmp_path, 5, ["skip.alpha=5"], None)  # a failed job
    got = read_sweep(tmp_path)
    assert [p.job.split("_")[0] for p in got] == ["0", "1", "2", "3", "4", "5"]
    assert [p.pareto for p in got] == [True, True, False, True, False, False]
    run_main(main, [f"sweep_dir={tmp_path}", "baseline_ppl=9"])
    table = (tmp_path / "summary.md").read_text()
    assert "skip.alpha" in table and "debug" not in table.split("\n")[0]  # only swept keys as columns
    assert "no metrics.json" in table and "ppl_ratio" in table
    assert (tmp_path / "summary.csv").read_text().count("\n") == 7
    assert (tmp_path / "pareto.png").stat().st_size > 5000


# ---------------------------------------------------------------------------------------------- slow: CLI
TINY = ["debug=tiny"]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow
def test_alpha_sweep_file_runs_and_summarises(tmp_path):
    sweep = tmp_path / "sweep"
    res = _cli(["+sweep=alpha", *TINY, "loss.alpha=0.001,0.1", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"sweep folder: {sweep}" in res.stdout  # printed at the start (issue 13)
    assert f"summary: python -m src.sweep_summary sweep_dir={sweep}" in res.stdout
    jobs = _job_dirs(sweep)
    assert [p.name for p in jobs] == ["0_loss.alpha=0.001", "1_loss.alpha=0.1"]
    ids = {(j / "wandb_id.txt").read_text() for j in jobs}
    assert len(ids) == 2
    for job in jobs:
        run = list(job.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(run) == 1 and (job / "wandb_id.txt").read_text() in run[0].name
        assert b"alpha-" in run[0].read_bytes()  # the sweep's W&B group
        assert json.loads((job / "metrics.json").read_text())["global_step"] == 6
    res = subprocess.run(
        [sys.executable, "-m", "src.sweep_summary", f"sweep_dir={sweep}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "0_loss.alpha=0.001" in (sweep / "summary.md").read_text() and (sweep / "pareto.png").is_file()


@pytest.mark.slow
def test_submitit_local_two_point_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    res = _cli(
        [
            "+sweep=tau",
            *TINY,
            "logger=none",
            "skip.tau=0.4,0.6",
            "hydra/launcher=submitit_local",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = _job_dirs(sweep)
    assert [p.name for p in jobs] == ["0_skip.tau=0.4", "1_skip.tau=0.6"]
    assert all((j / "metrics.json").is_file() for j in jobs)
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2


@pytest.mark.slow
def test_sigkill_then_resume_auto_matches_uninterrupted(tmp_path):
    """A job killed with SIGKILL mid-training and restarted with the same overrides (what a requeue does)
    ends with the same router/adapter weights and the same W&B run as one that was never interrupted."""
    common = [
        "debug=tiny",
        "trainer.max_steps=24",
        "trainer.limit_val_batches=0",
        "data.n_synthetic=200",
        "data.max_train_examples=200",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "callbacks.layer_usage.every_n_steps=100",
        "resume=auto",
    ]
    res = _cli([*common, "run_name=full"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "outputs" / "train" / "runs" / "killed"
    args = [sys.executable, "-m", "src.train", *common, "run_name=killed"]
    env = dict(os.environ, PROJECT_ROOT=str(tmp_path))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while (
        not (run / "checkpoints" / "last.ckpt").is_file() and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.1)
    time.sleep(1.0)  # a step or two past the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 1 <= step < 24, step
    wandb_id = (run / "wandb_id.txt").read_text()

    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(tmp_path / "outputs" / "train" / "runs" / "full" / "flexidepth" / "flexidepth.safetensors")
    b = load_file(run / "flexidepth" / "flexidepth.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 24
    assert (run / "wandb_id.txt").read_text() == wandb_id  # the same W&B run continued


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """2 gloo ranks x micro 2 and 1 process x micro 4 see the same global batches: same weights, same val."""
    common = [
        "debug=tiny",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "skip.alpha=0.1",
        "optim.lr=1e-2",
        "optim.warmup_ratio=0",
    ]
    one = _cli([*common, "data.micro_batch_size=4", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(
        [*common, "trainer=ddp_sim", "data.micro_batch_size=2", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(tmp_path / "one" / "flexidepth" / "flexidepth.safetensors")
    b = load_file(tmp_path / "two" / "flexidepth" / "flexidepth.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())["metrics"]
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())["metrics"]
    for key in ("val/ppl", "val/lm_loss", "val/layers_skipped_mean", "val/skip_rate"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_multirun_with_ddp_makes_one_folder_and_one_wandb_run_per_point(tmp_path):
    sweep = tmp_path / "sweep"
    res = _cli(
        [
            "+sweep=alpha",
            "debug=tiny",
            "trainer=ddp_sim",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=1",
            "data.micro_batch_size=2",
            "loss.alpha=0.001,0.1",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    names = [p.name for p in _job_dirs(sweep)]
    assert len(names) == 2 and names[0].startswith("0_") and names[1].startswith("1_"), names
    assert "loss.alpha=0.001" in names[0] and "loss.alpha=0.1" in names[1]
    assert not (tmp_path / "outputs").exists()  # no stray run folders from the rank-1 processes
    runs = sorted(tmp_path.rglob("offline-run-*"))
    assert len(runs) == 2 and {r.parent.parent for r in runs} == set(_job_dirs(sweep))
    for job in _job_dirs(sweep):
        assert json.loads((job / "metrics.json").read_text())["global_step"] == 2
        assert (job / "flexidepth" / "flexidepth.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- experiments
@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiment_runs_fast_dev_run_on_tiny_model(experiment, tmp_path):
    """Every experiment composes, validates, and one train + val batch runs with the model/data/hardware
    swapped for the tiny offline ones (the experiment's own skip/optim/gradient-checkpointing stay)."""
    from src.train import train
    from tests.test_train import compose_cfg

    header = (ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text().split("defaults:")[0].lower()
    for field in ("question", "command", "hardware", "paper"):
        assert field in header, f"{experiment}: header lacks {field}"
    pinned = yaml.safe_load((ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text()).get("skip", {})
    # Layer indices pinned for the experiment's own model are replaced by the same shape of choice on the tiny
    # model's 4 layers (layer 2 static; routed 1..3 in a hybrid, nothing else in a static-only preset);
    # test_hybrid_experiments_fit_smollm2 checks the real ones.
    tiny_layers = []
    if pinned.get("always_skip") and pinned.get("layers") == pinned["always_skip"]:
        tiny_layers = ["skip.layers=[2]", "skip.always_skip=[2]"]
    elif pinned.get("always_skip"):
        tiny_layers = ["skip.layers=1:4", "skip.always_skip=[2]", "loss.target_layers_skipped=1.5"]
    cfg = compose_cfg(
        [
            f"experiment={experiment}",
            *tiny_layers,
            "model=tiny_llama",
            "data=builtin",
            "trainer=cpu",
            "trainer.devices=1",
            "trainer.accumulate_grad_batches=1",
            "trainer.precision=32-true",
            "debug=fast_dev_run",
            "data.n_synthetic=32",
            "data.max_train_examples=32",
            "data.max_length=128",
            "data.micro_batch_size=2",
        ],
        tmp_path,
    )
    assert cfg.data.source == "builtin" and cfg.trainer.fast_dev_run
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


HYBRIDS = [e for e in group_options("experiment") if e.startswith(("smollm2_hybrid", "smollm2_static"))]


@pytest.mark.parametrize("experiment", HYBRIDS)
def test_hybrid_experiments_fit_smollm2(experiment):
    """The hybrid presets pin layer indices of the embedded SmolLM2-135M (30 layers): they pass the train
    command's checks on that model, their static layers are routed layers that may be static, and their
    budget leaves the default recipe's 2.45 routed skips on top of the static ones (none when every routed
    layer is static: nothing is left to route)."""
    from src.config.commands import TrainCommand
    from src.config.schemas import load
    from tests.test_train import compose_cfg

    cfg = load(compose_cfg([f"experiment={experiment}"]), TrainCommand)
    cfg.check()
    skip = cfg.skip.flexidepth()
    skip.validate_for(num_layers=30, hidden_size=576, intermediate_size=1536)
    skip.check_always_skip(None, 30)
    static, routed = set(skip.always_skip), set(skip.routed_layers(30))
    assert static <= routed and static
    if static == routed:
        assert cfg.loss.target_layers_skipped is None and cfg.loss.alpha == 0
    else:
        assert float(cfg.loss.target_layers_skipped) == pytest.approx(len(static) + 2.45)
    assert cfg.run_name == experiment


def test_experiment_run_scripts_exist():
    for name in (
        "paper_v1_llama3_8b",
        "released_two_stage_llama3_8b",
        "smollm2_alpha_sweep",
        "speed_vs_shortgpt_smollm2",
    ):
        script = ROOT / "experiments" / f"{name}.sh"
        assert script.is_file() and os.access(script, os.X_OK), script
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    two_stage = (ROOT / "experiments" / "released_two_stage_llama3_8b.sh").read_text()
    assert "released_stage1_llama3_8b" in two_stage and "init_from=" in two_stage
    speed = (ROOT / "experiments" / "speed_vs_shortgpt_smollm2.sh").read_text()
    # every preset is trained and timed
    assert 'experiment="$preset"' in speed and all(h in speed for h in HYBRIDS)
