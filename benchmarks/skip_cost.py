"""What one skipped layer costs against one full layer and one deleted layer, at batch-1 decode.

    .venv/bin/python benchmarks/skip_cost.py --ckpt outputs/train/runs/<run>      # ~2 min idle
    .venv/bin/python benchmarks/skip_cost.py --ckpt outputs/train/runs/<run> --dtype bfloat16

Variants, decoded in lockstep (src/eval/speed_timing.py: step t of every variant before step t + 1 of any, in
a fresh seeded order per step; process CPU time per decoded token, median over rounds, one thread):
  base                 the base model (SmolLM2-135M, the embedded model)
  pruned_routed        the base with every routed layer deleted (`prune_layers`)
  all_run              the checkpoint with every gate forced high: router cost only
  all_skip             every gate forced low: every routed layer takes the skip path
  all_skip_no_kv       all_skip with the K/V projection and rotary of skipped tokens replaced by a cached
                       result (what deferring or dropping their K/V could save at most; not a servable model)

Derived, per routed layer (R of them): full layer F = (base - pruned_routed) / R; router overhead =
(all_run - base) / R; skipped layer S = (all_skip - pruned_routed) / R, and S without K/V. A deleted layer saves
F; a skipped one saves F - S.
"""

from __future__ import annotations

import argparse

import common  # sys.path, offline env
import torch

import src.flexidepth.layer as layer_module
from src.eval.speed import shared_copy
from src.eval.speed_timing import DecodeSteps, lockstep
from src.flexidepth import flexi_layers, load_flexidepth
from src.methods.removal import prune_layers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="FlexiDepth folder (or run folder/flexidepth)")
    p.add_argument("--new", type=int, default=24, help="decode steps per prompt")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from src.models.embedded import ensure_converted

    dtype = getattr(torch, args.dtype)
    base = AutoModelForCausalLM.from_pretrained(
        ensure_converted("bfloat16"), dtype=dtype, attn_implementation="sdpa"
    ).eval()
    flexi = load_flexidepth(shared_copy(base), args.ckpt).eval()
    layers = flexi_layers(flexi)
    routed = list(flexi.flexidepth.layer_indices)
    pruned = prune_layers(shared_copy(base), routed)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 40000, (1, args.prompt), generator=g) for _ in range(args.prompts)]
    real_kv = layer_module.project_kv
    kept: dict[tuple, tuple] = {}

    def cached_kv(family, attn, z, cos, sin):
        key = (attn.layer_idx, z.shape[1])
        if key not in kept:
            kept[key] = real_kv(family, attn, z, cos, sin)
        return kept[key]

    def setup(gate=None, no_kv=False):
        """Untimed, before every step of a variant: the flexi model's forced gate and K/V projection as
        this variant needs them (the variants share one model)."""

        def prepare():
            layer_module.project_kv = cached_kv if no_kv else real_kv
            for layer in layers:
                layer.force_gate = gate

        return prepare

    variants = {
        "base": (base, setup()),
        "pruned_routed": (pruned, setup()),
        "all_run": (flexi, setup(1.0)),
        "all_skip": (flexi, setup(0.0)),
        "all_skip_no_kv": (flexi, setup(0.0, no_kv=True)),
    }
    units = {
        name: (lambda u, m=model, prep=prep: DecodeSteps(m, prompts[u], args.new, prepare=prep))
        for name, (model, prep) in variants.items()
    }
    try:
        res = lockstep(units, len(prompts), args.rounds, warmup=1)
    finally:
        setup()()
    tokens = args.new * len(prompts)
    ms = {k: common.med(v["cpu"]) / tokens * 1000 for k, v in res.items()}
    n = len(routed)
    full = (ms["base"] - ms["pruned_routed"]) / n
    print(
        f"SmolLM2-135M {args.dtype}, batch-1 decode, {args.prompts} prompts x {args.new} steps after "
        f"{args.prompt} tokens, lockstep, {args.rounds} rounds"
    )
    print("\n| variant | CPU ms / token | ratio to base |\n|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.2f} | {v / ms['base']:.3f} |")
    print(f"\n| per routed layer ({n}) | ms | of a full layer |\n|---|---|---|")
    print(f"| full layer F | {full:.3f} | 1.00 |")
    rows = [("router overhead (run path)", ms["all_run"] - ms["base"])]
    rows += [
        ("skipped layer S", ms["all_skip"] - ms["pruned_routed"]),
        ("skipped layer without K/V", ms["all_skip_no_kv"] - ms["pruned_routed"]),
    ]
    for label, total in rows:
        print(f"| {label} | {total / n:.3f} | {total / n / full:.2f} |")


if __name__ == "__main__":
    main()
