"""Tests for src/export.py and the exported modeling file (src/export_modeling/modeling_flexidepth.py).

The export of a tiny random model of every supported family is loaded in a separate Python process in which
`import src` fails (isolated mode, no site processing, so the editable install's finder is absent; only the
site-packages folder is on sys.path) with transformers' own AutoModelForCausalLM / AutoTokenizer, and must
give the same greedy tokens, the same layers used per token, the same teacher-forced logits as
`src.flexidepth.generation.generate` / `routed_forward` on the trained model, at the stored tau and at an
overridden one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from src import export as ex
from src.config.commands import ExportCommand
from src.config.schemas import load
from src.flexidepth import FlexiDepthConfig, inject, save_flexidepth, set_tau
from src.flexidepth.checkpoint import load_flexidepth
from src.flexidepth.generation import generate
from src.flexidepth.routes import routed_forward
from src.models import export as hfx
from src.models.config import ModelConfig
from src.models.loader import load_base_model
from src.models.tokenizer import load_tokenizer
from src.render.model_card import model_card
from src.utils.run_config import run_folder_of

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
SITE_PACKAGES = str(Path(torch.__file__).resolve().parents[1])
PROMPTS = ["What is 12 + 30?", "Once upon a time there was"]
NEW_TOKENS = 8
OVERRIDE_TAU = 0.6

# Runs in the isolated child: python -I -S -c CHILD <site-packages> <export> <request.json> <result.pt>
CHILD = r"""
import json, sys
site_packages, folder, request, result = sys.argv[1:5]
sys.path.append(site_packages)
try:
    import src
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the repository is importable in the isolated child: " + str(src.__file__))
import torch
torch.set_num_threads(1)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
req = json.load(open(request))
out = {"sys_path": list(sys.path)}
try:
    AutoConfig.from_pretrained(folder)
    out["without_trust"] = "loaded"
except Exception as err:
    out["without_trust"] = type(err).__name__ + ": " + str(err)[:200]
tok = AutoTokenizer.from_pretrained(folder)
out["encoded"] = tok(req["text"])["input_ids"]
ids, mask = torch.tensor(req["ids"]), torch.tensor(req["mask"])
for name, tau in (("stored", None), ("override", req["tau"])):
    kw = {} if tau is None else {"flexidepth_tau": tau}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kw).eval()
    with torch.no_grad():
        seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=req["n"], do_sample=False,
                              eos_token_id=req["eos"], pad_token_id=req["pad"])
        gen = model.flexidepth_generation
        fast = model(input_ids=ids, attention_mask=mask).logits
    with torch.enable_grad():  # autograd on: the masked (training-form) path
        masked = model(input_ids=ids, attention_mask=mask).logits.detach()
    out[name] = {"class": type(model).__name__, "tau": model.config.flexidepth["tau"],
                 "new_tokens": seqs[:, ids.shape[1]:], "layers_used": gen.layers_used, "run": gen.run,
                 "logits": fast, "masked_logits": masked, "routes": model.flexidepth_routes.run,
                 "router_dtype": str(model.model.layers[-1].router.head.weight.dtype)}
torch.save(out, result)
"""


def compose_export(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("export", overrides=list(overrides))


def trained_checkpoint(model_name: str, folder: Path, **skip) -> dict:
    """A checkpoint with random (released-init) routers and adapters: gates spread around 0.5."""
    cfg = compose_export([f"model={model_name}"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = load_base_model(ModelConfig(**model_cfg))
    torch.manual_seed(1)
    inject(model, FlexiDepthConfig(init="released", **skip))
    save_flexidepth(model, folder)
    return model_cfg


def trained_model(model_cfg: dict, ckpt: Path):
    model = load_base_model(ModelConfig(**model_cfg)).eval()
    load_flexidepth(model, ckpt)
    return model.eval()


def load_isolated(folder: Path, tmp: Path, request: dict) -> dict:
    """Run CHILD on `folder` in a fresh interpreter without the repository on sys.path."""
    req, res = tmp / "request.json", tmp / "result.pt"
    req.write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, SITE_PACKAGES, str(folder), str(req), str(res)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(res, weights_only=False)


def prompt_batch(tokenizer):
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def check_against_original(model, tokenizer, got: dict, ids, mask, tol: float) -> None:
    """The isolated load's generation and logits equal the trained model's (src) at both thresholds."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for name, tau in (("stored", None), ("override", OVERRIDE_TAU)):
        if tau is not None:
            set_tau(model, tau)
        ref = generate(model, None, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
        with torch.no_grad():
            tf = routed_forward(model, ids, mask)
        mine = got[name]
        assert mine["class"].startswith("FlexiDepth")
        assert mine["tau"] == pytest.approx(float(model.flexidepth.config.tau))
        assert mine["router_dtype"] == "torch.float32"  # fp32 routers stay fp32 (param_dtype)
        assert torch.equal(mine["new_tokens"], ref.new_tokens), name
        valid = ref.valid
        assert torch.equal(mine["layers_used"][valid], ref.layers_used[valid]), name
        assert torch.equal(mine["run"][valid], ref.run[valid]), name
        real = mask.bool()
        assert torch.equal(mine["routes"][real], tf.routes.run[real]), name
        torch.testing.assert_close(mine["logits"].float()[real], tf.logits.float()[real], atol=tol, rtol=tol)
        torch.testing.assert_close(
            mine["masked_logits"].float()[real], tf.logits.float()[real], atol=tol, rtol=tol
        )
    set_tau(model, 0.5)


# ---------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def original_and_isolated(model_cfg, out, tmp_path):
    """The trained model of `tmp_path/run`, its tokenizer, the prompt batch, and what the export at `out` gives
    for that batch in an isolated interpreter (`load_isolated`)."""
    model = trained_model(model_cfg, tmp_path / "run" / "flexidepth")
    tokenizer = load_tokenizer(ModelConfig(**model_cfg))
    ids, mask = prompt_batch(tokenizer)
    request = {
        "ids": ids.tolist(),
        "mask": mask.tolist(),
        "n": NEW_TOKENS,
        "tau": OVERRIDE_TAU,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "text": PROMPTS[0],
    }
    return model, tokenizer, ids, mask, load_isolated(out, tmp_path, request)


def test_export_loads_without_the_repository_and_matches_the_trained_model(family, tmp_path):
    model_cfg = trained_checkpoint(f"tiny_{family}", tmp_path / "run" / "flexidepth")
    out = tmp_path / "export"
    cfg = compose_export([f"model=tiny_{family}", f"ckpt_path={tmp_path / 'run'}", f"out_dir={out}"])
    assert ex.run(cfg) == out.resolve()
    files = sorted(p.name for p in out.iterdir())
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "modeling_flexidepth.py",
        "README.md",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert name in files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]  # no temporary left
    assert (out / "modeling_flexidepth.py").read_bytes() == hfx.MODELING_SOURCE.read_bytes()
    assert (
        "import src" not in hfx.MODELING_SOURCE.read_text()
        and "from src" not in hfx.MODELING_SOURCE.read_text()
    )
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "flexidepth" and meta["auto_map"] == hfx.AUTO_MAP
    routing = meta["flexidepth"]
    assert routing["base_model_type"] == family and routing["layers"] == [2, 3] and routing["tau"] == 0.5
    assert (
        routing["router_width"] == 4 and routing["adapter_width"] == 8 and routing["gate_mode"] == "released"
    )

    model, tokenizer, ids, mask, got = original_and_isolated(model_cfg, out, tmp_path)
    assert not any(str(Path(ex.__file__).resolve().parents[1]) == p for p in got["sys_path"])
    assert got["without_trust"].startswith("ValueError") and "custom code" in got["without_trust"]
    assert got["encoded"] == tokenizer(PROMPTS[0])["input_ids"]
    check_against_original(model, tokenizer, got, ids, mask, tol=1e-4)
    # the routing is not trivial, and the override changes it (more skipping at the higher threshold)
    stored, override = got["stored"]["run"].float().mean(), got["override"]["run"].float().mean()
    assert 0.0 < stored < 1.0 and override < stored


def test_generation_record_and_tau_setter_in_process(tmp_path):
    """The modeling file imported directly: per-token records for a batch-1 generate, set_flexidepth_tau."""
    model_cfg = trained_checkpoint("tiny_llama", tmp_path / "ckpt")
    model = trained_model(model_cfg, tmp_path / "ckpt")
    tokenizer = load_tokenizer(ModelConfig(**model_cfg))
    card = model_card(hfx.routing_block(model), 4, None)
    hfx.write_export(model, tokenizer, tmp_path / "out", card)
    module = hfx.load_modeling(tmp_path / "out")
    loaded = module.FlexiDepthForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        seqs = loaded.generate(
            input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    rec = loaded.flexidepth_generation
    n_new = seqs.shape[1] - ids.shape[1]
    assert (
        rec.layers_used.shape == (1, n_new)
        and rec.run.shape == (1, n_new, 2)
        and rec.gates.shape == (1, n_new, 2)
    )
    assert torch.equal(rec.layers_used, 2 + rec.run.sum(-1))
    ref = generate(model, None, ids, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(seqs[:, ids.shape[1] :], ref.new_tokens) and torch.equal(
        rec.layers_used, ref.layers_used
    )
    calls = {}

    def counter(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1

        return hook

    layers = loaded.model.layers
    for i in (1, 2, 3):
        layers[i].mlp.register_forward_hook(counter(f"mlp{i}"))
        layers[i].self_attn.q_proj.register_forward_hook(counter(f"q{i}"))
        layers[i].self_attn.k_proj.register_forward_hook(counter(f"k{i}"))
    loaded.set_flexidepth_tau(1.0)  # nothing runs: every token uses the 2 unrouted layers only
    with torch.no_grad():
        loaded.generate(input_ids=ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert loaded.flexidepth_generation.layers_used.tolist() == [[2, 2, 2]]
    # real skipping: the routed layers (2, 3) ran no query and no FFN, yet projected K/V of every token
    assert calls.get("mlp2", 0) == calls.get("mlp3", 0) == calls.get("q2", 0) == calls.get("q3", 0) == 0
    assert calls["k2"] == calls["k3"] == calls["mlp1"] == calls["q1"] == 3
    with pytest.raises(module.FlexiDepthExportError, match="tau"):
        loaded.set_flexidepth_tau(1.5)
    with pytest.raises(module.FlexiDepthExportError, match="flexidepth_tau"):
        module.FlexiDepthForCausalLM.from_pretrained(str(tmp_path / "out"), flexidepth_tau=-0.1)


# ---------------------------------------------------------------------------------------------- damaged
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("written")
    model_cfg = trained_checkpoint("tiny_llama", tmp / "ckpt")
    model = trained_model(model_cfg, tmp / "ckpt")
    hfx.write_export(model, load_tokenizer(ModelConfig(**model_cfg)), tmp / "out", "card")
    return tmp / "out"


def _damaged_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_damaged_export_fails_at_load_naming_the_file(written, tmp_path):
    module = hfx.load_modeling(written)
    key = "model.layers.3.router.enc.weight"
    missing = _damaged_copy(written, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(module.FlexiDepthExportError, match=rf"model\.safetensors: missing tensor.*{key}"):
        module.FlexiDepthForCausalLM.from_pretrained(str(missing))

    def reshape(t):
        t[key] = torch.zeros(5, 64)

    wrong = _damaged_copy(written, tmp_path / "shape", reshape)
    with pytest.raises(
        module.FlexiDepthExportError, match=rf"model\.safetensors: tensor {key} has shape \[5, 64\]"
    ):
        module.FlexiDepthForCausalLM.from_pretrained(str(wrong))

    def other_base(t):  # weights of a Qwen3 base: per-head q/k norms this Llama does not have
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)

    other = _damaged_copy(written, tmp_path / "other", other_base)
    with pytest.raises(module.FlexiDepthExportError, match=r"model\.safetensors: unexpected tensor.*q_norm"):
        module.FlexiDepthForCausalLM.from_pretrained(str(other))

    truncated = _damaged_copy(written, tmp_path / "truncated", lambda t: None)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(module.FlexiDepthExportError, match=r"model\.safetensors: damaged"):
        module.FlexiDepthForCausalLM.from_pretrained(str(truncated))

    import shutil

    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(written, bad_cfg)
    meta = json.loads((bad_cfg / "config.json").read_text())
    meta["flexidepth"]["layers"] = [2, 9]
    (bad_cfg / "config.json").write_text(json.dumps(meta))
    with pytest.raises(module.FlexiDepthExportError, match=r"config\.json: flexidepth\.layers"):
        module.FlexiDepthForCausalLM.from_pretrained(str(bad_cfg))


@pytest.mark.parametrize(
    "always_skip",
    [[1], [3, 3], [9], "3", [True], [3.0]],
    ids=["unrouted", "duplicate", "out_of_range", "not_a_list", "bool", "float"],
)
def test_damaged_always_skip_fails_at_load_naming_the_key(written, tmp_path, always_skip):
    """The routed layers are 2 and 3: any other value, a repeat or a non-integer is refused before weights load."""
    import shutil

    module = hfx.load_modeling(written)
    bad = tmp_path / "bad"
    shutil.copytree(written, bad)
    meta = json.loads((bad / "config.json").read_text())
    assert meta["flexidepth"]["layers"] == [2, 3]
    meta["flexidepth"]["always_skip"] = always_skip
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(module.FlexiDepthExportError, match=r"config\.json: flexidepth\.always_skip="):
        module.FlexiDepthForCausalLM.from_pretrained(str(bad))
    meta["flexidepth"]["always_skip"] = [3]  # the same file with a valid value loads
    (bad / "config.json").write_text(json.dumps(meta))
    loaded = module.FlexiDepthForCausalLM.from_pretrained(str(bad))
    assert loaded.config.flexidepth["always_skip"] == [3]


# ---------------------------------------------------------------------------------------------- command
def test_hub_offline_fails_first_naming_repo_and_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_export(
        ["model=tiny_llama", "ckpt_path=/nonexistent", f"out_dir={tmp_path / 'o'}", "hub_repo=me/tiny"]
    )
    with pytest.raises(hfx.ExportError) as err:
        ex.run(cfg)
    message = str(err.value)
    assert "\n" not in message and "me/tiny" in message and "HF_HUB_OFFLINE=1" in message
    assert not (tmp_path / "o").exists()


def test_push_uploads_the_export_files(tmp_path, monkeypatch):
    trained_checkpoint("tiny_llama", tmp_path / "ckpt")
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message=""):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    compare = tmp_path / "cmp" / "compare.json"
    compare.parent.mkdir()
    compare.write_text(
        json.dumps({"rows": [{"label": "flexidepth", "layers_skipped_scored": 1.5, "retention": 0.9}]})
    )
    (compare.parent / "ppl_vs_skipped.png").write_bytes(b"\x89PNG fake")
    cfg = compose_export(
        [
            "model=tiny_llama",
            f"ckpt_path={tmp_path / 'ckpt'}",
            f"out_dir={tmp_path / 'out'}",
            "hub_repo=me/tiny-flexi",
            f"compare_json={compare}",
        ]
    )
    ex.run(cfg)
    assert calls[0] == ("create", "me/tiny-flexi", False, True)
    assert calls[1][:2] == ("upload", "me/tiny-flexi")
    assert calls[1][2] == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {
        "config.json",
        "model.safetensors",
        "modeling_flexidepth.py",
        "README.md",
        "tokenizer.json",
        "generation_config.json",
        "ppl_vs_skipped.png",
    } <= set(calls[1][2])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| flexidepth | 1.50 |  | 0.900 |  |" in card and "](ppl_vs_skipped.png)" in card


def test_out_dir_rules_and_failure_leaves_nothing(tmp_path, monkeypatch):
    trained_checkpoint("tiny_llama", tmp_path / "ckpt")
    base = ["model=tiny_llama", f"ckpt_path={tmp_path / 'ckpt'}"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(hfx.ExportError, match="not empty and holds no previous export"):
        ex.run(compose_export([*base, f"out_dir={other}", "overwrite=true"]))
    assert (other / "notes.txt").read_text() == "mine"

    out = tmp_path / "out"
    ex.run(compose_export([*base, f"out_dir={out}"]))
    first = (out / "config.json").read_text()
    with pytest.raises(hfx.ExportError, match="overwrite=true"):
        ex.run(compose_export([*base, f"out_dir={out}"]))
    ex.run(compose_export([*base, f"out_dir={out}", "overwrite=true"]))
    assert (out / "config.json").read_text() == first
    listed = json.loads(first)["flexidepth"]["files"]
    assert listed == sorted(p.name for p in out.iterdir()) and "config.json" in listed
    # a file the export did not write: overwrite refuses, and everything stays as it was
    (out / "my_eval.txt").write_text("mine")
    with pytest.raises(hfx.ExportError, match="holds files the export did not write \\(my_eval.txt\\)"):
        ex.run(compose_export([*base, f"out_dir={out}", "overwrite=true"]))
    assert (out / "my_eval.txt").read_text() == "mine" and (out / "config.json").read_text() == first
    (out / "my_eval.txt").unlink()

    def broken(*args, **kwargs):
        raise hfx.ExportError("verification failed (test)")

    monkeypatch.setattr(ex, "verify_export", broken)
    fresh = tmp_path / "fresh"
    with pytest.raises(hfx.ExportError, match="verification failed"):
        ex.run(compose_export([*base, f"out_dir={fresh}"]))
    assert not fresh.exists()
    with pytest.raises(hfx.ExportError, match="verification failed"):
        ex.run(compose_export([*base, f"out_dir={out}", "overwrite=true"]))
    assert (out / "config.json").read_text() == first  # the previous export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "other", "out"]  # no temporaries


def test_unsupported_family_and_method_are_refused_naming_them(tmp_path):
    trained_checkpoint("tiny_llama", tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "flexidepth_config.json"
    meta = json.loads(meta_path.read_text())
    meta["base_model"]["model_type"] = "gpt_neox"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(hfx.ExportError, match="family 'gpt_neox' cannot be exported"):
        hfx.check_checkpoint(tmp_path / "ckpt")
    meta["base_model"]["model_type"], meta["method"] = "llama", "mindskip"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(hfx.ExportError, match="method=mindskip"):
        hfx.check_checkpoint(tmp_path / "ckpt")
    meta.pop("method")
    meta["flexidepth"]["kv_for_skipped"] = False
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(hfx.ExportError, match="kv_for_skipped=false"):
        hfx.check_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "override, match",
    [
        ("out_dir=null", "out_dir is required"),
        ("hub_repo=not-a-repo", "hub_repo must look like"),
        ("compare_json=/nonexistent/compare.json", "compare_json="),
    ],
)
def test_bad_arguments_are_refused_naming_the_key(override, match, tmp_path):
    cfg = compose_export(["model=tiny_llama", "ckpt_path=/x", f"out_dir={tmp_path / 'o'}", override])
    with pytest.raises(hfx.ExportError, match=match):
        load(cfg, ExportCommand).check()


def test_wrong_types_are_refused_by_the_schema_naming_the_key(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_export(["model=tiny_llama", "ckpt_path=/x", f"out_dir={tmp_path / 'o'}", "overwrite=maybe"])
    assert "full_key: overwrite" in str(err.value.__cause__)


# ---------------------------------------------------------------------------------------------- model card
ROUTING = {
    "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "base_model_type": "llama",
    "layers": list(range(15, 30)),
    "tau": 0.5,
    "gate_mode": "released",
    "router": "mlp",
    "router_width": 36,
    "router_bias": True,
    "adapter": "swiglu",
    "adapter_width": 96,
}


def test_model_card_from_the_run_files(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "seed: 7\nmodel:\n  name_or_path: embedded:smollm2-135m-instruct\ndata:\n  source: mixture\n"
        "  mixture:\n    tulu3: 0.7\n    builtin: 0.3\ntrainer:\n  max_steps: 300\n"
    )
    (run / ".hydra" / "overrides.yaml").write_text("- loss.alpha=0.001\n- trainer.max_steps=300\n")
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "global_step": 300,
                "metrics": {"val/ppl": 3.25, "val/base_ppl": 3.125, "val/layers_skipped_mean": 4.5},
                "loss": {"alpha": 0.001},
            }
        )
    )
    compare = tmp_path / "compare.json"
    compare.write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "label": "base",
                        "layers_skipped_scored": 0.0,
                        "ppl": 3.1,
                        "retention": 1.0,
                        "retention_ci": None,
                    },
                    {
                        "label": "flexidepth",
                        "layers_skipped_scored": 4.25,
                        "ppl": 3.3,
                        "retention": 0.97,
                        "retention_ci": [0.93, 1.01],
                    },
                ]
            }
        )
    )
    (tmp_path / "curves.md").write_text(
        "# Held-out curves\n\n| set | k | ppl |\n|---|---|---|\n| lee | 2 | 3.4 |\n"
    )
    (tmp_path / "ppl_vs_skipped.png").write_bytes(b"\x89PNG fake")
    card = model_card(
        ROUTING, 30, run, compare, license_name="apache-2.0", base_model="HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert "### Held-out curves" in card and "| lee | 2 | 3.4 |" in card
    assert "](ppl_vs_skipped.png)" in card
    head = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in head and "license: apache-2.0" in head
    assert "library_name: transformers" in head and "- flexidepth" in head
    assert "python -m src.train loss.alpha=0.001 trainer.max_steps=300" in card
    assert "| optimizer steps | 300 |" in card and "| seed | 7 |" in card
    assert "tulu3 0.7, builtin 0.3" in card
    assert (
        "| validation perplexity | 3.250 |" in card
        and "| validation perplexity of the base model | 3.125 |" in card
    )
    assert "(of 15, validation) | 4.500 |" in card
    assert "| flexidepth | 4.25 | 3.300 | 0.970 | [0.930, 1.010] |" in card
    assert "| routed layers | 15..29 (15 layers) |" in card


def test_model_card_omits_what_the_run_does_not_have(tmp_path):
    card = model_card(ROUTING, 30, None)
    assert "## Training" not in card and "## Results" not in card
    assert "perplexity" not in card and "retention" not in card and "license:" not in card
    assert "base_model:" not in card


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_embedded_smollm2_export_matches_in_isolated_process(tmp_path):
    model_cfg = trained_checkpoint("smollm2_135m", tmp_path / "run" / "flexidepth")
    out = tmp_path / "export"
    ex.run(compose_export(["model=smollm2_135m", f"ckpt_path={tmp_path / 'run'}", f"out_dir={out}"]))
    model, tokenizer, ids, mask, got = original_and_isolated(model_cfg, out, tmp_path)
    tol = 1e-4 if model.dtype == torch.float32 else 2e-2
    check_against_original(model, tokenizer, got, ids, mask, tol=tol)


# ---------------------------------------------------------------------------------------------- lm-eval
def test_lm_eval_hf_model_on_the_export_scores_like_the_flexidepth_wrapper(tmp_path):
    """lm-eval's own `hf` model (trust_remote_code) on the export = our `flexidepth` wrapper on the trained
    model: per request (the tolerance of tests/test_harness_edges.py's parity test) and per local task."""
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from src.eval.harness import FlexiDepthLM
    from src.eval.harness_run import _task_manager, run_harness
    from src.tasks.lm_tasks import LOCAL_TASKS, write_local_tasks

    model_cfg = trained_checkpoint("tiny_llama", tmp_path / "ckpt")
    model = trained_model(model_cfg, tmp_path / "ckpt")
    tokenizer = load_tokenizer(ModelConfig(**model_cfg))
    hfx.write_export(model, tokenizer, tmp_path / "out", "card")
    hf = HFLM(pretrained=str(tmp_path / "out"), trust_remote_code=True, batch_size=2, device="cpu")
    assert type(hf.model).__name__ == "FlexiDepthLlamaForCausalLM"
    ours = FlexiDepthLM(model, tokenizer, batch_size=3)

    def request(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("unit", 0, 1))

    pairs = [
        ("Question: What is 2 + 3?\nAnswer:", " 5"),
        ("The fox ", "jumps"),
        ("A longer context, so that the batch is padded:", " yes, it is"),
    ]
    reqs = [request("loglikelihood", p) for p in pairs]
    for (a, ga), (b, gb) in zip(ours.loglikelihood(reqs), hf.loglikelihood(reqs), strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    gens = [
        request(
            "generate_until", ("Once upon a time", {"until": ["."], "max_gen_toks": 8, "do_sample": False})
        ),
        request("generate_until", ("Q: 1 + 1 =", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})),
    ]
    assert ours.generate_until(gens) == hf.generate_until(gens)
    routes = hf.model.flexidepth_routes.run  # the hf model routed (some tokens skipped, some ran)
    assert 0.0 < routes.float().mean() < 1.0

    tasks = write_local_tasks(tmp_path / "tasks", n_test=6, n_train=2)
    mine = run_harness(
        model,
        tokenizer,
        list(LOCAL_TASKS),
        include_path=tasks,
        limit=4,
        num_fewshot=1,
        max_gen_toks=6,
        bootstrap_iters=0,
    )
    theirs = simple_evaluate(
        model=hf,
        tasks=list(LOCAL_TASKS),
        num_fewshot=1,
        limit=4,
        gen_kwargs={"max_gen_toks": 6},
        task_manager=_task_manager(list(LOCAL_TASKS), tasks, None),
        random_seed=1234,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
        bootstrap_iters=0,
        log_samples=False,
    )["results"]
    for task in LOCAL_TASKS:
        metric = mine[task]["metric"]
        assert theirs[task][metric] == pytest.approx(mine[task]["score"], abs=1e-9), task


@pytest.mark.parametrize(
    "skip",
    [
        {"router": "linear", "adapter": "none", "gate_mode": "ste"},
        {"param_dtype": "bfloat16", "router_bias": False, "gate_mode": "difference", "layers": [1, 3]},
        {"adapter_rank": 12, "tau": 0.45},
        {"always_skip": [3], "gate_mode": "difference"},
    ],
)
def test_router_adapter_variants_round_trip(skip, tmp_path):
    """Every router / adapter / gate-mode / dtype variant: the export generates and scores as the original."""
    model_cfg = trained_checkpoint("tiny_llama", tmp_path / "ckpt", **skip)
    model = trained_model(model_cfg, tmp_path / "ckpt")
    tokenizer = load_tokenizer(ModelConfig(**model_cfg))
    hfx.write_export(model, tokenizer, tmp_path / "out", "card")
    module = hfx.load_modeling(tmp_path / "out")
    loaded = module.FlexiDepthForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    layer = loaded.model.layers[3]
    assert layer.router.head.weight.dtype == getattr(torch, skip.get("param_dtype", "float32"))
    assert (layer.adapter is None) == (skip.get("adapter") == "none")
    ids, mask = prompt_batch(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ref = generate(model, None, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad():
        seqs = loaded.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        tf = routed_forward(model, ids, mask)
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(seqs[:, ids.shape[1] :], ref.new_tokens)
    assert torch.equal(loaded.flexidepth_generation.layers_used[ref.valid], ref.layers_used[ref.valid])
    real = mask.bool()
    assert torch.equal(loaded.flexidepth_routes.run[real], tf.routes.run[real])
    assert 0.0 < tf.routes.run[real].float().mean() < 1.0
    torch.testing.assert_close(got[real], tf.logits.float()[real], atol=1e-4, rtol=1e-4)
    if skip.get("always_skip"):  # the always-skipped layer (the last routed one here) never runs
        assert loaded.config.flexidepth["always_skip"] == skip["always_skip"]
        assert not loaded.flexidepth_routes.run[..., -1].any()


def test_model_card_reads_the_run_history_without_hydra_folder(tmp_path):
    """A run whose .hydra/ lives elsewhere: the latest start's config and overrides copies in history/."""
    run = tmp_path / "run"
    (run / "history" / "hydra-001").mkdir(parents=True)
    (run / "history" / "config-000.yaml").write_text("seed: 1\ndata:\n  source: builtin\n")
    (run / "history" / "config-001.yaml").write_text("seed: 2\ndata:\n  source: mixture\n")
    (run / "history" / "hydra-001" / "overrides.yaml").write_text("- seed=2\n")
    assert run_folder_of(run / "flexidepth") == run
    card = model_card(ROUTING, 30, run)
    assert "| seed | 2 |" in card and "| data source | mixture |" in card
    assert "python -m src.train seed=2" in card and "| seed | 1 |" not in card


# ---------------------------------------------------------------------------------------------- one contract
def test_the_export_format_and_families_are_declared_once():
    """The format's constants live in the modeling file that ships with every export and reads it back; the
    framework imports them (no second literal anywhere in src/), and every family the modeling file builds is
    one the method core can inject."""
    from src.export_modeling import modeling_flexidepth as modeling
    from src.flexidepth.families import FAMILIES as CORE_FAMILIES

    assert hfx.EXPORT_FORMAT is modeling.EXPORT_FORMAT and hfx.FORMAT_VERSION is modeling.FORMAT_VERSION
    assert hfx.WEIGHTS_NAME is modeling.WEIGHTS_NAME and hfx.ROUTING_KEY is modeling.ROUTING_KEY
    assert hfx.SUPPORTED_FAMILIES == tuple(modeling.FAMILIES) and set(modeling.FAMILIES) <= set(CORE_FAMILIES)
    assert hfx.MODELING_SOURCE == Path(modeling.__file__).resolve()
    declared = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "src").rglob("*.py"))
        if f'"{modeling.EXPORT_FORMAT}"' in p.read_text() or "SUPPORTED_FAMILIES = (" in p.read_text()
    ]
    assert declared == ["src/export_modeling/modeling_flexidepth.py"]


def _serving_body(cls) -> list[str]:
    """The statements of `cls.forward` (docstring and the core's inference-only `folded` branch left out)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    body = tree.body[0].body
    keep = [
        s
        for s in body
        if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))  # the docstring
        and not (isinstance(s, ast.If) and ast.unparse(s.test) == "folded")  # core only: the folded form
    ]
    return [ast.unparse(s) for s in keep]


@pytest.mark.parametrize("name", ["RouterRMSNorm", "MLPRouter", "LinearRouter", "SwiGLUAdapter"])
def test_the_modeling_copy_serves_with_the_cores_arithmetic_text(name):
    """The modeling file copies the core's router and adapter classes (it must load without this repository):
    their forward passes are the same statements, so one side cannot change alone. Behaviour is checked too
    (logits and routes of a written export against the trained model, above)."""
    from src.export_modeling import modeling_flexidepth as modeling
    from src.flexidepth import modules as core

    assert _serving_body(getattr(modeling, name)) == _serving_body(getattr(core, name))
    assert len(_serving_body(getattr(core, name))) >= 2  # not vacuous
