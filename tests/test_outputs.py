"""Outputs are never replaced without a check (issue 35, kinds 3 and 7).

Every command that writes results (src.eval, src.speed, src.compare, src.analyze, src.export) refuses a folder
that already holds its results unless `overwrite=true`; a replace swaps the command's own set of files as one
unit and leaves every other file byte-identical; an export checks `out_dir` again at its final rename and
removes its temporary folder on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from src import export as ex
from src.config.commands import ExportCommand
from src.config.schemas import load
from src.models import export as hfx
from src.utils.errors import OutputExistsError
from src.utils.outputs import PRODUCTS, check_free, present, replacing
from tests.test_data_safety import assert_user_error, cli, tree
from tests.test_export import compose_export, trained_checkpoint
from tests.test_runs import _tiny_export

TINY_EVAL = [
    "model=tiny_llama",
    "logger=none",
    "method=random_skip",
    "eval.tasks=[copy]",
    "eval.n_per_task=1",
    "eval.max_new_tokens=2",
    "eval.ppl_max_articles=1",
    "eval.ppl_max_length=32",
]


def user_files(folder: Path) -> None:
    """Files no command writes: a user's notes, a train run's metrics, a folder of their own."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.md").write_text("my notes\n")
    (folder / "metrics.json").write_text('{"metrics": {"val/ppl": 12.5}}')
    (folder / "mine").mkdir(exist_ok=True)
    (folder / "mine" / "results.json").write_text("not the command's: one level down")


# ------------------------------------------------------------------------------------------ the rule itself
@pytest.mark.parametrize("command", sorted(PRODUCTS))
def test_an_occupied_folder_is_refused_naming_files_and_key(tmp_path, command):
    user_files(tmp_path)
    check_free(tmp_path, command, False)  # only other files: free
    name = PRODUCTS[command][-1]
    (tmp_path / name).write_text("earlier")
    before = tree(tmp_path)
    with pytest.raises(
        OutputExistsError, match=rf"already holds {command} results \({name}\).*overwrite=true"
    ):
        check_free(tmp_path, command, False)
    check_free(tmp_path, command, True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["evaluate", "compare", "speed", "analyze"])
def test_overwrite_is_typed_by_every_command_schema(command):
    """`overwrite` is a bool field of each command's schema: a value that is not one is refused while
    composing, naming the key (check_free takes the typed setting)."""
    from hydra.errors import ConfigCompositionException

    from tests.helpers.configs import CONF

    with pytest.raises(ConfigCompositionException) as err:
        if command in ("speed", "analyze"):  # no logger group
            from hydra import compose, initialize_config_dir

            with initialize_config_dir(config_dir=CONF, version_base="1.3"):
                compose(command, overrides=["overwrite=maybe"])
        else:
            from tests.helpers.configs import compose_tiny

            compose_tiny(command, ["overwrite=maybe"])
    assert "full_key: overwrite" in str(err.value.__cause__)


def test_replacing_swaps_the_whole_set_and_keeps_other_files(tmp_path):
    user_files(tmp_path)
    for name in PRODUCTS["speed"]:
        (tmp_path / name).write_text(f"old {name}")
    others = {k: v for k, v in tree(tmp_path).items() if not k.startswith(PRODUCTS["speed"])}
    with replacing(tmp_path, "speed") as moved:
        assert moved == list(PRODUCTS["speed"]) and present(tmp_path, "speed") == []
        (tmp_path / "speed.json").write_text("new")  # this run draws no figure
    assert present(tmp_path, "speed") == ["speed.json"]  # no old figure beside the new results
    assert (tmp_path / "speed.json").read_text() == "new"
    assert {k: v for k, v in tree(tmp_path).items() if k in others} == others
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".replaced")]


def test_a_failed_replace_restores_the_earlier_set(tmp_path):
    user_files(tmp_path)
    for name in ("compare.json", "curves.md"):
        (tmp_path / name).write_text(f"old {name}")
    (tmp_path / "lm_tasks").mkdir()
    (tmp_path / "lm_tasks" / "t.yaml").write_text("old task")
    before = tree(tmp_path)
    with pytest.raises(RuntimeError, match="late"), replacing(tmp_path, "compare"):
        (tmp_path / "compare.json").write_text("partial")
        (tmp_path / "ppl_vs_skipped.png").write_bytes(b"partial")
        raise RuntimeError("late failure")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------ the commands
def test_eval_refuses_an_occupied_folder_and_replaces_with_overwrite(tmp_path):
    out = tmp_path / "eval"
    res = cli(["src.eval", *TINY_EVAL, f"hydra.run.dir={out}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    user_files(out)
    (out / "ppl_vs_speedup.png").write_bytes(b"a speed figure: not evaluate's")
    first = json.loads((out / "results.json").read_text())
    (out / "task_depth.png").write_bytes(b"an old figure the new run must not leave")
    before = tree(out)
    res = cli(["src.eval", *TINY_EVAL, f"hydra.run.dir={out}"], tmp_path)
    assert_user_error(res, f"{out} already holds evaluate results (results.json,")
    assert "overwrite=true" in res.stderr and res.stderr.count("error:") == 1
    assert tree(out) == before

    res = cli(["src.eval", *TINY_EVAL, f"hydra.run.dir={out}", "overwrite=true"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    after = tree(out)
    mine = [
        k for k in before if k.split("/")[0] in ("notes.md", "metrics.json", "mine", "ppl_vs_speedup.png")
    ]
    assert {k: after.get(k) for k in mine} == {k: before[k] for k in mine}
    assert json.loads((out / "results.json").read_text())["perplexity"] == first["perplexity"]
    assert (out / "task_depth.png").read_bytes()[:4] == b"\x89PNG"  # written again, not the old bytes
    assert not [p for p in out.iterdir() if p.name.startswith(".replaced")]


@pytest.mark.parametrize("command,name", [("src.compare", "curves.json"), ("src.speed", "speed.md")])
def test_speed_and_compare_refuse_an_occupied_folder_before_loading(tmp_path, command, name):
    ckpt = _tiny_export(tmp_path / "ckpt")
    out = tmp_path / "out"
    user_files(out)
    (out / name).write_text("earlier results")
    before = tree(out)
    args = [command, "model=tiny_llama", f"hydra.run.dir={out}"]
    args += [f"ckpt_path={ckpt}", "shortgpt_k=[1]"] if command == "src.speed" else ["logger=none"]
    res = cli(args, tmp_path)
    assert_user_error(res, f"{out} already holds {command.split('.')[1]} results ({name})")
    assert tree(out) == before


def test_analyze_refuses_an_earlier_analysis_and_damaged_inputs(tmp_path):
    out = tmp_path / "eval"
    assert cli(["src.eval", *TINY_EVAL, f"hydra.run.dir={out}"], tmp_path).returncode == 0
    user_files(out)
    before = tree(out)
    res = cli(["src.analyze", f"eval_dir={out}", "n_boot=20"], tmp_path)
    assert_user_error(res, f"{out} already holds analyze results (analysis.json, analysis.md")
    assert "choose another eval_dir" in res.stderr and tree(out) == before
    res = cli(["src.analyze", f"eval_dir={out}", "n_boot=20", "overwrite=true"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    after = tree(out)
    assert {k: v for k, v in after.items() if not k.startswith("analysis")} == {
        k: v for k, v in before.items() if not k.startswith("analysis")
    }
    assert json.loads((out / "analysis.json").read_text())["n_boot"] == 20
    assert_user_error(
        cli(["src.analyze", f"eval_dir={out}", "overwrite=maybe"], tmp_path),
        "Error merging override overwrite=maybe: Value 'maybe' is not a valid bool (type str) (key: overwrite)",
    )

    damaged = {
        "results.json": (b'{"routed_layers": [2, 3', "damaged results.json"),
        "depthmap.parquet": (b"PAR1 not really", "damaged depthmap.parquet"),
    }
    for name, (data, message) in damaged.items():
        folder = tmp_path / f"damaged_{name}"
        folder.mkdir()
        for src_name in ("results.json", "depthmap.parquet"):
            (folder / src_name).write_bytes((out / src_name).read_bytes())
        (folder / name).write_bytes(data)
        res = cli(["src.analyze", f"eval_dir={folder}"], tmp_path)
        assert_user_error(res, f"{folder / name}: {message}")
        assert res.stderr.count("error:") == 1
    folder = tmp_path / "damaged_results.json"
    (folder / "results.json").write_text('{"routed_layers": "2,3"}')
    assert_user_error(
        cli(["src.analyze", f"eval_dir={folder}"], tmp_path), f"{folder / 'results.json'}: routed"
    )


# ------------------------------------------------------------------------------------------ export
@pytest.fixture(name="export_base")
def _export_base(tmp_path):
    trained_checkpoint("tiny_llama", tmp_path / "ckpt")
    return ["model=tiny_llama", f"ckpt_path={tmp_path / 'ckpt'}"]


def _during_verify(monkeypatch, action):
    """Run `action(tmp_folder)` while the export is verified (after the start's checks, before the rename)."""
    verify = ex.verify_export

    def hooked(folder, model, tokenizer):
        result = verify(folder, model, tokenizer)
        action(folder)
        return result

    monkeypatch.setattr(ex, "verify_export", hooked)


def _no_temporaries(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_keeps_a_file_put_into_out_dir_while_it_runs(tmp_path, monkeypatch, export_base, overwrite):
    out = tmp_path / "out"
    if overwrite:
        ex.run(compose_export([*export_base, f"out_dir={out}"]))
    before = tree(out) if out.exists() else {}

    def put(_folder):
        out.mkdir(exist_ok=True)
        (out / "eval_notes.txt").write_text("written while the export ran")

    _during_verify(monkeypatch, put)
    with pytest.raises(hfx.ExportError, match="nothing was replaced"):
        ex.run(compose_export([*export_base, f"out_dir={out}", f"overwrite={str(overwrite).lower()}"]))
    assert (out / "eval_notes.txt").read_text() == "written while the export ran"
    assert {k: v for k, v in tree(out).items() if k != "eval_notes.txt"} == before
    _no_temporaries(tmp_path)


def test_two_exports_into_one_new_out_dir_keep_the_first(tmp_path, monkeypatch, export_base):
    out = tmp_path / "out"
    first = {}

    def other_export_finishes(_folder):  # a second process's export lands at out_dir first
        monkeypatch.setattr(ex, "verify_export", verify)
        ex.run(compose_export([*export_base, f"out_dir={out}"]))
        first.update(tree(out))

    verify = ex.verify_export
    _during_verify(monkeypatch, other_export_finishes)
    with pytest.raises(hfx.ExportError, match="was written while this export ran"):
        ex.run(compose_export([*export_base, f"out_dir={out}"]))
    assert tree(out) == first and "model.safetensors" in first
    _no_temporaries(tmp_path)


def test_sigterm_during_an_export_leaves_no_temporary_folder(tmp_path, monkeypatch, export_base):
    _during_verify(monkeypatch, lambda _folder: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as exc:
        ex.run(compose_export([*export_base, f"out_dir={tmp_path / 'out'}"]))
    assert exc.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


@pytest.mark.parametrize(
    "text,match",
    [
        ('{"rows": [{"label": "flexidepth", "retention": 0.9', "unreadable or truncated JSON"),
        ("", "unreadable or truncated JSON"),
        ("[1, 2]", "not a compare.json of src.compare"),
        ('{"systems": []}', "not a compare.json of src.compare"),
    ],
)
def test_a_truncated_or_foreign_compare_json_is_refused(tmp_path, text, match):
    path = tmp_path / "compare.json"
    path.write_text(text)
    cfg = compose_export(
        ["model=tiny_llama", "ckpt_path=x", f"out_dir={tmp_path / 'out'}", f"compare_json={path}"]
    )
    with pytest.raises(hfx.ExportError, match=rf"compare_json='{path}': {match}"):
        load(cfg, ExportCommand).check()
    assert not (tmp_path / "out").exists()
