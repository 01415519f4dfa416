"""`python -m src.speed` (src/speed.py) and really pruned static baselines (`prune_layers`)."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from src.models.config import ModelConfig
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _ids(batch=2, seq=12, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def test_pruned_model_equals_identity_removal_and_hf_generate(family):
    """Deleting layers gives the logits and the cached generation of identity-skipping them (remove_layers),
    with a KV cache that holds only the kept layers; HF generate on the pruned model gives the same tokens."""
    from transformers import DynamicCache

    from src.eval.speed import shared_copy
    from src.flexidepth.generation import generate
    from src.methods.removal import prune_layers, remove_layers

    base = tiny_model(family, layers=6)
    removed = [1, 4]
    pruned = prune_layers(shared_copy(base), removed)
    identity = remove_layers(copy.deepcopy(base), removed)
    assert len(pruned.model.layers) == 4 and pruned.config.num_hidden_layers == 4
    assert base.config.num_hidden_layers == 6 and len(base.model.layers) == 6  # the original is untouched
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2, 3]
    assert pruned.model.layers[0].self_attn.q_proj.weight is base.model.layers[0].self_attn.q_proj.weight
    ids = _ids()
    with torch.no_grad():
        a = pruned(input_ids=ids).logits
        b = identity(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, base(input_ids=ids).logits, atol=1e-3)  # removal did change the model

    out_p = generate(pruned, None, ids, max_new_tokens=6, return_logits=True)
    out_i = generate(identity, None, ids, max_new_tokens=6, return_logits=True)
    assert torch.equal(out_p.new_tokens, out_i.new_tokens)
    torch.testing.assert_close(out_p.logits, out_i.logits, atol=1e-4, rtol=1e-4)
    hf = pruned.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(hf[:, ids.shape[1] :], out_p.new_tokens)
    cache = DynamicCache(config=pruned.config)
    with torch.no_grad():
        pruned(input_ids=ids, cache=cache, use_cache=True)
    assert len(cache.layers) == 4


def test_prune_layers_refuses_bad_indices():
    from src.flexidepth import FlexiDepthConfig, inject
    from src.methods.removal import prune_layers

    with pytest.raises(ValueError, match="out of range"):
        prune_layers(tiny_model(layers=4), [4])
    with pytest.raises(ValueError, match="duplicate"):
        prune_layers(tiny_model(layers=4), [1, 1])
    with pytest.raises(ValueError, match="all 4"):
        prune_layers(tiny_model(layers=4), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="plain model"):
        prune_layers(inject(tiny_model(layers=4), FlexiDepthConfig()), [0])
    m = tiny_model(layers=4)
    assert prune_layers(m, []) is m and len(m.model.layers) == 4


def test_interleaved_rotates_and_medians():
    from src.eval.speed_timing import _median, interleaved

    calls = []
    fns = {n: (lambda n=n: calls.append(n) or (1.0, 0.5)) for n in "abc"}
    res = interleaved(fns, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert res["a"] == {"wall": [1.0] * 3, "cpu": [0.5] * 3}
    assert _median([3.0, 1.0, 2.0]) == 2.0 and _median([1.0, 2.0]) == 1.5


def test_lockstep_alternates_steps_and_sums_per_round():
    """Step t of every system runs before step t + 1 of any, each system once per step, in an order drawn
    afresh per step (seeded: the same seed gives the same order; no system always follows the same one);
    iterators are made per round and unit; per-round sums; warm-up rounds are not recorded."""
    from src.eval.speed_timing import lockstep, paired_speedup

    names = ["a", "b", "c", "d"]
    steps_of = {"a": 3, "b": 2, "c": 3, "d": 3}  # systems may have different step counts: b stops early

    def run(seed):
        calls, made = [], []

        def unit(name):
            def make(u):
                made.append((name, u))

                def gen():
                    for t in range(steps_of[name]):
                        calls.append((name, u, t))
                        yield 1.0 + names.index(name), 0.5

                return gen()

            return make

        res = lockstep({n: unit(n) for n in names}, n_units=2, rounds=2, warmup=1, seed=seed)
        return res, calls, made

    res, calls, made = run(seed=0)
    assert made == [(n, u) for _ in range(3) for u in range(2) for n in names]
    per_unit = sum(steps_of.values())  # 11 steps per unit
    assert len(calls) == 3 * 2 * per_unit
    orders = []
    for k in range(6):  # (round, unit) blocks
        block = calls[k * per_unit : (k + 1) * per_unit]
        steps = [t for _, _, t in block]
        assert steps == sorted(steps)  # every system's step t before any system's step t + 1
        for t in range(3):
            here = [n for n, _, tt in block if tt == t]
            assert sorted(here) == sorted(n for n in names if steps_of[n] > t)  # each system once per step
            orders.append(tuple(here))
    assert len(set(orders)) > 3  # the order changes from step to step
    followers = {tuple(o[i : i + 2]) for o in orders for i in range(len(o) - 1)}
    assert ("a", "b") in followers and ("c", "b") in followers  # b follows different systems
    assert run(seed=0)[1] == calls and run(seed=1)[1] != calls  # seeded
    assert res["a"] == {"wall": [6.0, 6.0], "cpu": [3.0, 3.0]}  # 2 units x 3 steps x 1.0 s
    assert res["b"] == {"wall": [8.0, 8.0], "cpu": [2.0, 2.0]}  # 2 units x 2 steps x 2.0 s
    assert paired_speedup([2.0, 4.0, 3.0], [1.0, 1.0, 3.0]) == 2.0  # median of 2, 4, 1
    with pytest.raises(ValueError):
        paired_speedup([1.0], [1.0, 2.0])


def test_lockstep_decode_of_systems_sharing_a_model_equals_each_alone(tiny_ckpt):
    """Two taus of one checkpoint (one model; `prepare` sets tau before each step) advanced in lockstep make
    exactly the routes and tokens each makes when decoded alone: alternation changes timing, not work."""
    from omegaconf import OmegaConf

    from src.eval.speed_timing import DecodeSteps, decode_timed, lockstep
    from src.flexidepth import load_flexidepth, set_tau
    from src.models.loader import load_base_model

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model_cfg = OmegaConf.to_container(
            compose("speed", overrides=["model=tiny_llama"]).model, resolve=True
        )
    model = load_base_model(ModelConfig(**model_cfg)).eval()
    load_flexidepth(model, tiny_ckpt)
    torch.manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (1, 8)) for _ in range(2)]
    alone, together = {}, {0.2: [], 0.8: []}
    for tau in (0.2, 0.8):
        alone[tau] = []
        for ids in prompts:
            set_tau(model, tau)
            decode_timed(model, ids, 5, alone[tau])
    made = {}

    def units(tau):
        def make(u):
            it = DecodeSteps(model, prompts[u], 5, together[tau], prepare=lambda: set_tau(model, tau))
            made.setdefault(tau, []).append(it)
            return it

        return make

    res = lockstep({"lo": units(0.2), "hi": units(0.8)}, n_units=2, rounds=1, warmup=0)
    assert len(res["lo"]["wall"]) == 1 and res["lo"]["wall"][0] > 0
    for tau in (0.2, 0.8):
        assert torch.equal(torch.cat(together[tau]), torch.cat(alone[tau]))
    lo, hi = torch.cat(alone[0.2]), torch.cat(alone[0.8])
    assert not torch.equal(lo, hi)  # the two thresholds route differently: the check can fail
    assert [it.step for it in made[0.2]] == [5, 5]


def _speed_cfg(tmp_path, ckpt, extra=()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "speed",
            overrides=[
                "model=tiny_llama",
                f"ckpt_path={ckpt}",
                "taus=[0.2,0.5,0.8]",
                "shortgpt_k=[1,2]",
                "calibration_texts=2",
                "prompts=2",
                "prompt_length=8",
                "new_tokens=3",
                "batch=3",
                "prefill_length=16",
                "rounds=2",
                "warmup=1",
                "heldout=[lee,python_docs]",
                "ppl_max_tokens=64",
                "ppl_max_length=32",
                *extra,
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    return cfg


def check_speed(cfg):
    """src.speed's conversion and checks of a composed config (src/speed.py); returns the SpeedCommand."""
    from src.config.commands import SpeedCommand
    from src.config.schemas import load

    s = load(cfg, SpeedCommand)
    s.check()
    return s


def speed(cfg):
    """src.speed's measurement of a composed config as its entry runs it: converted and checked once, then
    `run_speed` with the typed settings."""
    from src.eval.speed import run_speed

    s = check_speed(cfg)
    return run_speed(s, Path(s.paths.output_dir))


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A FlexiDepth checkpoint on conf/model/tiny_llama.yaml with routers whose gates spread over (0, 1)."""
    from omegaconf import OmegaConf

    from src.flexidepth import FlexiDepthConfig, flexi_layers, inject, save_flexidepth
    from src.models.loader import load_base_model

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model_cfg = OmegaConf.to_container(
            compose("speed", overrides=["model=tiny_llama"]).model, resolve=True
        )
    model = inject(load_base_model(ModelConfig(**model_cfg)), FlexiDepthConfig(tau=0.5))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in flexi_layers(model):
            layer.router.bias.fill_(0.0)
            torch.nn.init.normal_(layer.router.head.weight, std=2.0)
    save_flexidepth(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_speed_end_to_end(tmp_path, tiny_ckpt):
    cfg = _speed_cfg(tmp_path, tiny_ckpt, ["per_set_speed=true"])
    res = speed(cfg)
    out = tmp_path / "out"
    for name in ("speed.json", "speed.md", "ppl_vs_speedup.png"):
        assert (out / name).stat().st_size > 0, name
    systems = res["systems"]
    assert list(systems) == [
        "base",
        "flexidepth@0.2",
        "flexidepth@0.5",
        "flexidepth@0.8",
        "shortgpt_k1",
        "shortgpt_k2",
    ]
    assert res["modes"] == [
        "decode_b1",
        "decode_b1@lee",
        "decode_b1@python_docs",
        "text_b1@lee",
        "text_b1@python_docs",
        "decode_b3",
        "prefill",
    ]
    for label, s in systems.items():
        for mode in res["modes"]:
            r = s["speed"][mode]
            assert len(r["wall_s"]) == 2 and all(w > 0 for w in r["wall_s"])
            assert math.isfinite(r["speedup_wall"]) and r["speedup_wall"] > 0, (label, mode)
            assert math.isfinite(r["speedup_cpu"]) and r["tokens_per_s"] > 0
        for name in ("lee", "python_docs"):
            assert math.isfinite(s["ppl"][name]["ppl"]) and s["ppl"][name]["ppl"] > 1
    assert systems["base"]["speed"]["decode_b1"]["speedup_wall"] == 1.0
    assert set(systems["base"]["flop_ideal"].values()) == {1.0}
    for k in (1, 2):
        s = systems[f"shortgpt_k{k}"]
        assert len(s["removed"]) == k and set(s["speed"]["layers_skipped"].values()) == {k}
        assert s["ppl"]["lee"]["layers_skipped"] == pytest.approx(k)
        assert min(s["flop_ideal"].values()) > 1
    # a higher threshold skips at least as many layers (same router, same text)
    sk = [systems[f"flexidepth@{t}"]["speed"]["layers_skipped"]["decode_b1"] for t in ("0.2", "0.5", "0.8")]
    assert sk == sorted(sk) and sk[-1] > sk[0]
    # (text, greedy) x (wall, cpu) x 2 sets x 2 ShortGPT points
    assert len(res["equal_speedup"]) == 2 * 2 * 2 * 2
    assert {r["mode"] for r in res["equal_speedup"]} == {
        f"{m}@{n}" for m in ("text_b1", "decode_b1") for n in ("lee", "python_docs")
    }
    for r in res["equal_speedup"]:
        assert r["mode"].endswith(f"@{r['set']}")  # each set compared at the speed measured on its own tokens
        curve = [
            systems[f"flexidepth@{t}"]["speed"][r["mode"]][f"speedup_{r['basis']}"]
            for t in ("0.2", "0.5", "0.8")
        ]
        assert r["speedup"] == systems[r["baseline"]]["speed"][r["mode"]][f"speedup_{r['basis']}"]
        inside = min(curve) <= r["speedup"] <= max(curve)
        assert (r["flexidepth_ppl"] is not None) == inside
    ref = res["loop_vs_hf"]  # our loop vs HF generate on the base model, both timed
    assert ref["ours_s"] > 0 and ref["hf_s"] > 0
    assert ref["hf_over_ours"] == pytest.approx(ref["hf_s"] / ref["ours_s"])
    saved = json.loads((out / "speed.json").read_text())
    assert saved["machine"]["threads"] == 1 and "cpu_flags" in saved["machine"]
    for label, s in systems.items():  # FLOP-ideal per batch-1 mode at that mode's layers skipped
        assert set(s["flop_ideal"]) == {m for m in res["modes"] if "_b1" in m}
        if s["kind"] == "flexidepth":
            for mode, v in s["speed"]["layers_skipped"].items():
                assert (s["flop_ideal"][mode] > 1.0) == (v > 0)
    md = (out / "speed.md").read_text()
    assert "| shortgpt_k2 |" in md and "At equal measured decode speedup" in md
    assert "set's text" in md and "own prompts" in md and "against its FLOP-ideal" in md
    assert "HF / ours" in md


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("taus=[]", "taus"),
        ("taus=[1.5]", "taus"),
        ("shortgpt_k=[0]", "shortgpt_k"),
        ("heldout=[nope]", "heldout"),
        ("prompts=0", "prompts"),
        ("ckpt_path=/nonexistent/run", "ckpt_path"),
        ("always_run_max_skip=1.0", "always_run_max_skip"),
        ("shortgpt_k=[4]", "shortgpt_k: \\[4\\] would delete every layer of a 4-layer model"),
    ],
)
def test_speed_refuses_bad_settings(tmp_path, tiny_ckpt, override, match):
    """Every bad setting is a user error (one message naming the key, no traceback) raised by the command's
    checks (`SpeedCommand.check`), before any model is loaded."""
    from src.utils.errors import UserError

    cfg = _speed_cfg(tmp_path, tiny_ckpt, [override])
    with pytest.raises(UserError, match=match):
        check_speed(cfg)


@pytest.mark.parametrize(
    "override",
    ["always_run_max_skip=true", "taus=0.5", "prompts=abc", "per_set_speed=maybe", "shortgpt_k=[1.5]"],
)
def test_speed_schema_refuses_wrong_types_naming_the_key(tmp_path, tiny_ckpt, override):
    """Wrong types are the schema's (`SpeedCommand`): Hydra refuses them while composing, naming the key."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        _speed_cfg(tmp_path, tiny_ckpt, [override])
    assert f"full_key: {override.split('=')[0]}" in str(err.value.__cause__)


def test_speed_only_without_perplexity(tmp_path, tiny_ckpt):
    """ppl_max_tokens=0, batch=0, prefill_length=0: batch-1 decode only; no figure, no ppl sections."""
    res = speed(
        _speed_cfg(tmp_path, tiny_ckpt, ["ppl_max_tokens=0", "batch=0", "prefill_length=0", "shortgpt_k=[]"])
    )
    assert res["modes"] == ["decode_b1", "text_b1@lee", "text_b1@python_docs"]
    assert res["heldout"] == [] and res["equal_speedup"] == []
    assert list(res["systems"]) == ["base", "flexidepth@0.2", "flexidepth@0.5", "flexidepth@0.8"]
    md = (tmp_path / "out" / "speed.md").read_text()
    assert "Held-out perplexity" not in md and not (tmp_path / "out" / "ppl_vs_speedup.png").exists()


def test_text_decode_routes_equal_full_forward(tiny_ckpt):
    """Teacher-forced decode (`decode_timed(forced=...)`) makes the same routing decisions, token for token,
    as one full forward over the same text: its speed is measured on the tokens the perplexity scores."""
    from omegaconf import OmegaConf

    from src.eval.speed_timing import decode_timed
    from src.flexidepth import load_flexidepth, set_tau
    from src.models.loader import load_base_model

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model_cfg = OmegaConf.to_container(
            compose("speed", overrides=["model=tiny_llama"]).model, resolve=True
        )
    model = load_base_model(ModelConfig(**model_cfg)).eval()
    load_flexidepth(model, tiny_ckpt)
    set_tau(model, 0.5)
    torch.manual_seed(3)
    text = torch.randint(0, model.config.vocab_size, (2, 14))
    prompt, forced = text[:, :8], text[:, 8:]
    routes: list[torch.Tensor] = []
    wall, cpu = decode_timed(model, prompt, 6, routes, forced)
    assert wall > 0 and cpu >= 0 and len(routes) == 6
    stepwise = torch.stack(routes, dim=1)  # [B, 6, R]
    with torch.inference_mode():
        model.flexidepth.recorder.clear()
        model(input_ids=text)
        full = model.flexidepth.recorder.stacked()[1][:, 8:]  # the decisions for the forced tokens
    assert stepwise.shape == full.shape
    assert torch.equal(stepwise, full)
    assert 0 < int((~full).sum()) < full.numel()  # the routers both run and skip here: a real comparison
    with pytest.raises(ValueError, match="forced"):
        decode_timed(model, prompt, 5, None, forced)


def test_speed_times_several_checkpoints_one_curve_each(tmp_path, tiny_ckpt):
    """more_ckpts: each checkpoint gets its own tau curve, equal-speed rows and label (its run folder);
    base and ShortGPT are timed once. A repeated label or a missing folder is refused before any work."""
    import shutil

    other = tmp_path / "budget_run" / "flexidepth"
    shutil.copytree(tiny_ckpt, other)
    extra = [
        f"more_ckpts=[{tmp_path / 'budget_run'}]",
        "taus=[0.2,0.8]",
        "shortgpt_k=[1]",
        "batch=0",
        "prefill_length=0",
        "heldout=[lee]",
        "rounds=1",
        "warmup=0",
    ]
    cfg = _speed_cfg(tmp_path, tiny_ckpt, extra)
    res = speed(cfg)
    assert list(res["systems"]) == [
        "base",
        "flexidepth@0.2",
        "flexidepth@0.8",
        "budget_run@0.2",
        "budget_run@0.8",
        "shortgpt_k1",
    ]
    assert res["ckpts"] == {"flexidepth": str(tiny_ckpt), "budget_run": str(other)}
    assert res["systems"]["budget_run@0.8"]["ckpt"] == "budget_run"
    # same weights: same routes, so the same layers skipped on every batch-1 mode
    a, b = res["systems"]["flexidepth@0.8"], res["systems"]["budget_run@0.8"]
    assert a["speed"]["layers_skipped"] == b["speed"]["layers_skipped"]
    assert a["ppl"]["lee"]["ppl"] == pytest.approx(b["ppl"]["lee"]["ppl"], rel=1e-6)
    rows = res["equal_speedup"]
    assert {r["checkpoint"] for r in rows} == {"flexidepth", "budget_run"}
    assert len(rows) == 2 * 2 * 2  # checkpoints x (text, greedy) x (wall, cpu); 1 set, 1 baseline
    assert "budget_run" in (tmp_path / "out" / "speed.md").read_text()
    for bad, match in (
        (f"more_ckpts=[{tmp_path / 'budget_run'},{other}]", "unique"),
        ("more_ckpts=[/nonexistent/x]", "more_ckpts"),
    ):
        with pytest.raises(Exception, match=match):
            check_speed(_speed_cfg(tmp_path, tiny_ckpt, [bad]))


def test_speed_times_the_always_run_variant_as_its_own_curve(tmp_path, tiny_ckpt):
    """always_run_max_skip: each checkpoint is also timed as <label>+ar, at each tau with the routed layers
    that the calibration text rarely skips set to run without their router (the same layers
    `rarely_skipped_layers` picks on that text), compared at equal speedup as a curve of its own."""
    from omegaconf import OmegaConf

    from src.flexidepth import load_flexidepth, set_tau
    from src.flexidepth.calibrate import rarely_skipped_layers
    from src.methods.base import Calibration, calibration_batches
    from src.models.loader import load_base_model
    from src.models.tokenizer import load_tokenizer

    extra = ["taus=[0.2,0.8]", "shortgpt_k=[1]", "batch=0", "prefill_length=0", "heldout=[lee]", "rounds=1"]
    cfg = _speed_cfg(tmp_path, tiny_ckpt, [*extra, "always_run_max_skip=0.5"])
    res = speed(cfg)
    systems = res["systems"]
    assert list(systems) == [
        "base",
        "flexidepth@0.2",
        "flexidepth@0.8",
        "flexidepth+ar@0.2",
        "flexidepth+ar@0.8",
        "shortgpt_k1",
    ]
    assert res["ckpts"] == {"flexidepth": str(tiny_ckpt), "flexidepth+ar": str(tiny_ckpt)}
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = load_base_model(ModelConfig(**model_cfg)).eval()
    load_flexidepth(model, tiny_ckpt)
    batches = calibration_batches(
        load_tokenizer(ModelConfig(**model_cfg)), Calibration(texts=cfg.calibration_texts)
    )
    picked = {}
    for tau in (0.2, 0.8):
        set_tau(model, tau)
        picked[tau] = rarely_skipped_layers(model, batches, 0.5)
        assert systems[f"flexidepth+ar@{tau:g}"]["always_run"] == picked[tau]
        assert systems[f"flexidepth@{tau:g}"]["always_run"] == []
    assert picked[0.2] and picked[0.2] != picked[0.8]  # the variant differs from the plain curve somewhere
    ar = systems["flexidepth+ar@0.2"]
    assert ar["speed"]["layers_skipped"]["decode_b1"] <= len(model.flexidepth.layer_indices) - len(
        picked[0.2]
    )
    assert {r["checkpoint"] for r in res["equal_speedup"]} == {"flexidepth", "flexidepth+ar"}
    md = (tmp_path / "out" / "speed.md").read_text()
    assert f"`flexidepth+ar@0.2` {picked[0.2]}" in md


def test_faster_and_better_picks_the_best_point_at_least_as_fast():
    """The best-point table: for each set and ShortGPT point, the lowest-ppl FlexiDepth system among those
    measured at least as fast (any checkpoint), and the paired rounds it won; '-' when none is that fast."""
    from src.render.speed import faster_and_better, faster_and_better_markdown

    def system(kind, speedup, wall, ppl):
        return {
            "kind": kind,
            "speed": {"decode_b1": {"speedup_wall": speedup, "wall_s": wall}},
            "ppl": {"lee": {"ppl": ppl[0]}, "wiki": {"ppl": ppl[1]}},
        }

    results = {
        "heldout": ["lee", "wiki"],
        "systems": {
            "base": system("base", 1.0, [2.0, 2.0, 2.0], (30.0, 20.0)),
            "a@0.3": system("flexidepth", 1.05, [1.90, 1.91, 1.89], (35.0, 21.0)),
            "a@0.7": system("flexidepth", 1.20, [1.60, 1.70, 1.66], (50.0, 40.0)),
            "b@0.5": system("flexidepth", 1.12, [1.80, 1.76, 1.79], (41.0, 22.0)),
            "shortgpt_k2": system("shortgpt", 1.10, [1.79, 1.82, 1.81], (45.0, 21.5)),
            "shortgpt_k6": system("shortgpt", 1.30, [1.50, 1.55, 1.52], (60.0, 30.0)),
        },
    }
    rows = {(r["set"], r["baseline"]): r for r in faster_and_better(results)}
    lee2, wiki2 = rows["lee", "shortgpt_k2"], rows["wiki", "shortgpt_k2"]
    assert (lee2["system"], lee2["system_ppl"], lee2["better"]) == ("b@0.5", 41.0, True)
    assert (lee2["faster_rounds"], lee2["rounds"]) == (2, 3)  # 1.80 > 1.79 loses round 1
    assert (wiki2["system"], wiki2["system_ppl"], wiki2["better"]) == (
        "b@0.5",
        22.0,
        False,
    )  # a@0.3 is slower
    assert rows["lee", "shortgpt_k6"]["system"] is None and rows["wiki", "shortgpt_k6"]["system"] is None
    md = "\n".join(faster_and_better_markdown(results))
    assert "| lee | shortgpt_k2 | 1.100 | 45.00 | b@0.5 | 1.120 | 41.00 | yes | 2 of 3 |" in md
    assert "| wiki | shortgpt_k6 | 1.300 | 30.00 | - | - | - | - | - |" in md


def test_speed_times_a_layer_replacement_checkpoint_as_a_static_point(tmp_path, tiny_ckpt):
    """A layer_replacement run (trained static baseline) is timed once, under its own kind and label: every
    decoded token skips exactly its replaced layers, its ppl is that of the checkpoint applied through the
    registry, and it is a baseline of the equal-speed comparison like pruned ShortGPT."""
    from omegaconf import OmegaConf

    from src.eval import curves
    from src.flexidepth import FlexiDepthConfig, inject, save_flexidepth
    from src.methods import build_method
    from src.models.loader import load_base_model
    from src.models.tokenizer import load_tokenizer, pad_token_id

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model_cfg = OmegaConf.to_container(
            compose("speed", overrides=["model=tiny_llama"]).model, resolve=True
        )
    model = inject(
        load_base_model(ModelConfig(**model_cfg)), FlexiDepthConfig(layers=[1, 2], always_skip=[1, 2])
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / "static_k2" / "flexidepth"
    save_flexidepth(
        model, folder, extra={"method": "layer_replacement", "method_details": {"layers": [1, 2]}}
    )
    extra = [f"more_ckpts=[{tmp_path / 'static_k2'}]", "taus=[0.2,0.8]", "shortgpt_k=[1]", "batch=0",
             "prefill_length=0", "heldout=[lee]", "rounds=1", "warmup=0"]  # fmt: skip
    cfg = _speed_cfg(tmp_path, tiny_ckpt, extra)
    res = speed(cfg)  # checked first: a layer_replacement run is accepted (mindskip is not)
    systems = res["systems"]
    assert list(systems) == ["base", "flexidepth@0.2", "flexidepth@0.8", "static_k2", "shortgpt_k1"]
    s = systems["static_k2"]
    assert s["kind"] == "layer_replacement" and s["tau"] is None and s["removed"] == [1, 2] and s["k"] == 2
    assert set(s["speed"]["layers_skipped"].values()) == {2.0}
    assert min(s["flop_ideal"].values()) > 1.0
    assert s["ppl"]["lee"]["layers_skipped"] == pytest.approx(2.0)
    fresh = load_base_model(ModelConfig(**model_cfg)).eval()
    build_method({"name": "layer_replacement"}).apply(fresh, ckpt=str(folder))
    tok = load_tokenizer(ModelConfig(**model_cfg))
    sets = curves.heldout_sets(tok, ["lee"], 32, 64)
    want = curves.measure(fresh, sets, 8, pad_token_id(tok), num_layers=fresh.config.num_hidden_layers)
    assert s["ppl"]["lee"]["ppl"] == pytest.approx(want["lee"]["ppl"], rel=1e-5)
    baselines = {r["baseline"] for r in res["equal_speedup"]}
    assert baselines == {"static_k2", "shortgpt_k1"}
    assert "| static_k2 |" in (tmp_path / "out" / "speed.md").read_text()


def test_shortgpt_prune_option_deletes_the_layers_it_would_make_identity():
    """method.prune=true (src.speed's door to pruned ShortGPT) removes the same layers as the identity wiring,
    deletes them from the model, and gives the same logits."""
    from omegaconf import OmegaConf

    from src.methods import build_method
    from src.models.loader import load_base_model
    from src.models.tokenizer import load_tokenizer
    from tests.helpers.configs import compose_tiny

    node = OmegaConf.to_container(compose_tiny("train").model, resolve=True)  # the embedded tokenizer's vocab
    node["arch"]["num_hidden_layers"] = 6
    base = load_base_model(ModelConfig(**node)).eval()
    tok = load_tokenizer(ModelConfig(**node))
    options = {"name": "shortgpt", "k": 2, "calibration": {"texts": 2, "max_length": 32, "batch_size": 2}}
    identity, pruned = copy.deepcopy(base), copy.deepcopy(base)
    a = build_method(options).apply(identity, tokenizer=tok)
    b = build_method({**options, "prune": True}).apply(pruned, tokenizer=tok)
    assert a.removed == b.removed and len(b.removed) == 2
    assert pruned.config.num_hidden_layers == 4 and getattr(pruned, "flexidepth", None) is None
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(
            pruned(input_ids=ids).logits, identity(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )
