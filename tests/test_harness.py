"""lm-evaluation-harness wrapper: log-likelihoods against a direct computation, stop strings, and per-task
scores and route statistics on the local tasks (tiny random llama with the embedded SmolLM2 tokenizer)."""

import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from src.eval.harness import FlexiDepthLM
from src.eval.harness_run import run_harness
from src.flexidepth import flexi_layers, inject, routed_forward, set_routing
from src.flexidepth.config import FlexiDepthConfig
from src.tasks.lm_tasks import (
    GEN_TASK,
    LOCAL_GROUP,
    LOCAL_TAG,
    LOCAL_TASKS,
    MC_TASK,
    gen_docs,
    mc_docs,
    write_local_tasks,
)
from tests.conftest import tiny_config

NUM_LAYERS = 4
ROUTED = 2  # "last_half" of 4 layers


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from src.models.embedded import ensure_converted

    return AutoTokenizer.from_pretrained(ensure_converted("bfloat16"))


def make_model(tokenizer, routed: bool):
    """The conftest tiny llama (4 layers) with the tokenizer's vocabulary; `routed`: FlexiDepth-injected with
    random routers (bias 0), so gates spread around tau = 0.5 and some tokens skip some layers."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", layers=NUM_LAYERS)
    cfg.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if routed:
        inject(model, FlexiDepthConfig(tau=0.5))
        gen = torch.Generator().manual_seed(1)
        for layer in flexi_layers(model):
            with torch.no_grad():
                layer.router.head.weight.copy_(torch.randn(layer.router.head.weight.shape, generator=gen))
                layer.router.bias.zero_()
    return model


@pytest.fixture(scope="module")
def routed_model(tokenizer):
    return make_model(tokenizer, routed=True)


@pytest.fixture(scope="module")
def plain_model(tokenizer):
    return make_model(tokenizer, routed=False)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    return write_local_tasks(tmp_path_factory.mktemp("lm_tasks"), n_test=12, n_train=4)


def request(kind: str, args: tuple, task: str = "unit") -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task, 0, 1))


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool, float]:
    """Unbatched reference: sum of log-softmax of the continuation tokens given the context, whether they are
    the greedy tokens, and the layers used summed over the input positions (all but the last token)."""
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx  # the split the wrapper uses is a clean one here
    cont = whole[len(ctx) :]
    ids = torch.tensor([whole])
    with torch.inference_mode():
        if hasattr(model, "flexidepth"):
            out = routed_forward(model, ids, torch.ones_like(ids))
            logits, layers = out.logits, float(out.routes.layers_used[0, :-1].sum())
        else:
            logits, layers = model(input_ids=ids).logits, float(NUM_LAYERS * (len(whole) - 1))
    logp = F.log_softmax(logits[0, len(ctx) - 1 : len(whole) - 1].float(), dim=-1)
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()), layers


# ---------------------------------------------------------------------------------------- local tasks
def test_local_task_data_is_deterministic_and_correct(tmp_path):
    docs = mc_docs(10, seed=3)
    assert docs == mc_docs(10, seed=3) and docs != mc_docs(10, seed=4)
    for doc in docs:
        a, op, b = doc["question"].removeprefix("What is ").rstrip("?").split()
        answer = int(a) + int(b) if op == "+" else int(a) * int(b)
        assert doc["choices"][doc["label"]] == str(answer)
        assert len(set(doc["choices"])) == 4
    assert {d["question"].split()[3] for d in docs} == {"+", "×"}
    gens = gen_docs(6, seed=3)
    assert [d["source"].split("-")[0] for d in gens] == ["addition", "repeat"] * 3
    folder = write_local_tasks(tmp_path / "a", n_test=5, n_train=2)
    again = write_local_tasks(tmp_path / "b", n_test=5, n_train=2)
    for name in ("flexidepth_mc_test.jsonl", "flexidepth_gen_train.jsonl"):
        assert (folder / "data" / name).read_text() == (again / "data" / name).read_text()
    assert len((folder / "data" / "flexidepth_mc_test.jsonl").read_text().splitlines()) == 5

    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert {*LOCAL_TASKS, LOCAL_GROUP, LOCAL_TAG} <= set(manager.all_tasks)
    task = manager.load([MC_TASK])["tasks"][MC_TASK]
    test_docs = list(task.test_docs())
    assert len(test_docs) == 5
    assert (
        test_docs[0]["question"]
        == json.loads((folder / "data" / "flexidepth_mc_test.jsonl").open().readline())["question"]
    )


# ---------------------------------------------------------------------------------------- the wrapper
@pytest.mark.parametrize("routed", [False, True], ids=["plain", "routed"])
def test_loglikelihood_matches_direct_computation(tokenizer, routed_model, plain_model, routed):
    model = routed_model if routed else plain_model
    pairs = [
        ("Question: What is 2 + 3?\nAnswer:", " 5"),
        ("The quick brown fox", " jumps over the lazy dog."),
        ("A much longer context, so that the batch needs padding on the left of the short rows:", " yes"),
        ("Hello", ","),
    ]
    # a continuation greedy decoding produces: two greedy tokens after a context, checked to re-tokenise
    ctx_ids = tokenizer("Once upon a time")["input_ids"]
    with torch.inference_mode():
        for _ in range(2):
            ids = torch.tensor([ctx_ids])
            logits = routed_forward(model, ids).logits if routed else model(input_ids=ids).logits
            ctx_ids = ctx_ids + [int(logits[0, -1].argmax())]
    greedy_text = tokenizer.decode(ctx_ids[-2:])
    pairs.append(("Once upon a time", greedy_text))
    assert tokenizer("Once upon a time" + greedy_text)["input_ids"] == ctx_ids

    lm = FlexiDepthLM(model, tokenizer, batch_size=3)
    got = lm.loglikelihood([request("loglikelihood", p) for p in pairs])
    ref_layers = 0.0
    for (context, continuation), (score, greedy) in zip(pairs, got, strict=True):
        ref_score, ref_greedy, layers = direct_loglikelihood(model, tokenizer, context, continuation)
        assert score == pytest.approx(ref_score, abs=1e-4), (context, continuation)
        assert greedy == ref_greedy
        assert score < 0
        ref_layers += layers
    assert got[-1][1] is True  # the greedy continuation
    assert not all(g for _, g in got[:-1])
    stats = lm.stats["unit"]["loglikelihood"]
    assert stats.requests == len(pairs)
    lengths = [len(tokenizer(c + x)["input_ids"]) - 1 for c, x in pairs]
    assert stats.tokens == sum(lengths)
    assert stats.layers_sum == ref_layers  # batched routes = per-sequence routes
    if routed:
        assert NUM_LAYERS - ROUTED < stats.layers_sum / stats.tokens < NUM_LAYERS
    else:
        assert stats.layers_sum == NUM_LAYERS * sum(lengths)

    # rolling log-likelihood of a short text = log-likelihood of all its tokens after the prefix token
    text = "The quick brown fox jumps over the lazy dog."
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", (text,))])
    (scored,) = lm.loglikelihood([request("loglikelihood", ("", text))])
    assert rolling == pytest.approx(scored[0], abs=1e-4)


def test_loglikelihood_truncates_long_inputs_on_the_left(tokenizer, plain_model):
    context, continuation = "one two three four five six seven eight nine ten eleven twelve", " thirteen"
    whole = tokenizer(context + continuation)["input_ids"]
    n_cont = len(whole) - len(tokenizer(context)["input_ids"])
    lm = FlexiDepthLM(plain_model, tokenizer, max_length=6)
    ((score, _),) = lm.loglikelihood([request("loglikelihood", (context, continuation))])
    ids = torch.tensor([whole[-7:-1]])  # the last max_length input tokens
    with torch.inference_mode():
        logp = F.log_softmax(plain_model(input_ids=ids).logits[0, -n_cont:].float(), dim=-1)
    assert score == pytest.approx(
        float(logp.gather(-1, torch.tensor(whole[-n_cont:])[:, None]).sum()), abs=1e-4
    )
    assert lm.stats["unit"]["loglikelihood"].tokens == 6


def test_generate_until_respects_stop_strings_and_max_gen_toks(tokenizer, routed_model):
    lm = FlexiDepthLM(routed_model, tokenizer, batch_size=2)
    prompts = ["Question: What is 2 + 3?\nAnswer:", "Once upon a time"]
    free = lm.generate_until(
        [request("generate_until", (p, {"until": [], "max_gen_toks": 12})) for p in prompts]
    )
    free_stats = lm.stats["unit"]["generate_until"]
    assert free_stats.output_tokens == 24  # random model: no EOS within 12 tokens
    # processed: the prompts, then 11 generated tokens fed back per row
    assert free_stats.tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts) + 2 * 11
    assert NUM_LAYERS - ROUTED <= free_stats.layers_sum / free_stats.tokens <= NUM_LAYERS
    # stop at a piece of text from the middle of the free continuation
    stops = []
    for text in free:
        assert len(text) > 6
        stops.append(text[len(text) // 2 : len(text) // 2 + 3])
    lm.reset_stats()
    cut = lm.generate_until(
        [
            request("generate_until", (p, {"until": [s], "max_gen_toks": 12}))
            for p, s in zip(prompts, stops, strict=True)
        ]
    )
    for text, stop, full in zip(cut, stops, free, strict=True):
        assert text == full[: full.index(stop)]
        assert stop not in text
    cut_stats = lm.stats["unit"]["generate_until"]
    assert 2 <= cut_stats.output_tokens < 24  # tokens after the stop string are not counted
    # max_gen_toks: 3 tokens, the first 3 of the free generation
    lm.reset_stats()
    short = lm.generate_until(
        [request("generate_until", (prompts[0], {"until": ["\n\n\n"], "max_gen_toks": 3}))]
    )
    assert lm.stats["unit"]["generate_until"].output_tokens == 3
    assert free[0].startswith(short[0]) and len(short[0]) < len(free[0])


# ---------------------------------------------------------------------------------------- run_harness
def check_entry(entry: dict, n: int) -> None:
    assert 0.0 <= entry["score"] <= 1.0
    assert entry["n"] == n
    assert entry["tokens"] > 0 and entry["num_layers"] == NUM_LAYERS


def test_run_harness_local_tasks_routed(tokenizer, routed_model, local_tasks):
    out = run_harness(
        routed_model,
        tokenizer,
        list(LOCAL_TASKS),
        include_path=local_tasks,
        limit=4,
        num_fewshot=1,
        max_gen_toks=6,
    )
    assert set(out) == set(LOCAL_TASKS)
    mc, gen = out[MC_TASK], out[GEN_TASK]
    assert mc["metric"] == "acc,none" and mc["output_type"] == "multiple_choice"
    assert gen["metric"] == "exact_match,strip" and gen["output_type"] == "generate_until"
    for entry in (mc, gen):
        check_entry(entry, 4)
        assert isinstance(entry["score_stderr"], float)
        assert entry["num_fewshot"] == 1 and entry["n_total"] == 12
        # random routers: some routed layers skipped, never an unrouted one
        assert NUM_LAYERS - ROUTED < entry["layers_used_mean"] < NUM_LAYERS
        assert NUM_LAYERS - ROUTED <= entry["layers_used_output_mean"] <= NUM_LAYERS
    # 4 docs x 4 choices, each scored once; generation: one request per doc, at most 6 tokens each
    assert mc["by_request_type"]["loglikelihood"]["requests"] == 16 and list(mc["by_request_type"]) == [
        "loglikelihood"
    ]
    assert gen["by_request_type"]["generate_until"]["requests"] == 4
    assert 4 <= gen["output_tokens"] <= 24


def test_run_harness_without_routing_uses_every_layer(tokenizer, routed_model, plain_model, local_tasks):
    # the group: its subtasks are reported and its stats are their sums
    set_routing(routed_model, False)
    try:
        out = run_harness(
            routed_model, tokenizer, [LOCAL_GROUP], include_path=local_tasks, limit=3, max_gen_toks=4
        )
    finally:
        set_routing(routed_model, True)
    group = out[LOCAL_GROUP]
    assert set(group["subtasks"]) == set(LOCAL_TASKS)
    assert group["score"] is None  # no aggregate metric across acc and exact_match
    assert group["n"] == 6 and group["tokens"] == sum(t["tokens"] for t in group["subtasks"].values())
    for entry in (group, *group["subtasks"].values()):
        assert entry["layers_used_mean"] == NUM_LAYERS
        assert entry["layers_used_output_mean"] == NUM_LAYERS
    # a plain (never injected) copy of the base, run through the tag: same scores and token counts
    tag = run_harness(plain_model, tokenizer, [LOCAL_TAG], include_path=local_tasks, limit=3, max_gen_toks=4)
    plain = tag[LOCAL_TAG]["subtasks"]
    assert set(plain) == set(LOCAL_TASKS)
    assert tag[LOCAL_TAG]["layers_used_mean"] == NUM_LAYERS and tag[LOCAL_TAG]["n"] == 6
    for task in LOCAL_TASKS:
        check_entry(plain[task], 3)
        assert plain[task]["score"] == group["subtasks"][task]["score"]
        assert plain[task]["metrics"] == pytest.approx(group["subtasks"][task]["metrics"])
        assert plain[task]["tokens"] == group["subtasks"][task]["tokens"]
        assert plain[task]["layers_used_mean"] == NUM_LAYERS


def test_registered_with_lm_eval(tokenizer, plain_model):
    from lm_eval.api.registry import get_model

    assert get_model("flexidepth") is FlexiDepthLM
    lm = get_model("flexidepth").create_from_arg_obj(
        {"model": plain_model, "tokenizer": tokenizer},
        {"batch_size": 2, "max_batch_size": None, "device": None},
    )
    assert lm.batch_size == 2 and lm.max_length == 256 and not lm.routed
    assert get_model("hf").__name__ == "HFLM"  # built-in names still resolve
