"""Typed settings (src/config/schemas.py, src/config/commands.py): unknown keys and wrong types are refused,
naming the key, in every entry point's config, before any model load; each config is converted once; tau has
one owner."""

from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from src.config.commands import TrainCommand
from src.config.registry import COMMANDS
from src.config.schemas import SkipSchema, load
from src.config.tools import TOOLS
from src.data.config import DataConfig
from src.eval.config import EvalConfig
from src.lit.objectives import LossConfig
from src.lit.optim import OptimConfig
from src.models.config import ModelConfig
from src.studies.spec import StudySpec
from src.utils.errors import ConfigError
from tests.helpers.configs import compose_tiny

GROUP_SCHEMAS = {"skip": SkipSchema, "loss": LossConfig, "optim": OptimConfig, "data": DataConfig}

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize(
    ("group", "yaml_file"),
    [
        ("skip", "skip/flexidepth.yaml"),
        ("loss", "loss/default.yaml"),
        ("optim", "optim/adamw.yaml"),
        ("data", "data/builtin.yaml"),
    ],
)
def test_schema_keys_are_the_yaml_keys(group, yaml_file):
    """Every key of the group's base YAML has a typed field and vice versa (no key added by the schema)."""
    keys = set(yaml.safe_load((CONF / yaml_file).read_text())) - {"defaults"}
    assert set(OmegaConf.structured(GROUP_SCHEMAS[group]).keys()) == keys


def test_every_model_yaml_key_is_a_model_field():
    fields = set(OmegaConf.structured(ModelConfig).keys())
    for path in sorted((CONF / "model").glob("*.yaml")):
        assert set(yaml.safe_load(path.read_text())) <= fields, path.name


def test_a_stored_model_entry_comes_back_typed_and_an_unknown_key_is_named():
    stored = ModelConfig(name_or_path="embedded:smollm2-135m-instruct", init_seed=3).to_dict()
    assert ModelConfig.from_node(stored, "run/history/config-000.yaml") == ModelConfig(**stored)
    assert ModelConfig.from_node({"name_or_path": "x"}, "here").dtype == "bfloat16"  # absent keys: defaults
    with pytest.raises(ConfigError, match=r"^ckpt\.ckpt: its model entry has keys .*\(revision, trust\)"):
        ModelConfig.from_node({**stored, "trust": True, "revision": "main"}, "ckpt.ckpt")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_composes_onto_its_schema_and_converts_once(command):
    """The primary config's first default is the command's schema: the composed config is typed by it (its
    keys are the schema's fields, in the schema's order) and `load` gives the typed object."""
    cfg = (
        compose_tiny(command, [])
        if command in ("train", "evaluate", "compare")
        else _compose_plain(command, [])
    )
    assert OmegaConf.get_type(cfg) is COMMANDS[command]
    assert list(cfg.keys()) == list(OmegaConf.structured(COMMANDS[command]).keys())
    if "paths" in cfg:  # src.generate and src.export write no output folder
        with open_dict(cfg):
            cfg.paths.output_dir = "/tmp/flexidepth-unused"
    settings = load(cfg, COMMANDS[command])
    assert type(settings) is COMMANDS[command]
    if command == "study":
        assert (
            isinstance(settings.study, StudySpec) and settings.study.name == "table3"
        )  # conf/study.yaml's default
    else:
        assert command in TOOLS or isinstance(settings.model, ModelConfig)


def _compose_plain(primary, overrides):
    from hydra import compose, initialize_config_dir

    model = [] if primary in (*TOOLS, "study") else ["model=tiny_llama"]  # these have no model group
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(primary, overrides=[*model, *overrides])


def test_eval_schema_keys_are_the_eval_block():
    """One eval block (conf/eval/default.yaml) for every entry point; compare's variant only changes values."""
    block = yaml.safe_load((CONF / "eval" / "default.yaml").read_text())
    assert set(OmegaConf.structured(EvalConfig).keys()) == set(block)
    assert set(OmegaConf.structured(EvalConfig).harness.keys()) == set(block["harness"])
    variant = yaml.safe_load((CONF / "eval" / "compare.yaml").read_text())
    assert variant["defaults"] == ["default", "_self_"] and set(variant) - {"defaults"} <= set(block)
    for primary in ("evaluate", "compare"):
        assert "eval" not in yaml.safe_load((CONF / f"{primary}.yaml").read_text())  # no second copy


@pytest.mark.parametrize(
    ("primary", "override", "key"),
    [
        ("train", "skip.tau=abc", "skip.tau"),
        ("train", "loss.alpha=much", "loss.alpha"),
        ("train", "optim.lr=fast", "optim.lr"),
        ("train", "data.max_length=long", "data.max_length"),
        ("train", "data.synthetic_max_digits=1.5", "data.synthetic_max_digits"),  # the data module has no
        ("train", "data.synthetic_tasks=copy", "data.synthetic_tasks"),  # type checks of its own
        ("train", "data.mixture={lee:abc}", "data.mixture.lee"),
        ("train", "data.conversation_roles=[human]", "data.conversation_roles"),
        ("train", "skip.taux=0.5", "skip.taux"),
        ("evaluate", "eval.n_per_task=many", "eval.n_per_task"),
        ("evaluate", "eval.harness.limt=3", "eval.harness.limt"),
        ("compare", "eval.batch_size=big", "eval.batch_size"),
        ("compare", "skip.layerz=1", "skip.layerz"),
    ],
)
def test_hydra_refuses_wrong_types_and_unknown_keys_naming_them(primary, override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_tiny(primary, [override])
    text = f"{err.value} {err.value.__cause__}"
    assert key.split(".")[-1] in text


@pytest.mark.parametrize(
    ("primary", "override", "message"),
    [
        (
            "train",
            "+skip.foo=1",
            r"skip\.foo",
        ),  # `+` appends past Hydra's struct check: the code check refuses
        ("train", "+loss.foo=1", r"loss\.foo"),
        ("train", "+data.foo=1", r"data\.foo"),
        ("train", "+optim.foo=1", r"optim\.foo"),
        ("evaluate", "+eval.foo=1", r"eval\.foo"),
        ("compare", "+eval.harness.foo=1", r"eval\.harness\.foo"),
        ("evaluate", "+method.foo=1", r"method\.foo"),
        ("generate", "+model.foo=1", r"model\.foo"),
        ("export", "+foo=1", r"^foo: Key 'foo' not in 'ExportCommand'"),
        ("speed", "+model.arch.foo=1", None),  # arch is an open mapping: its sizes are the model's own
    ],
)
def test_every_entry_point_check_refuses_appended_keys(primary, override, message):
    if primary in ("generate", "export", "speed"):  # no logger group
        cfg = _compose_plain(primary, [override])
        if "paths" in cfg:
            with open_dict(cfg):
                cfg.paths.output_dir = "/tmp/flexidepth-unused"
    else:
        cfg = compose_tiny(primary, [override])
    if message is None:
        assert load(cfg, COMMANDS[primary]).model.arch["foo"] == 1
        return
    with pytest.raises(ConfigError, match=message):
        settings = load(cfg, COMMANDS[primary])  # the conversion refuses unknown keys of typed nodes
        settings.validate()  # the method node: its own dataclass (build_method)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method_overrides=5", r"^method_overrides: Cannot assign int"),
        ("method_overrides=[laco]", r"^method_overrides: Cannot merge"),
        ("method_overrides={laco: 3}", r"^method_overrides\.laco: Value 3 \(int\) is incompatible"),
        ("+trained.x=5", r"^trained\.x: expected a mapping of ckpt, table, match_k32, got int 5"),
        ("+trained.x=[a]", r"^trained\.x: expected a mapping of ckpt, table, match_k32, got list"),
    ],
)
def test_compare_open_mappings_are_typed_by_a_schema(override, message):
    """The field is open for Hydra (a typed Optional[Dict] cannot take `method_overrides={...}` in OmegaConf
    2.3), typed once at the conversion (`MethodOverrides`): a mapping of mappings, or null; each `trained` entry
    a mapping (`TrainedSystem`), anything else refused naming the entry."""
    from src.config.commands import CompareCommand

    ok = compose_tiny("compare", ["method_overrides={laco: {threshold: 0.5}}"])
    assert load(ok, CompareCommand).method_overrides == {"laco": {"threshold": 0.5}}
    with pytest.raises(ConfigError, match=message):
        load(compose_tiny("compare", [override]), CompareCommand)


def test_a_typo_inside_a_group_yaml_is_refused(tmp_path):
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "typo.yaml").write_text(
        "defaults:\n  - flexidepth\n  - _self_\nrouter_reduktion: 8\n"
    )
    with pytest.raises(ConfigCompositionException) as err:
        compose_tiny("train", [f"hydra.searchpath=[file://{tmp_path}]", "skip=typo"])
    assert "router_reduktion" in f"{err.value} {err.value.__cause__}"


def test_skip_alpha_alias_still_composes_and_maps_to_loss_alpha():
    """The design-card command's `skip.alpha=0.01` composes and is translated once, at src.train's boundary,
    into loss.alpha (one-line note); past it nothing reads skip.alpha: the model is built from a
    FlexiDepthConfig, which has no alias."""
    cfg = compose_tiny("train", ["model=llama3_8b", "skip.alpha=0.01"])
    assert cfg.skip.alpha == 0.01 and cfg.model.name_or_path
    s = load(cfg, TrainCommand)
    s.validate()
    note = s.translate_skip_alpha()
    assert note == "skip.alpha is deprecated: loss.alpha is the key (taking loss.alpha=0.01)"
    assert s.loss.alpha == 0.01 and s.skip.alpha is None
    assert s.translate_skip_alpha() is None  # translated: nothing left to note
    assert not hasattr(s.skip.flexidepth(), "alpha")
    s.skip.alpha = -1.0
    with pytest.raises(ConfigError, match=r"skip\.alpha must be a number >= 0, got -1\.0"):
        s.translate_skip_alpha()


def test_every_group_option_and_experiment_composes_and_validates():
    opts = {
        g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("skip", "data", "method", "experiment")
    }
    for group, names in opts.items():
        for name in names:
            extra = ["data.source=/tmp/x.jsonl"] if (group, name) == ("data", "local") else []
            primary = "evaluate" if group == "method" else "train"  # src.train trains routed methods only
            cfg = compose_tiny(primary, [f"{group}={name}", *extra])
            assert OmegaConf.to_container(cfg.skip, resolve=True)["tau"] is not None
            if group != "experiment":  # experiments point at hub models / GPUs; their values are theirs
                load(cfg, COMMANDS[primary]).validate()


def test_train_refuses_untrained_methods_clearly(tmp_path):
    """`src.train method=early_exit` refuses in one line naming where to evaluate it, before any model or
    run folder exists."""
    from src.train import train
    from src.utils.errors import ConfigError

    cfg = compose_tiny("train", ["method=early_exit", "method.k=1"], tmp_path / "run")
    with open_dict(cfg):
        cfg.run_name = "x"
    with pytest.raises(ConfigError, match="method=early_exit has nothing to train") as err:
        train(cfg)
    assert "src.eval" in str(err.value) and "src.compare" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_tau_has_one_owner():
    """set_tau writes the shared config; every routed layer, the checkpoint metadata and AppliedMethod read it."""
    import torch

    from src.flexidepth import FlexiDepthConfig, flexi_layers, inject, set_tau
    from src.models.loader import load_base_model

    cfg = compose_tiny("train", [])
    model = load_base_model(ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))).eval()
    inject(model, FlexiDepthConfig(tau=0.5))
    set_tau(model, 0.97)
    assert [layer.tau for layer in flexi_layers(model)] == [0.97] * len(flexi_layers(model))
    assert all(layer.flexi_config is model.flexidepth.config for layer in flexi_layers(model))
    with pytest.raises(AttributeError):
        flexi_layers(model)[0].tau = 0.1  # no second writer
    with pytest.raises(ValueError, match=r"tau must be a number in \[0, 1\]"):
        set_tau(model, 1.5)
    from src.flexidepth.routes import routed_forward

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = routed_forward(model, ids, torch.ones_like(ids))
    assert not out.routes.run.any()  # fresh gates sigmoid(3) = 0.953 <= 0.97: every routed layer skipped
    set_tau(model, 0.5)
    assert routed_forward(model, ids, torch.ones_like(ids)).routes.run.all()


# every user command's module (src.study is composed the same way by its own owner's code)
COMMAND_MODULES = {
    "train": "src/train.py", "evaluate": "src/eval/__main__.py", "compare": "src/compare.py",
    "generate": "src/generate.py", "export": "src/export.py", "speed": "src/speed.py",
    "convert": "src/convert.py", "analyze": "src/analyze.py", "sweep_summary": "src/sweep_summary.py",
    "memory_planner": "src/memory_planner.py", "study": "src/study.py",
}  # fmt: skip


def test_every_command_is_one_hydra_program_with_one_schema():
    """One command-line style: every command's `main` is `hydra_command(<its config>)` (key=value, one error
    format, exit 2 for a user error), no command parses its own arguments, and every one has a schema."""
    root = CONF.parent
    assert set(COMMAND_MODULES) == set(COMMANDS)
    for command, module in COMMAND_MODULES.items():
        text = (root / module).read_text()
        assert f'@hydra_command("{command}"' in text, module
        assert "argparse" not in text and "sys.argv" not in text and "@hydra.main" not in text, module
        assert (CONF / f"{command}.yaml").read_text().count(f"- schema/command@_here_: {command}") == 1


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMAND_MODULES))
def test_every_command_refuses_an_unknown_key_in_one_line_with_status_2(command, tmp_path):
    from tests.test_data_safety import assert_user_error, cli

    module = COMMAND_MODULES[command].removesuffix(".py").removesuffix("/__main__").replace("/", ".")
    res = cli([module, "nosuchkey=1"], tmp_path)
    assert_user_error(res, "Could not override 'nosuchkey'")
    assert f"Key 'nosuchkey' not in '{COMMANDS[command].__name__}' (key: nosuchkey)" in res.stderr
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # nothing written
