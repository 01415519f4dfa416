"""Bad training settings are refused before any heavy work, naming the key: the `trainer`, `callbacks` and
`logger` nodes against their targets' own signatures (src/config/targets.py), every row of a study before its
first point trains (src/config/study.py), and a second study in a folder another study holds (src/study.py)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from src.config.study import check_rows
from src.config.targets import accepts, group_problems, trainer_problems
from src.studies.spec import StudySpec
from src.utils.errors import ConfigError
from tests.helpers.configs import CONF
from tests.test_runs import no_model_load
from tests.test_study import _study, _tree
from tests.test_train import compose_cfg

TINY = ["debug=tiny", "logger=none"]


@pytest.fixture(name="no_model_load")
def _no_model_load(monkeypatch):
    return no_model_load(monkeypatch)


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_steps=x", r"trainer\.max_steps: expected int, got str 'x'"),
        (
            "trainer.accumulate_grad_batches=1.5",
            r"trainer\.accumulate_grad_batches: expected int, got float 1\.5",
        ),
        ("trainer.max_epochs=x", r"trainer\.max_epochs: expected int \| null, got str 'x'"),
        (
            "trainer.precision=17",
            r"trainer\.precision: expected one of 64, 32, 16, .*'bf16-mixed'.* \| null, got int 17",
        ),
        (
            "trainer.enable_progress_bar=maybe",
            r"trainer\.enable_progress_bar: expected bool \| null, got str",
        ),
        ("trainer.devices=[a]", r"trainer\.devices: expected list\[int\] \| str \| int, got list \['a'\]"),
        ("trainer.accelerator=5", r"trainer\.accelerator: expected str \| Accelerator, got int 5"),
        ("+trainer.max_stpes=3", r"trainer\.max_stpes: Trainer takes no argument 'max_stpes'"),
        ("+trainer.logger=false", r"trainer\.logger is set by src\.train itself"),
        ("trainer._target_=nope.Trainer", r"trainer\._target_='nope\.Trainer' cannot be imported"),
        ("callbacks.last_checkpoint.every_n_train_steps=x",
         r"callbacks\.last_checkpoint\.every_n_train_steps: expected int \| null, got str 'x'"),
        ("+callbacks.layer_usage.every=3", r"callbacks\.layer_usage\.every: LayerUsageCallback takes no argument"),
        ("logger=csv +logger.csv.bogus=1", r"logger\.csv\.bogus: CSVLogger takes no argument 'bogus'"),
        ("logger=csv logger.csv.save_dir=null", r"logger\.csv\.save_dir: expected str \| Path, got NoneType None"),
    ],
)  # fmt: skip
def test_a_bad_trainer_setting_is_refused_before_anything_is_loaded(
    tmp_path, override, message, no_model_load
):
    from src.train import train

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^{message}"):
        train(compose_cfg([*TINY, *override.split()], run))
    assert not run.exists()


@pytest.mark.parametrize(
    "group,preset",
    [
        (g, p.stem)
        for g in ("trainer", "callbacks", "logger")
        for p in sorted((Path(CONF) / g).glob("*.yaml"))
    ],
)
def test_every_preset_passes(group, preset):
    cfg = compose_cfg(["debug=tiny", f"{group}={preset}"])
    nodes = OmegaConf.to_container(cfg[group], resolve=True)
    problems = trainer_problems(nodes) if group == "trainer" else group_problems(nodes, group)
    assert problems == []
    if group != "trainer" and preset != "none":  # the presets do hold nodes that were checked
        assert all(isinstance(n, dict) and n["_target_"] for n in nodes.values())


def test_accepts_reads_the_type_hints():
    assert accepts(int, 3) and accepts(int, True) is False and accepts(int, 3.0) is False
    assert accepts(float, 3) and accepts(float, 0.5) and accepts(float, "0.5") is False
    # Lightning's hints are typing.Optional / typing.Union; `X | Y` makes a types.UnionType: both are read
    assert accepts(typing.Optional[int], None) and accepts(int | None, "x") is False  # noqa: UP045
    assert (
        accepts(typing.Literal["bf16-mixed", 32], "bf16-mixed") and accepts(typing.Literal[32], "32") is False
    )
    assert accepts(list[int], [0, 1]) and accepts(list[int], [0, "a"]) is False
    assert accepts(Path, "x") is False and accepts(Path, {"_target_": "pathlib.Path"}) is None
    assert accepts(str | Path, 1) is False and accepts(typing.Union[int, Path], {"a": 1}) is None  # noqa: UP007


# ------------------------------------------------------------------------------ study: every row up front
def _spec(**rows) -> StudySpec:
    common = [*TINY, "trainer.max_steps=4"]
    return StudySpec(
        name="s", seeds=[1, 2], reference="full", common=common, rows={"full": [], **rows}
    ).validate()


@pytest.mark.parametrize(
    "row,message",
    [
        (["skip.bogus=1"], r"Could not override 'skip\.bogus'"),
        (["skip=nope"], r"In 'train': Could not find 'skip/nope'"),
        (["skip.adapter_rank=-3"], r"skip\.adapter_rank must be an integer >= 1, got -3"),
        (["trainer.max_steps=x"], r"trainer\.max_steps: expected int, got str 'x'"),
    ],
)
def test_a_study_row_src_train_would_refuse_stops_the_study_naming_the_row(tmp_path, row, message):
    with pytest.raises(ConfigError, match=rf"^study\.rows\.late: src\.train refuses \[.*\]: {message}"):
        check_rows(_spec(no_kv=["skip=no_kv"], late=row), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_good_rows_pass_and_the_callers_hydra_state_is_kept(tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        check_rows(_spec(no_kv=["skip=no_kv"], wide=["skip.adapter_rank=8"]), tmp_path)
        cfg = compose("train", overrides=["skip=no_adapter"])  # the caller's own Hydra is still initialised
    assert cfg.skip.adapter == "none"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_study_command_refuses_a_bad_last_row_before_training_and_leaves_its_folder(tmp_path):
    folder = tmp_path / "study"
    (folder / ".hydra").mkdir(parents=True)
    (folder / "study.json").write_text('{"points": {}}')
    before = _tree(folder)
    res = _study(folder, "study.rows.no_kv=['skip=no_kv','skip.bogus=1']")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "error: study.rows.no_kv: src.train refuses" in res.stderr and "Traceback" not in res.stderr
    assert _tree(folder) == before and not (folder / "train").exists()


@pytest.mark.slow
def test_a_second_study_in_a_folder_in_use_is_refused_and_changes_nothing(tmp_path):
    from src.utils.runs import RunLock

    folder = tmp_path / "study"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- study=tiny\n")
    (folder / "study.json").write_text('{"points": {}}')
    with RunLock(folder):  # a study running in the folder
        before = _tree(folder)
        res = _study(folder, "study.jobs=2")
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"run folder {folder} is in use by pid" in res.stderr and "Traceback" not in res.stderr
        # .hydra/ back to its bytes and nothing else changed; Hydra's job log may hold the refused start's lines
        # (a log is cut back only when no other process holds the folder: src/utils/failures.py)
        after = {k: v for k, v in _tree(folder).items() if k != "study.log"}
        assert after == before
