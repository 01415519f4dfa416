"""Distillation training step on SmolLM2-135M: the full teacher forward vs the teacher sharing the student's
unrouted prefix (src/lit/teacher.py), and where the step's time goes.

    .venv/bin/python benchmarks/bench_kd_step.py                      # fp32 and bf16 (~3-6 min on 2 cores)
    .venv/bin/python benchmarks/bench_kd_step.py --dtypes float32 --reps 5

The step is the default recipe's (objective kd, T = 2, micro-batch 4 x 128 tokens, routed layers 15..29,
released-style random routers so that about half the tokens skip): teacher logits, routed forward (masked
training path), KL over the full vocabulary + alpha * skip loss, backward, AdamW on router/adapter.
Variants (same weights, same batch, interleaved rounds, median after a warm-up):
  step_full_teacher     teacher = the whole model with routing off (30 layers, as before)
  step_shared_teacher   teacher = layers 15..29 from the student's own layer-15 input (what training runs now)
Parts (each timed alone): teacher_full_fwd, teacher_from_layer15, student_fwd (routed, autograd on),
lm_head_and_kl (the LM head on one hidden state and the KL, forward only), student_fwd+kl+backward+adamw.
bf16: the model's weights in bf16 (what `model.dtype` resolves to on a CPU with native bf16); fp32: the rest.
"""

from __future__ import annotations

import argparse
import sys

import common
import torch

from src.flexidepth import FlexiDepthConfig, inject, routed_forward
from src.lit.objectives import kd_loss_sum
from src.lit.teacher import capture_layer_input, full_teacher_logits, student_and_teacher, teacher_from_layer
from src.models.config import ModelConfig
from src.models.loader import load_base_model


def run(dtype: str, args) -> list[list]:
    model = load_base_model(
        ModelConfig(
            **{
                "name_or_path": "embedded:smollm2-135m-instruct",
                "dtype": dtype,
                "attn_implementation": "sdpa",
            }
        )
    )
    torch.manual_seed(1)
    inject(model, FlexiDepthConfig(init="released"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    start = model.flexidepth.layer_indices[0]

    def finish(out, teacher):
        loss = kd_loss_sum(out.logits, teacher, ids, 2.0) / ids.numel() + 1e-3 * out.routes.skip_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_full():
        teacher = full_teacher_logits(model, ids, mask)
        finish(routed_forward(model, ids, mask), teacher)

    def step_shared():
        finish(*student_and_teacher(model, lambda: routed_forward(model, ids, mask)))

    with capture_layer_input(model.model.layers[start]) as captured:
        with torch.no_grad():
            routed_forward(model, ids, mask)
    teacher = full_teacher_logits(model, ids, mask)

    def student_fwd():
        routed_forward(model, ids, mask)

    def head_and_kl():
        with torch.no_grad():
            hidden = torch.randn(args.batch, args.seq, model.config.hidden_size, dtype=model.dtype)
            kd_loss_sum(model.lm_head(hidden), teacher, ids, 2.0)

    def backward_adamw():
        out = routed_forward(model, ids, mask)
        finish(out, teacher)

    fns = {
        "step_full_teacher": step_full,
        "step_shared_teacher": step_shared,
        "teacher_full_fwd": lambda: full_teacher_logits(model, ids, mask),
        f"teacher_from_layer{start}": lambda: teacher_from_layer(
            model, start, captured["args"], captured["kwargs"]
        ),
        "student_fwd": student_fwd,
        "lm_head_and_kl": head_and_kl,
        "student_fwd+kl+backward+adamw": backward_adamw,
    }
    times = common.median_times(fns, reps=args.reps, warmup=1)
    ref = common.med(times["step_full_teacher"])
    return [[dtype, name, common.med(ts), common.med(ts) / ref] for name, ts in times.items()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable on a shared machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(" ".join(sys.argv), flush=True)
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run(dtype, args)
    common.print_table(
        f"kd train step, SmolLM2-135M (15 of 30 layers routed), batch {args.batch} x seq {args.seq}, "
        f"{torch.get_num_threads()} threads",
        ["dtype", "variant / part", "wall secs (median)", "ratio to step_full_teacher"],
        rows,
    )


if __name__ == "__main__":
    main()
