"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end on CPU at toy sizes, and the compiled
branches (`compile_branches`) give the same tokens and routes as the eager model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_compile_branches_same_tokens_routes_and_keys():
    from src.flexidepth import FlexiDepthConfig, inject
    from src.flexidepth.generation import compile_branches, generate

    model = inject(tiny_model("llama"), FlexiDepthConfig(tau=0.5)).eval()
    keys = list(model.state_dict())
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    ref = generate(model, None, ids, torch.ones_like(ids), max_new_tokens=5, return_logits=True)
    n = compile_branches(model, backend="eager")  # dynamo tracing without code generation: fast on CPU
    assert n == model.config.num_hidden_layers + len(model.flexidepth.layer_indices)  # every FFN + adapters
    out = generate(model, None, ids, torch.ones_like(ids), max_new_tokens=5, return_logits=True)
    assert torch.equal(ref.sequences, out.sequences) and torch.equal(ref.run, out.run)
    torch.testing.assert_close(ref.logits, out.logits, rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == keys  # compiled in place: the base model's keys are kept


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "tests: rc 0" in report and "decode: rc 0" in report and "fit: ok" in report
    assert "skip_50_compiled" in report  # the compiled variants ran
    assert "| default |" in report  # the fit's step-time row
