"""The framework's layout rules (docs/design-notes.md, "Layers"), checked on the source with `ast`, and the
shared helpers that replaced copies: padding, the pad policy, chat prompts, checkpoint resolution, device
choice, DepthMap records and the evaluation loop (base once, then each system, scored against the base).

Layout rules: no import cycles between modules of src/ (imports inside function bodies count too, so a lazy
import cannot hide a cycle, and so do imports under `if TYPE_CHECKING:`: a type-only import is a tie); no import upward
between the layers of `LAYERS`; src/flexidepth/ imports nothing else from src/, and importing it loads no
Hydra; src/export_modeling/ imports nothing from src/ (it ships alone with an export, trust_remote_code);
no private name crosses modules; entry points do not import each other; no file over `MAX_FILE_LINES`
(src/export_modeling/modeling_flexidepth.py is exempt: it must be one self-contained file); no package over
`MAX_PACKAGE_SHARE` of src/'s lines; every entry point within `MAX_ENTRY_LINES`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
# the command-line entry points: the top layer; they import nothing from each other
ENTRY_POINTS = {
    "src.train",
    "src.eval.__main__",  # python -m src.eval
    "src.compare",
    "src.generate",
    "src.convert",
    "src.export",
    "src.speed",
    "src.analyze",
    "src.sweep_summary",
    "src.memory_planner",
    "src.study",
}
# bottom to top: a module may import from its own layer and the layers below it, never from above
LAYERS = [
    {"flexidepth", "export_modeling"},  # the method core; the export's self-contained modeling file
    {"utils"},  # errors, hardware, launch, loggers, run folders, CLI
    {"render"},  # draws plain results (dicts, records)
    {"models"},  # loading base models and tokenizers, hub access
    {"data"},  # corpora, synthetic data, the DataModule
    {"tasks"},  # task definitions and scoring
    {"methods"},  # one file per compared system, the registry
    {"lit", "callbacks"},  # training: the LightningModule, objectives, callbacks
    {"eval"},  # measuring: the evaluation loop, suites, curves, analysis, lm-eval
    {"studies"},  # many trained points x seeds: train, measure, summarise (python -m src.study)
    {"config"},  # schemas, value checks, preflight, resolvers: the entry points' boundary
]
ENTRY_LAYER = len(LAYERS)
MAX_FILE_LINES = 500
EXEMPT_FILES = {"export_modeling/modeling_flexidepth.py"}  # self-contained for trust_remote_code
MAX_PACKAGE_SHARE = 0.20
MAX_ENTRY_LINES = 200  # every entry point: entry logic only, its library lives in a package


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path, lazy: bool = True) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) of every import in a file under `root` (relative imports
    resolved); `lazy=False` leaves out imports inside function bodies. Imports under `if TYPE_CHECKING:`
    count like any other (a type-only import ties two modules as much as one that runs)."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out = []

    def visit(nodes, in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and (lazy or not in_function):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                out.append((target, [a.name for a in node.names], node.lineno))
            elif isinstance(node, ast.Import) and (lazy or not in_function):
                out.extend((a.name, [], node.lineno) for a in node.names)
            func = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for child in ast.iter_child_nodes(node):
                visit([child], in_function or func)

    visit(ast.parse(path.read_text(), str(path)).body, False)
    return out


def modules(root: Path = SRC) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """module -> the modules of src/ it imports (`from pkg import mod` counts as importing `pkg.mod`)."""
    mods = modules(root)
    graph = {}
    for name, path in mods.items():
        targets = set()
        for target, names, _ in imports(path, root):
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            if hits:
                targets.update(hits)
            elif target in mods:
                targets.add(target)
        graph[name] = targets - {name}
    return graph


def import_cycles(root: Path = SRC) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): every import cycle of src/."""
    graph = import_graph(root)
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def layer_of(module: str, root: Path = SRC) -> int:
    """The index in LAYERS of a module of src/ (entry points and top-level modules: the top layer)."""
    parts = module.split(".")
    if module in ENTRY_POINTS or len(parts) < 2 or not (root / parts[1]).is_dir():
        return ENTRY_LAYER
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i
    raise AssertionError(f"{module}: package src/{parts[1]}/ is in no layer of LAYERS (tests/test_layout.py)")


def upward_imports(root: Path = SRC) -> list[str]:
    """'a -> b' for every import of a module from a higher layer (the package root `src` itself excluded)."""
    graph = import_graph(root)
    return [
        f"{a} -> {b}"
        for a in sorted(graph)
        for b in sorted(graph[a])
        if b != "src" and layer_of(b, root) > layer_of(a, root)
    ]


def imports_outside(package: str, root: Path = SRC) -> list[str]:
    """Imports of other src/ modules by the modules of `package` (e.g. "flexidepth")."""
    graph = import_graph(root)
    prefix = f"src.{package}"
    return [
        f"{a} -> {b}"
        for a in sorted(graph)
        if a == prefix or a.startswith(prefix + ".")
        for b in sorted(graph[a])
        if not (b == prefix or b.startswith(prefix + "."))
    ]


def private_imports(root: Path = SRC) -> list[str]:
    """`from x import _name` where x is another module of src/ (a private name used across modules)."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        this = module_name(path, root)
        for target, names, line in imports(path, root):
            if not target.startswith("src") or target == this:
                continue
            bad += [
                f"{path.relative_to(root.parent)}:{line}: {target}.{n}" for n in names if n.startswith("_")
            ]
    return bad


def entry_point_imports(root: Path = SRC) -> list[str]:
    """Imports of one entry point (ENTRY_POINTS) by another: entry points are not libraries."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        this = module_name(path, root)
        if this not in ENTRY_POINTS:
            continue
        for target, names, line in imports(path, root):
            if target in ENTRY_POINTS - {this}:
                bad.append(f"{path.relative_to(root.parent)}:{line}: imports {target}")
            else:
                others = [n for n in names if f"{target}.{n}" in ENTRY_POINTS - {this}]
                bad += [f"{path.relative_to(root.parent)}:{line}: imports {target}.{n}" for n in others]
    return bad


def line_counts(root: Path = SRC) -> dict[str, int]:
    return {str(p.relative_to(root)): len(p.read_text().splitlines()) for p in sorted(root.rglob("*.py"))}


def package_shares(root: Path = SRC) -> dict[str, float]:
    """Each package's (sub-folder of src/) share of all lines of src/; top-level modules count one by one."""
    counts = line_counts(root)
    total = sum(counts.values())
    shares: dict[str, float] = {}
    for rel, n in counts.items():
        key = rel.split("/")[0]
        shares[key] = shares.get(key, 0.0) + n / total
    return shares


# ---------------------------------------------------------------------------------------- the rules
def test_no_import_cycles():
    assert import_cycles() == []


def test_no_upward_imports_between_layers():
    assert upward_imports() == []


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set().union(*LAYERS)


def test_the_method_core_imports_nothing_else_from_src():
    assert imports_outside("flexidepth") == []
    assert imports_outside("export_modeling") == []


def test_the_core_keeps_only_its_atomic_byte_writer():
    """src/flexidepth/files.py is the checkpoint I/O's atomic byte writer; text, appended lines and figures are
    the framework's (src/utils/files.py), and nothing in the core draws or imports a plotting library."""
    import src.flexidepth.files as core
    import src.utils.files as framework

    public = {
        n
        for n, v in vars(core).items()
        if callable(v) and not n.startswith("_") and v.__module__ == core.__name__
    }
    assert public == {"atomic_open", "atomic_write_bytes", "default_file_mode"}
    assert {"atomic_write_text", "append_text", "atomic_save_figure"} <= set(vars(framework))
    for path in (SRC / "flexidepth").rglob("*.py"):
        text = path.read_text()
        assert "matplotlib" not in text and "savefig" not in text, path


def test_importing_the_method_core_loads_no_hydra():
    code = "import src.flexidepth, sys; assert 'hydra' not in sys.modules, sorted(m for m in sys.modules if 'hydra' in m)"
    out = subprocess.run([sys.executable, "-c", code], cwd=SRC.parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_no_private_name_is_imported_across_modules():
    assert private_imports() == []


def test_no_entry_point_imports_another():
    assert entry_point_imports() == []


def test_file_sizes():
    big = {rel: n for rel, n in line_counts().items() if n > MAX_FILE_LINES and rel not in EXEMPT_FILES}
    assert big == {}


def test_no_package_holds_a_fifth_of_src():
    shares = package_shares()
    assert max(shares.values()) < MAX_PACKAGE_SHARE, sorted(shares.items(), key=lambda kv: -kv[1])[:3]


def test_entry_points_are_short():
    counts = line_counts()
    long = {}
    for name in ENTRY_POINTS:
        rel = name.removeprefix("src.").replace(".", "/") + ".py"
        if counts[rel] > MAX_ENTRY_LINES:
            long[rel] = counts[rel]
    assert long == {}


def test_the_import_scans_catch_what_they_forbid(tmp_path):
    """The scans can fail: a planted cycle (through a lazy import), an upward import, a core module that
    imports the framework, a private import across modules and entry points importing each other are
    found, a cycle through a TYPE_CHECKING import too; a module's own private names are not."""
    root = tmp_path / "src"
    for pkg in ("eval", "flexidepth", "utils"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "eval" / "run.py").write_text("from ..utils import loggers\nfrom .tasks import _Pool\n")
    (root / "eval" / "tasks.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .run import X\n_Pool = 1\n"
    )
    (root / "eval" / "__main__.py").write_text("from .run import main\n")
    (root / "utils" / "loggers.py").write_text("def log():\n    from ..eval import run\n")
    (root / "flexidepth" / "core.py").write_text("from ..utils import loggers\n")
    (root / "compare.py").write_text(
        "from .train import build\nfrom .compare import _own\nfrom . import generate\n"
    )
    (root / "generate.py").write_text("import src.train\n")
    (root / "train.py").write_text("")
    assert private_imports(root) == ["src/eval/run.py:2: src.eval.tasks._Pool"]
    assert entry_point_imports(root) == [
        "src/compare.py:1: imports src.train",
        "src/compare.py:3: imports src.generate",
        "src/generate.py:1: imports src.train",
    ]
    assert import_cycles(root) == [["src.eval.run", "src.eval.tasks", "src.utils.loggers"]]
    assert upward_imports(root) == [
        "src.flexidepth.core -> src.utils.loggers",
        "src.utils.loggers -> src.eval.run",
    ]
    assert imports_outside("flexidepth", root) == ["src.flexidepth.core -> src.utils.loggers"]
    assert layer_of("src.eval.__main__", root) == ENTRY_LAYER and layer_of("src.compare", root) == ENTRY_LAYER


# ---------------------------------------------------------------------------------------- padding
def test_pad_batch_right_and_left():
    from src.data.batching import pad_batch

    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=9, side="left", width=4)
    assert ids.tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    ids, mask = pad_batch([[1], []], pad_id=3)
    assert ids.tolist() == [[1], [3]] and mask.tolist() == [[1], [0]]


@pytest.mark.parametrize(
    "args, match",
    [(([], 0), "at least one"), (([[1]], 0, "middle"), "side"), (([[1, 2]], 0, "right", 1), "shorter")],
)
def test_pad_batch_refuses(args, match):
    from src.data.batching import pad_batch

    with pytest.raises(ValueError, match=match):
        pad_batch(*args)


def test_collate_pads_labels_with_ignore_index():
    from src.data.sampler import collate
    from src.data.sft import IGNORE_INDEX

    batch = collate([{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3], "labels": [3]}], 0, 4)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2] + [IGNORE_INDEX] * 2, [3] + [IGNORE_INDEX] * 3]


# ---------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize(
    "pad, eos, expected", [(7, 2, 7), (None, 2, 2), (None, [4, 5], 4), (None, None, 0), (0, 2, 0)]
)
def test_pad_token_id_policy(pad, eos, expected):
    from src.models.tokenizer import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


def test_chat_prompt_with_and_without_a_template():
    from src.models.tokenizer import chat_prompt

    class Templated:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert chat_prompt(Templated(), "hi") == "<user>hi</user><assistant>"
    assert chat_prompt(SimpleNamespace(chat_template=None), "hi") == "hi\n"


# ---------------------------------------------------------------------------------------- checkpoints, device
def test_resolve_checkpoint(tmp_path):
    from src.flexidepth.checkpoint import CONFIG, checkpoint_folder, resolve_checkpoint

    for empty in (None, "", "null"):
        assert resolve_checkpoint(empty) is None
    run = tmp_path / "run"
    (run / "flexidepth").mkdir(parents=True)
    (run / "flexidepth" / CONFIG).write_text("{}")
    assert resolve_checkpoint(run) == run / "flexidepth"
    assert resolve_checkpoint(str(run / "flexidepth")) == run / "flexidepth"
    assert checkpoint_folder(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="neither it nor its flexidepth/"):
        resolve_checkpoint(tmp_path)


def test_resolve_device():
    from src.utils.hardware import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_routing_active_on_a_plain_model():
    from src.flexidepth import is_injected, routing_active

    plain = torch.nn.Linear(2, 2)
    assert not is_injected(plain) and not routing_active(plain)


# ---------------------------------------------------------------------------------------- DepthMap records
class CharTokenizer:
    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]

    def decode(self, ids):
        return "".join(chr(96 + i) for i in ids)


def test_token_records_from_lists_and_tensors():
    from src.eval.suite import token_records

    ex = SimpleNamespace(task="copy", uid="copy-0")
    recs = token_records(
        CharTokenizer(), "sys", ex, "generated", [1, 2], [3.0, 2.6], torch.tensor([[0.5], [0.25]]),
        torch.tensor([[True], [False]]), offset=4,
    )  # fmt: skip
    assert [r["position"] for r in recs] == [4, 5]
    assert [r["layers_used"] for r in recs] == [3, 3]
    assert recs[1] == {
        "model": "sys", "task": "copy", "example_id": "copy-0", "segment": "generated", "position": 5,
        "token_id": 2, "token": "t2", "text": "b", "layers_used": 3, "gates": [0.25], "run": [False],
        "base_entropy": None, "base_loss": None,  # filled later by add_base_stats (src/eval/uncertainty.py)
    }  # fmt: skip
    plain = token_records(CharTokenizer(), "base", ex, "prompt", [3], [4])
    assert plain[0]["gates"] == [] and plain[0]["run"] == [] and plain[0]["position"] == 0


# ---------------------------------------------------------------------------------------- the loop
def test_evaluate_against_base_runs_base_once_then_each_system(monkeypatch):
    """Base first (once), each system on a fresh model, retention and MACs against the base's scores."""
    import src.eval.run as R

    calls = []

    def fake_system(model, tokenizer, label, chunks, examples, ev, harness_tasks, include):
        calls.append((label, model.name))
        score = {"base": 1.0}.get(label, 0.5)
        summary = {
            "tasks": {"copy": {"score": score}},
            "example_scores": {"copy": {"copy-0": score, "copy-1": score}},
            "layers": {
                "layers_skipped_scored": 0.0 if label == "base" else 2.0,
                "layers_skipped_generated": None,
            },
        }
        return summary, [{"label": label}], [{"model": label}]

    monkeypatch.setattr(R, "evaluate_system", fake_system)
    monkeypatch.setattr(R, "method_macs", lambda config, applied, skipped: {"skipped": skipped})
    models = iter(["fresh1", "fresh2"])

    def apply_as(name):
        def apply(model):
            model.name += "+" + name
            return SimpleNamespace(label=name)

        return apply

    ev = SimpleNamespace(seed=0)
    model = SimpleNamespace(name="base", config=None)
    out = list(
        R.evaluate_against_base(
            model, None, ev, ([], [], [], None), [("a", apply_as("A")), (None, apply_as("B"))],
            fresh_model=lambda: SimpleNamespace(name=next(models), config=None),
        )
    )  # fmt: skip
    assert calls == [("base", "base"), ("a", "fresh1+A"), ("B", "fresh2+B")]
    assert [r.label for r in out] == ["base", "a", "B"]
    assert out[0].retention is None and out[0].flops == {} and out[0].applied is None
    assert out[1].retention["retention"] == pytest.approx(0.5)
    assert out[2].flops == {"scored": {"skipped": 2.0}}
    assert out[1].records == [{"model": "a"}]


def test_evaluate_against_base_applies_in_place_without_fresh_model(monkeypatch):
    import src.eval.run as R

    seen = []

    def fake_system(model, tokenizer, label, *rest):
        seen.append(model.name)
        summary = {"tasks": {}, "layers": {"layers_skipped_scored": 1.0, "layers_skipped_generated": 1.5}}
        return summary, [], []

    monkeypatch.setattr(R, "evaluate_system", fake_system)
    monkeypatch.setattr(R, "method_macs", lambda config, applied, skipped: skipped)

    def apply(model):
        model.name = "changed"
        return SimpleNamespace(label="sys")

    model = SimpleNamespace(name="base", config=None)
    out = list(
        R.evaluate_against_base(model, None, SimpleNamespace(seed=1), ([], [], [], None), [(None, apply)])
    )
    assert seen == ["base", "changed"] and model.name == "changed"
    assert out[1].flops == {"scored": 1.0, "generated": 1.5}


# ---------------------------------------------------------------------------------------- reports
def compare_results() -> dict:
    def row(label, table, ppl, score, retention, ci=None):
        return {
            "label": label, "method": label, "table": table, "k_target": None if label == "base" else 4.0,
            "removed": [], "layers_skipped_scored": 0.0 if label == "base" else 4.0,
            "layers_skipped_generated": None, "ppl": ppl, "scores": {"cloze": score},
            "scores_ci": {"cloze": [score - 0.1, score + 0.1]},
            "layers_used_by_task": {"cloze": {"prompt": 30.0, "generated": 29.5}},
            "retention": retention, "retention_ci": ci, "macs_saved_frac": 0.0 if label == "base" else 0.125,
        }  # fmt: skip

    return {
        "model": "m",
        "num_layers": 30,
        "settings": {"n_per_task": 2, "ppl_max_articles": None, "max_new_tokens": 8},
        "ablation_reference": "fd",
        "rows": [
            row("base", "main", 10.0, 0.5, 1.0),
            row("fd", "main", 11.0, 0.4, 0.8, [0.7, 0.9]),
            row("no_adapter", "ablation", 12.0, 0.3, 0.6),
        ],
    }


def test_compare_markdown_tables():
    from src.render.report import compare_markdown

    md = compare_markdown(compare_results())
    assert md.startswith("# Comparison on `m` (30 layers)\n")
    assert "| fd | 4.00 | 4.00 | - | 12.5% | 11.0 | 0.40 [0.30, 0.50] | 0.80 [0.70, 0.90] |" in md
    ablation = md.split("## Ablations (paper Table 3)")[1].split("## Mean layers used")[0]
    assert "| fd |" in ablation and "| no_adapter |" in ablation and "| base |" not in ablation
    assert "| base | 30.0 / 29.5 |" in md


def test_compare_scalars_and_table():
    from src.render.report import compare_scalars, compare_table

    res = compare_results()
    scalars = compare_scalars(res)
    assert (
        scalars["compare/fd/macs_saved_frac"] == 0.125
        and "compare/base/layers_skipped_generated" not in scalars
    )
    cols, data = compare_table(res)
    assert cols == ["system", "table", "k", "skipped", "ppl", "cloze", "retention", "macs_saved"]
    assert data[1] == ["fd", "main", 4.0, 4.0, 11.0, 0.4, 0.8, 0.125]
    json.dumps(data)  # plain values only
