"""The lm-eval wrapper on edge requests: boundary-merging tokenisation, empty or over-long continuations,
falsy request parameters (max_gen_toks=0, top_p=0), lm-eval's do_sample default, sampled results that do
not depend on the batch, unsupported keywords, and parity with lm-eval's own HF model on ordinary requests."""

import pytest
import torch
import torch.nn.functional as F

from src.eval.harness import FlexiDepthLM
from src.flexidepth.generation import generate
from tests.test_harness import make_model, request

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from src.models.embedded import ensure_converted

    return AutoTokenizer.from_pretrained(ensure_converted("bfloat16"))


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer, routed=False)


@pytest.fixture(scope="module")
def routed(tokenizer):
    return make_model(tokenizer, routed=True)


def gen(context, **kwargs):
    return request("generate_until", (context, kwargs))


def direct_logp(model, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    logp = F.log_softmax(logits[len(ctx_ids) - 1 : -1], dim=-1)
    return float(logp.gather(-1, torch.tensor(cont_ids)[:, None]).sum())


def test_boundary_merge_scores_the_merged_token(tokenizer, model):
    """'hello wor' + 'ld': lm-eval's split leaves no continuation token; the wrapper scores ' world'."""
    from lm_eval.api.model import TemplateLM

    lm = FlexiDepthLM(model, tokenizer)
    assert TemplateLM._encode_pair(lm, "hello wor", "ld")[1] == []  # the reference split: empty
    ctx, cont = lm._encode_pair("hello wor", "ld")
    assert ctx == tokenizer("hello")["input_ids"] and tokenizer.decode(cont) == " world"
    ((score, greedy),) = lm.loglikelihood([request("loglikelihood", ("hello wor", "ld"))])
    assert score == pytest.approx(direct_logp(model, ctx, cont), abs=1e-4) and score < -1.0
    assert greedy is False
    # no merge: exactly lm-eval's split
    for pair in [("The quick brown", " fox"), ("Answer: ", "5"), ("x", " y z")]:
        assert lm._encode_pair(*pair) == TemplateLM._encode_pair(lm, *pair)
    # "x" + "y z" merges into "xy": lm-eval would score " z" after "x" (misaligned, not empty); the whole
    # context merged, so the wrapper conditions on the prefix token and scores "xy z"
    ctx, cont = lm._encode_pair("x", "y z")
    assert ctx == [lm.prefix_token_id] and tokenizer.decode(cont) == "xy z"
    assert tokenizer.decode(TemplateLM._encode_pair(lm, "x", "y z")[1]) == " z"


def test_empty_and_overlong_continuations_are_errors(tokenizer, model):
    lm = FlexiDepthLM(model, tokenizer, max_length=8)
    with pytest.raises(ValueError, match=r"task unit, doc 0\): the continuation '' encodes to no token"):
        lm.loglikelihood([request("loglikelihood", ("hello", ""))])
    with pytest.raises(ValueError, match="encodes to no token"):
        lm.loglikelihood([request("loglikelihood", ("", ""))])
    long = " one two three four five six seven eight nine ten"
    with pytest.raises(ValueError, match=r"continuation has \d+ tokens, more than max_length=8"):
        lm.loglikelihood([request("loglikelihood", ("Count:", long))])


def test_max_gen_toks_zero_and_aliases(tokenizer, routed):
    lm = FlexiDepthLM(routed, tokenizer, batch_size=2)
    out = lm.generate_until([gen("Once upon a time", until=[], max_gen_toks=0)] * 2)
    assert out == ["", ""] and lm.stats["unit"]["generate_until"].output_tokens == 0
    lm.reset_stats()
    three = lm.generate_until([gen("Once upon a time", until=[], max_new_tokens=3)])
    assert lm.stats["unit"]["generate_until"].output_tokens == 3
    lm.reset_stats()
    # max_gen_toks has priority over its aliases, as in lm-eval
    again = lm.generate_until([gen("Once upon a time", until=[], max_gen_toks=3, max_new_tokens=9)])
    assert again == three and lm.stats["unit"]["generate_until"].output_tokens == 3
    lm_zero = FlexiDepthLM(routed, tokenizer, max_gen_toks=0)  # the wrapper default 0 is a value too
    assert lm_zero.generate_until([gen("Once upon a time", until=[])]) == [""]


def test_sampling_parameters_as_lm_eval_reads_them(tokenizer, model):
    lm = FlexiDepthLM(model, tokenizer, batch_size=4, seed=11)
    prompt = "Once upon a time"
    greedy = lm.generate_until([gen(prompt, until=[], max_gen_toks=6)])[0]
    top0 = lm.generate_until(
        [gen(prompt, until=[], max_gen_toks=6, do_sample=True, temperature=1.0, top_p=0.0)]
    )
    assert top0 == [greedy]  # top_p = 0 keeps the top token (it was read as 1.0 before)
    # no do_sample and temperature > 0: lm-eval samples
    sampled = lm.generate_until([gen(prompt, until=[], max_gen_toks=6, temperature=0.9)])[0]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    ref = generate(model, tokenizer, ids, None, max_new_tokens=6, do_sample=True, temperature=0.9, seed=11)
    assert sampled == tokenizer.decode(ref.new_tokens[0], skip_special_tokens=True) and sampled != greedy
    # a sampled request's text does not depend on the requests batched with it
    others = [gen(p, until=[], max_gen_toks=6, temperature=0.9) for p in ("A", "Two words", "x y z w")]
    mixed = lm.generate_until([*others, gen(prompt, until=[], max_gen_toks=6, temperature=0.9)])
    assert mixed[-1] == sampled


def test_empty_generation_context_uses_the_prefix_token(tokenizer, model):
    lm = FlexiDepthLM(model, tokenizer)
    (text,) = lm.generate_until([gen("", until=[], max_gen_toks=4)])
    ref = generate(model, tokenizer, torch.tensor([[lm.prefix_token_id]]), None, max_new_tokens=4)
    assert text == tokenizer.decode(ref.new_tokens[0], skip_special_tokens=True) and text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(top_k=5), r"\{'top_k': 5\} are not supported"),
        (dict(num_beams=4), "num_beams"),
        (dict(max_gen_toks=-1), "max_gen_toks must be an integer >= 0"),
        (dict(max_gen_toks=2.5), "max_gen_toks"),
        (dict(temperature=-1.0, do_sample=True), "temperature"),
        (dict(top_p=1.5, do_sample=True), "top_p"),
        (dict(until=5), "until must be a string or a list"),
    ],
)
def test_bad_generation_kwargs_are_named(tokenizer, model, kwargs, message):
    lm = FlexiDepthLM(model, tokenizer)
    with pytest.raises(ValueError, match=r"task unit, doc 0\).*" + message):
        lm.generate_until([gen("Hi", **kwargs)])
    assert lm.generate_until([gen("Hi", until=[], max_gen_toks=1, num_beams=1, top_k=None)])[0] is not None


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size="auto"), "batch_size"),
        (dict(max_length=0), "max_length"),
        (dict(max_gen_toks=-2), "max_gen_toks"),
    ],
)
def test_constructor_refuses_degenerate_settings(tokenizer, model, kwargs, name):
    with pytest.raises(ValueError, match=name):
        FlexiDepthLM(model, tokenizer, **kwargs)


def test_run_harness_passes_max_gen_toks_zero(tokenizer, model, monkeypatch):
    import lm_eval

    from src.eval import harness_run as harness

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    monkeypatch.setattr(harness, "_task_manager", lambda *a: None)
    with pytest.raises(RuntimeError, match="stop here"):
        harness.run_harness(model, tokenizer, ["flexidepth_gen"], max_gen_toks=0)
    assert seen["gen_kwargs"] == {"max_gen_toks": 0}


def test_parity_with_lm_eval_hf_model(tokenizer, model):
    """Ordinary requests: the same numbers and texts as lm-eval's reference HF model, offline."""
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    lm = FlexiDepthLM(model, tokenizer, batch_size=3)
    pairs = [
        ("Question: What is 2 + 3?\nAnswer:", " 5"),
        ("", "Hello world"),
        ("The fox ", "jumps"),  # trailing context space moves into the continuation
        ("A longer context, so that the batch is padded on the left:", " yes, it is"),
    ]
    reqs = [request("loglikelihood", p) for p in pairs]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs), hf.loglikelihood(reqs), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    text = "The quick brown fox jumps over the lazy dog. " * 3
    roll = [request("loglikelihood_rolling", (text,))]
    assert lm.loglikelihood_rolling(roll)[0] == pytest.approx(hf.loglikelihood_rolling(roll)[0], abs=1e-3)
    gens = [
        gen("Once upon a time", until=["."], max_gen_toks=8, do_sample=False),
        gen("Q: 1 + 1 =", until=["\n"], max_gen_toks=5, do_sample=False, temperature=0.0),
    ]
    assert lm.generate_until(gens) == hf.generate_until(gens)


@pytest.mark.parametrize("value", [0, -1])
def test_eval_ppl_max_articles_zero_is_not_all(tokenizer, tmp_path, value):
    """The same kind in src.eval: eval.ppl_max_articles=0 used to mean "all 50 articles"; the eval settings'
    checks refuse it (EvalConfig.validate, run by src.eval and src.compare before anything is loaded)."""
    from src.eval.config import EvalConfig
    from src.eval.run import eval_inputs
    from src.utils.errors import ConfigError

    ev = EvalConfig(ppl_max_articles=value, ppl_max_length=64, tasks=[], n_per_task=1, seed=0)
    with pytest.raises(
        ConfigError, match=rf"^eval\.ppl_max_articles must be an integer >= 1 or null \(all\), got {value}$"
    ):
        ev.validate()
    ev.ppl_max_articles = 2
    chunks, *_ = eval_inputs(tokenizer, ev, tmp_path)
    ev.ppl_max_articles = 1
    assert 0 < len(eval_inputs(tokenizer, ev, tmp_path)[0]) < len(chunks)
