"""LayerStreamer and the `generate(..., streamer=...)` hook: the streamer sees exactly the tokens and layer
counts `generate` returns, prints every count, and does not change the outputs; the `src.generate` CLI."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src.flexidepth import FlexiDepthConfig, flexi_layers, inject, save_flexidepth
from src.flexidepth.generation import generate
from src.models.config import ModelConfig
from src.models.tokenizer import chat_prompt, load_tokenizer
from src.render.streamer import LayerStreamer

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "tiny_llama.yaml"), resolve=True)
ANNOTATION = re.compile(r"\[([0-9,]+)/([0-9]+)\]")


# ---------------------------------------------------------------------------------------- helpers
def mixed_tiny_llama(seed: int = 0):
    """`model=tiny_llama` (4 layers, the SmolLM2 vocabulary), injected (layers 2, 3 routed), with random
    router heads whose biases are centred on a calibration batch: about half the tokens run each routed
    layer, so tokens use 2, 3 or 4 layers."""
    from src.models.loader import load_base_model

    model = inject(load_base_model(ModelConfig(**TINY_LLAMA)).eval(), FlexiDepthConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flexi_layers(model):
            layer.router.head.weight.copy_(torch.randn(layer.router.head.weight.shape, generator=g) * 2.0)
            layer.router.bias.zero_()
            for p in layer.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ids = torch.randint(1, 49152, (4, 16), generator=g)
    for layer in flexi_layers(model):  # layer by layer: a later router sees the earlier ones' decisions
        logits = []
        hook = layer.router.register_forward_hook(lambda mod, args, out: logits.append(out))
        with torch.no_grad():
            model(ids)
        hook.remove()
        with torch.no_grad():
            layer.router.bias.fill_(-float(logits[0].float().median()))
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return mixed_tiny_llama(), load_tokenizer(ModelConfig(**TINY_LLAMA))


def _prompts(tokenizer, texts):
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(
            [chat_prompt(tokenizer, t) for t in texts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]


class Recorder:
    """A minimal streamer: keeps what it is given."""

    def __init__(self):
        self.steps, self.ended = [], 0

    def put(self, tokens, layers_used, valid):
        self.steps.append((tokens.clone(), layers_used.clone(), valid.clone()))

    def end(self):
        self.ended += 1


def _annotated_counts(text: str, total: int) -> list[int]:
    counts = []
    for used, tot in ANNOTATION.findall(text):
        assert int(tot) == total
        counts += [int(u) for u in used.split(",")]
    return counts


# ---------------------------------------------------------------------------------------- the hook
# The random tiny model's greedy choice is always the same token ('\n'); sampling (seeded, so repeatable)
# gives varied tokens and varied routes.
SAMPLE = dict(do_sample=True, seed=3)


def test_streamer_sees_exactly_what_generate_returns(tiny):
    model, tok = tiny
    ids, mask = _prompts(tok, ["What is 12 + 30?", "Repeat: go home", "Copy this sentence, please."])
    ref = generate(model, tok, ids, mask, max_new_tokens=10, eos_token_id=None, **SAMPLE)
    rec = Recorder()
    out = generate(model, tok, ids, mask, max_new_tokens=10, eos_token_id=None, streamer=rec, **SAMPLE)
    assert rec.ended == 1 and len(rec.steps) == ref.new_tokens.shape[1] == 10
    assert torch.equal(torch.stack([s[0] for s in rec.steps], 1), out.new_tokens)
    assert torch.equal(torch.stack([s[1] for s in rec.steps], 1), out.layers_used)
    assert torch.equal(torch.stack([s[2] for s in rec.steps], 1), out.valid)
    # the streamer changes nothing
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.run, ref.run) and torch.equal(out.gates, ref.gates)
    # the routers really mix run and skip here, so the layer counts carry information
    assert set(out.layers_used.flatten().tolist()) == {2, 3, 4}
    # greedy too (the path without a sampler)
    greedy = generate(model, tok, ids, mask, max_new_tokens=4, eos_token_id=None)
    rec = Recorder()
    out = generate(model, tok, ids, mask, max_new_tokens=4, eos_token_id=None, streamer=rec)
    assert torch.equal(out.sequences, greedy.sequences)
    assert torch.equal(torch.stack([s[1] for s in rec.steps], 1), greedy.layers_used)


def test_streamer_with_eos_marks_finished_rows(tiny):
    model, tok = tiny
    ids, mask = _prompts(tok, ["a", "b c d e"])
    probe = generate(model, tok, ids, mask, max_new_tokens=6, eos_token_id=None, **SAMPLE)
    eos = int(probe.new_tokens[0, 1])  # row 0 finishes at step 1
    assert eos not in probe.new_tokens[1, :2].tolist() and eos != int(probe.new_tokens[0, 0])
    rec = Recorder()
    out = generate(
        model, tok, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0, streamer=rec, **SAMPLE
    )
    assert torch.equal(torch.stack([s[0] for s in rec.steps], 1), out.new_tokens)
    assert torch.equal(torch.stack([s[2] for s in rec.steps], 1), out.valid)
    assert out.valid[0].tolist()[:3] == [True, True, False]
    assert out.new_tokens[0, 2:].tolist() == [0] * (out.new_tokens.shape[1] - 2)  # padded after EOS


def test_streamer_unrouted_model_reports_all_layers(tiny):
    from src.models.loader import load_base_model

    _, tok = tiny
    base = load_base_model(ModelConfig(**TINY_LLAMA)).eval()
    ids, mask = _prompts(tok, ["hello"])
    rec = Recorder()
    out = generate(base, tok, ids, mask, max_new_tokens=4, eos_token_id=None, streamer=rec)
    assert [int(s[1][0]) for s in rec.steps] == [4, 4, 4, 4] == out.layers_used[0].tolist()


# ---------------------------------------------------------------------------------------- LayerStreamer
def test_layer_streamer_prints_every_token_with_its_layers(tiny):
    model, tok = tiny
    ids, mask = _prompts(tok, ["What is 12 + 30?"])
    buf = io.StringIO()
    streamer = LayerStreamer(tok, num_layers=4, file=buf, color=False)
    out = generate(model, tok, ids, mask, max_new_tokens=12, eos_token_id=None, streamer=streamer, **SAMPLE)
    printed = buf.getvalue()
    used = out.layers_used[0].tolist()
    assert streamer.rows[0].tokens == out.new_tokens[0].tolist()
    assert streamer.rows[0].layers == used
    # one count per token, in order, each '[used/4]'
    assert _annotated_counts(printed, 4) == used
    # stripping the annotations gives back the decoded text (lone newlines are shown as '↵')
    plain = ANNOTATION.sub("", streamer.text()).replace("↵\n", "\n")
    assert plain == tok.decode(out.new_tokens[0].tolist(), skip_special_tokens=False)
    mean = sum(used) / len(used)
    assert printed.rstrip().endswith(f"-- 12 tokens, mean layers used {mean:.2f} / 4")


def test_layer_streamer_batch_buffers_rows(tiny):
    model, tok = tiny
    ids, mask = _prompts(tok, ["one", "two three four"])
    buf = io.StringIO()
    streamer = LayerStreamer(tok, num_layers=4, file=buf, color=False)
    out = generate(model, tok, ids, mask, max_new_tokens=5, eos_token_id=None, streamer=streamer, **SAMPLE)
    lines = buf.getvalue().splitlines()
    row_lines = [i for i, line in enumerate(lines) if line.startswith("[row ")]
    assert [lines[i][:7] for i in row_lines] == ["[row 0]", "[row 1]"]
    for b in range(2):
        assert _annotated_counts(streamer.text(b), 4) == out.layers_used[b].tolist()
        assert streamer.text(b) in buf.getvalue()


class CharTokenizer:
    """Token i decodes to CHARS[i]; token 9 and 10 are the two halves of one character (UTF-8 style)."""

    CHARS = ["a", "b", " c", "\n", "d"]

    def decode(self, ids, skip_special_tokens=False):
        text, i = "", 0
        while i < len(ids):
            if ids[i] == 9:
                text += "é" if i + 1 < len(ids) and ids[i + 1] == 10 else "\ufffd"
                i += 2 if i + 1 < len(ids) and ids[i + 1] == 10 else 1
            else:
                text += self.CHARS[ids[i]]
                i += 1
        return text


def test_layer_streamer_pieces_newlines_and_split_characters():
    buf = io.StringIO()
    s = LayerStreamer(CharTokenizer(), num_layers=8, file=buf, color=False)
    for tok, used in [(0, 8), (9, 5), (10, 6), (3, 7), (2, 4)]:
        s.put(torch.tensor([tok]), torch.tensor([used]), torch.tensor([True]))
    s.put(torch.tensor([1]), torch.tensor([3]), torch.tensor([False]))  # finished row: not printed
    s.end()
    # 'é' waits for its second token and carries both counts; the newline comes after its annotation
    assert s.text() == "a[8/8]é[5,6/8]↵[7/8]\n c[4/8]"
    assert buf.getvalue() == "a[8/8]é[5,6/8]↵[7/8]\n c[4/8]\n-- 5 tokens, mean layers used 6.00 / 8\n"
    assert s.rows[0].tokens == [0, 9, 10, 3, 2, 1] and s.rows[0].valid[-1] is False


def test_layer_streamer_colour_output():
    from src.render.html import layer_colour

    buf = io.StringIO()
    s = LayerStreamer(CharTokenizer(), num_layers=8, file=buf, color=True, min_layers=4)
    s.put(torch.tensor([0]), torch.tensor([4]))
    s.put(torch.tensor([4]), torch.tensor([8]))
    s.end()
    lo, hi = layer_colour(4, 8, 4), layer_colour(8, 8, 4)
    assert lo != hi
    assert f"\x1b[48;2;{lo[0]};{lo[1]};{lo[2]}m\x1b[30ma\x1b[0m\x1b[2m4\x1b[0m" in buf.getvalue()
    assert f"\x1b[48;2;{hi[0]};{hi[1]};{hi[2]}m\x1b[30md\x1b[0m\x1b[2m8\x1b[0m" in buf.getvalue()


# ---------------------------------------------------------------------------------------- CLI
def test_generate_cli_with_checkpoint(tmp_path, tiny):
    model, tok = tiny
    save_flexidepth(model, tmp_path / "ckpt")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.generate",
            "model=tiny_llama",
            f"ckpt_path={tmp_path / 'ckpt'}",
            'prompt="What is 12 + 30?"',
            "max_new_tokens=6",
        ],
        cwd=tmp_path,  # writes nothing there
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same tokens and counts in-process
    ids, mask = _prompts(tok, ["What is 12 + 30?"])
    ref = generate(model, tok, ids, mask, max_new_tokens=6, eos_token_id=tok.eos_token_id)
    n = int(ref.valid[0].sum())
    assert "routed layers [2, 3]" in proc.stdout
    assert _annotated_counts(proc.stdout, 4) == ref.layers_used[0, :n].tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
