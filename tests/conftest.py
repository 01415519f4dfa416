"""Test setup: offline, CPU, caches out of the home dir; tiny random models of every supported family."""

import os
import tempfile
from pathlib import Path

# pytest -n N (pytest-xdist, `make test`): the cores are shared out between the workers, one thread each on 2
# cores (two OpenMP threads per worker would wait on each other at every op); subprocesses inherit it.
_THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

# Before any HF / wandb import (docs/environment.md §3).
_TMP = Path(tempfile.gettempdir()) / "flexidepth-tests"
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DIR": str(_TMP / "wandb"),
    "WANDB_CACHE_DIR": str(_TMP / "wandb-cache"),
    "WANDB_CONFIG_DIR": str(_TMP / "wandb-config"),
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault(
    "HF_HOME", str(Path(os.environ.get("FLEXIDEPTH_CACHE", Path.home() / ".cache" / "flexidepth")) / "hf")
)

import pytest  # noqa: E402
import torch  # noqa: E402

from src.config import register  # noqa: E402

torch.set_num_threads(_THREADS)
register()  # resolvers + typed schemas for the configs tests compose (the entry points do it at import)

FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3")


def tiny_config(family: str = "llama", layers: int = 4, attn: str = "sdpa"):
    """Config-B sized random model (docs/environment.md §10): hidden 64, FFN 128, 4 heads / 2 KV heads."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    extra = {"head_dim": 16} if family == "qwen3" else {}
    cfg = cls(**common, **extra)
    cfg._attn_implementation = attn
    return cfg


def llama3_8b_config():
    """Llama-3-8B's architecture (no weights): for parameter and FLOP counts."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 4, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, attn), dtype=torch.float32)
    if family == "qwen2":  # q/k/v biases exist but start at zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    return model.eval()


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def smollm2_dir():
    from src.models.embedded import ensure_converted

    return ensure_converted("bfloat16")


@pytest.fixture(autouse=True)
def _autograd_mode_is_left_as_found():
    """A command or helper that switches autograd off globally (torch.set_grad_enabled(False)) silently moves
    every later caller in the process onto the inference path; fail the test that did it."""
    yield
    assert torch.is_grad_enabled(), (
        "this test left autograd switched off globally (use torch.no_grad() blocks)"
    )


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (restored afterwards): tiny models gain nothing
    from threads, and on a loaded machine two OpenMP threads wait on each other at every op (seconds per
    test). Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
