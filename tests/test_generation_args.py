"""Generation parameters and prompts at their edges (API and `python -m src.generate`): the obvious result,
or a ValueError naming the parameter raised before any model work."""

import io
import math

import pytest
import torch

from src.flexidepth import FlexiDepthConfig, inject
from src.flexidepth.generation import generate
from src.generate import run
from src.models.config import ModelConfig
from tests.conftest import tiny_model
from tests.helpers.configs import CONF

N_NEW = 5


def compose_tiny(config_name, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name, overrides=["model=tiny_llama", *overrides])


@pytest.fixture(scope="module")
def model():
    return inject(tiny_model("llama"), FlexiDepthConfig())


def _ids():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 1000, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_top_p_zero_and_tiny_keep_the_top_token(model):
    ids, mask = _ids()
    greedy = generate(model, None, ids, mask, max_new_tokens=N_NEW)
    for top_p in (0.0, 1e-12):
        for seed in (0, 1, 2):
            out = generate(
                model, None, ids, mask, max_new_tokens=N_NEW, do_sample=True, top_p=top_p, seed=seed
            )
            assert torch.equal(out.sequences, greedy.sequences)


def test_temperature_zero_samples_greedily_and_top_p_one_is_no_cut(model):
    ids, mask = _ids()
    greedy = generate(model, None, ids, mask, max_new_tokens=N_NEW)
    out = generate(model, None, ids, mask, max_new_tokens=N_NEW, do_sample=True, temperature=0, seed=5)
    assert torch.equal(out.sequences, greedy.sequences)
    a = generate(model, None, ids, mask, max_new_tokens=N_NEW, do_sample=True, top_p=1.0, seed=5)
    b = generate(model, None, ids, mask, max_new_tokens=N_NEW, do_sample=True, seed=5)
    assert torch.equal(a.sequences, b.sequences)


def test_extreme_temperatures_and_seeds(model):
    ids, mask = _ids()
    greedy = generate(model, None, ids, mask, max_new_tokens=N_NEW)
    tiny = generate(model, None, ids, mask, max_new_tokens=N_NEW, do_sample=True, temperature=1e-30, seed=1)
    assert torch.equal(tiny.sequences, greedy.sequences)  # not a NaN distribution
    huge = generate(model, None, ids, mask, max_new_tokens=N_NEW, do_sample=True, temperature=1e30, seed=1)
    assert huge.new_tokens.shape == (2, N_NEW) and bool(
        ((huge.new_tokens >= 0) & (huge.new_tokens < 1000)).all()
    )
    big_seed = generate(model, None, ids, mask, max_new_tokens=2, do_sample=True, seed=2**64 - 1)
    assert big_seed.new_tokens.shape == (2, 2)
    with pytest.raises(ValueError, match="seed"):
        generate(model, None, ids, mask, do_sample=True, seed=2**64)


def test_zero_new_tokens_and_empty_eos_list(model):
    ids, mask = _ids()
    out = generate(model, None, ids, mask, max_new_tokens=0)
    assert torch.equal(out.sequences, ids) and out.new_tokens.shape == (2, 0) and out.valid.shape == (2, 0)
    ref = generate(model, None, ids, mask, max_new_tokens=N_NEW)
    first = int(ref.new_tokens[0, 0])
    no_stop = generate(model, None, ids, mask, max_new_tokens=N_NEW, eos_token_id=[])
    assert torch.equal(no_stop.sequences, ref.sequences) and bool(no_stop.valid.all())
    stop = generate(model, None, ids, mask, max_new_tokens=N_NEW, eos_token_id=[first], pad_token_id=0)
    assert int(stop.valid[0].sum()) == 1 and stop.new_tokens[0, 1:].eq(0).all()


BAD_PARAMS = [
    ("max_new_tokens", -1),
    ("max_new_tokens", 2.5),
    ("max_new_tokens", True),
    ("do_sample", "yes"),
    ("temperature", -0.5),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_p", -0.1),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("seed", "7"),
    ("eos_token_id", -1),
    ("eos_token_id", [2, "x"]),
    ("pad_token_id", -2),
]


@pytest.mark.parametrize(("name", "value"), BAD_PARAMS)
def test_bad_parameter_is_named_before_any_model_work(model, monkeypatch, name, value):
    ids, mask = _ids()
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=name):
        generate(model, None, ids, mask, **{name: value})
    assert not calls


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "input_ids is empty"),
        (dict(input_ids=torch.ones(5, dtype=torch.long)), r"input_ids must be a \[batch"),
        (dict(input_ids=torch.ones(1, 3)), "integer token ids"),
        (dict(input_ids=torch.tensor([[5, 1000]])), r"outside the vocabulary \[0, 1000\): \[1000\]"),
        (
            dict(
                input_ids=torch.ones(2, 3, dtype=torch.long),
                attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]),
            ),
            r"prompt rows \[1\] have no real token",
        ),
        (
            dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 2, 1]])),
            "only 0",
        ),
        (
            dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0]])),
            "left pad",
        ),
    ],
)
def test_degenerate_prompts_are_refused(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, None, **kwargs)


def test_degenerate_text_prompts_are_refused(model):
    from src.models.tokenizer import load_tokenizer
    from tests.test_streamer import TINY_LLAMA

    tok = load_tokenizer(ModelConfig(**TINY_LLAMA))
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, tok, prompts=[])
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate(model, tok, prompts=["hello", ""])


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ("top_p=-1", "top_p"),
        ("top_p=2", "top_p"),
        ("temperature=-1", "temperature"),
        ("max_new_tokens=-3", "max_new_tokens"),
        ('prompt=""', "prompt"),
        ('prompt="   "', "prompt"),
        ("prompt=null", "prompt"),
        ("tau=0.5", "tau"),  # no ckpt_path
        ("tau=1.5", "tau"),
    ],
)
def test_generate_cli_refuses_bad_keys_before_loading(monkeypatch, override, name):
    import src.models.loader as loader

    monkeypatch.setattr(loader, "load_base_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = compose_tiny("generate", [override])
    with pytest.raises(ValueError, match=name):
        run(cfg, file=io.StringIO())


@pytest.mark.parametrize("override", ["max_new_tokens=1.5", "seed=abc", "chat=maybe", "top_p=high"])
def test_generate_schema_refuses_wrong_types_naming_the_key(override):
    """Wrong types are the schema's (`GenerateCommand`): refused while composing, naming the key."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_tiny("generate", [override])
    assert f"full_key: {override.split('=')[0]}" in str(err.value.__cause__)


def test_generate_cli_top_p_zero_is_greedy():
    buf = io.StringIO()
    sampled = run(
        compose_tiny("generate", ["do_sample=true", "top_p=0.0", "max_new_tokens=4", "seed=3"]), buf
    )
    greedy = run(compose_tiny("generate", ["max_new_tokens=4"]), io.StringIO())
    assert torch.equal(sampled.sequences, greedy.sequences)
    from src.config.commands import GenerateCommand
    from src.config.schemas import load

    assert load(compose_tiny("generate", ["top_p=0"]), GenerateCommand).top_p == 0.0
