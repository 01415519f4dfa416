"""The method registry (src/methods/): one file per method, options checked by the method's own schema,
and a plug-in method that takes one Python file + one YAML and no edit elsewhere."""

import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from src.methods import MethodConfigError, build_method, method_class, method_names
from src.models.config import ModelConfig
from tests.helpers.configs import compose_tiny

BUILTIN = {"flexidepth", "mindskip", "shortgpt", "laco", "early_exit", "random_skip", "layer_replacement"}


def test_every_builtin_method_is_registered_with_its_trains_flag():
    assert BUILTIN <= set(method_names())
    assert {n for n in BUILTIN if method_class(n).trains} == {"flexidepth", "mindskip", "layer_replacement"}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_each_method_yaml_instantiates_its_class(name):
    cfg = compose_tiny("evaluate", [f"method={name}"])
    method = build_method(OmegaConf.to_container(cfg.method, resolve=True))
    assert type(method) is method_class(name)
    assert method.name == name
    assert str(cfg.method._target_).endswith(type(method).__name__)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"name": "early_exit", "k32": 4, "merge_size": 4},
            r"unknown key\(s\) method\.merge_size for method=early_exit",
        ),
        ({"name": "shortgpt", "k32": 4, "calibration": {"textz": 3}}, r"method\.calibration\.textz"),
        ({"name": "laco", "k": "two"}, r"method\.k: Value 'two'"),
        ({"name": "laco", "k": 2.5}, r"method\.k must be a whole number"),
        ({"name": "laco", "k32": 4, "merge_size": 1}, r"method\.merge_size must be >= 2"),
        ({"name": "random_skip", "k": -1}, r"method\.k must be a number >= 0"),
        ({"name": "shortgpt"}, r"needs method\.k or method\.k32"),
        ({"name": "nope"}, r"method\.name='nope' is not one of"),
        ({"_target_": "src.methods.laco.NoSuchClass", "name": "laco"}, r"method\._target_="),
    ],
)
def test_each_method_validates_its_own_options(options, message):
    with pytest.raises(MethodConfigError, match=message):
        build_method(options)


def test_early_exit_with_merge_size_is_refused_by_every_entry_point_check():
    from src.config.registry import COMMANDS
    from src.config.schemas import load
    from src.utils.errors import ConfigError

    for primary in ("evaluate", "train"):
        cfg = compose_tiny(primary, ["method=early_exit", "+method.merge_size=4"])
        with pytest.raises(ConfigError, match=r"method\.merge_size"):
            load(cfg, COMMANDS[primary]).validate()


def test_lightning_module_injects_what_it_is_given():
    """The module imports no baseline: it calls the injector it receives (here a recording wrapper)."""

    from src.lit.module import FlexiDepthModule
    from src.methods.mindskip import MindSkip
    from tests.helpers.configs import settings_tiny

    s = settings_tiny("train", [])
    calls = []

    def injector(model, flexi_cfg):
        calls.append(flexi_cfg.router)
        return MindSkip().inject(model, flexi_cfg)

    skip = s.skip.flexidepth()
    skip.adapter = "none"
    module = FlexiDepthModule(
        model=s.model.to_dict(), skip=skip, optim=s.optim, method="mindskip", inject_fn=injector
    )
    assert calls == ["mlp"]
    assert type(module.model.model.layers[-1]).__name__ == "MindSkipLayer"
    assert "inject_fn" not in module.hparams and module.hparams["method"] == "mindskip"
    with pytest.raises(MethodConfigError, match="nothing to train"):
        FlexiDepthModule(model=s.model.to_dict(), skip=s.skip.flexidepth(), optim=s.optim, method="shortgpt")


TOY_METHOD = '''
"""Toy plug-in method: skip every other routed layer (as static removal)."""
from dataclasses import dataclass

from src.flexidepth import FlexiDepthConfig
from src.methods import AppliedMethod, Method
from src.methods.removal import RemovalMethod, remove_layers


@dataclass
class SkipAlternate(Method):
    name: str = "skip_alternate"
    first: int = 0  # 0: skip routed layers 0, 2, 4, ...; 1: 1, 3, 5, ...

    def apply(self, model, *, tokenizer=None, ckpt=None, skip: FlexiDepthConfig | None = None):
        self.refuse_ckpt(ckpt)
        routing = skip or FlexiDepthConfig()  # the skip settings' routed layers (default: last_half)
        removed = routing.routed_layers(model.config.num_hidden_layers)[self.first :: 2]
        remove_layers(model, removed)
        return AppliedMethod(self.name, f"{self.name}_{self.first}", len(removed), removed)

    cost = RemovalMethod.cost  # a removed layer costs nothing
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """One Python file + one YAML in their own folders; registered through `_target_` + hydra.searchpath."""
    code = tmp_path / "plugins"
    code.mkdir()
    (code / "toy_skip_alternate.py").write_text(textwrap.dedent(TOY_METHOD))
    conf = tmp_path / "conf" / "method"
    conf.mkdir(parents=True)
    (conf / "skip_alternate.yaml").write_text(
        "_target_: toy_skip_alternate.SkipAlternate\nname: skip_alternate\nfirst: 1\n"
    )
    monkeypatch.syspath_prepend(str(code))
    return f"file://{tmp_path / 'conf'}"


def test_a_toy_method_is_one_file_and_one_yaml(toy_method, tmp_path):
    from src.config.commands import EvaluateCommand
    from src.config.schemas import load
    from src.eval.run import method_applies
    from src.flexidepth import flexi_layers
    from src.methods import compose_method, method_macs
    from src.models.loader import load_base_model

    cfg = compose_tiny("evaluate", [f"hydra.searchpath=[{toy_method}]", "method=skip_alternate"])
    settings = load(cfg, EvaluateCommand)
    settings.validate()
    method = build_method(settings.method)
    assert "skip_alternate" in method_names() and not method.trains and method.first == 1
    assert method_applies(settings.method, None)  # evaluation applies it without a checkpoint

    model = load_base_model(ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))).eval()
    num_layers = model.config.num_hidden_layers
    applied = method.apply(model, skip=settings.skip.flexidepth())
    routed = list(range(num_layers // 2, num_layers))  # skip.layers = last_half
    assert applied.removed == routed[1::2]
    assert sorted(layer.layer_index for layer in flexi_layers(model)) == routed[1::2]
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    macs = method_macs(model.config, applied, len(applied.removed))
    assert 0 < macs["analytic_macs_saved_frac"] < 1 and macs["macs_per_token"] < macs["macs_per_token_base"]

    # src.compare composes method configs through Hydra: the plug-in's YAML is found on the search path
    assert compose_method("skip_alternate", {"first": 0}, searchpath=[toy_method])["first"] == 0
    with pytest.raises(MethodConfigError, match=r"method\.frist"):
        build_method({**compose_method("skip_alternate", searchpath=[toy_method]), "frist": 0})
    with pytest.raises(MethodConfigError, match="no method config method/skip_alternate"):
        compose_method("skip_alternate")  # not on the default search path: nothing else lists it


def test_evaluation_folder_names_follow_the_registry():
    """Without a checkpoint, a trained method evaluates the base model (folder `base_*`); an untrained one is
    named after itself. Decided by each method's `trains`, not by a list of names."""
    from src.config.resolvers import checkpoint_run_name
    from src.methods import method_names, trains

    names = method_names()
    assert {"flexidepth", "mindskip", "shortgpt", "laco"} <= set(names)
    for name in names:
        assert checkpoint_run_name(None, name) == ("base" if trains(name) else name)
    assert checkpoint_run_name(None, None) == "base"
