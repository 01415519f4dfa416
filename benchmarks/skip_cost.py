"""What one skipped layer costs against one full layer and one deleted layer, at batch-1 decode.

    .venv/bin/python benchmarks/skip_cost.py --ckpt outputs/train/runs/<run>      # ~1.5 min idle

Variants (one process, interleaved rounds, medians of process CPU time per decoded token, one thread, fp32):
  base               the base model (SmolLM2-135M, the embedded model)
  pruned_routed      the base with every routed layer deleted (`prune_layers`)
  all_run            the checkpoint with every gate forced high: router cost only
  all_skip           every gate forced low: every routed layer takes the skip path
  all_skip_no_kv     the same with the K/V projection and rotary of skipped tokens replaced by a cached
                     result (what deferring or dropping their K/V could save at most; not a servable model)

Derived, per routed layer (R of them): full layer F = (base - pruned_routed) / R; router overhead =
(all_run - base) / R; skipped layer S = (all_skip - pruned_routed) / R, and S without K/V. A deleted layer
saves F; a skipped one saves F - S.
"""

from __future__ import annotations

import argparse

import common  # sys.path, offline env; med()
import torch

import src.flexidepth.layer as layer_module
from src.eval.speed import shared_copy
from src.eval.speed_timing import decode_timed, interleaved
from src.flexidepth import forced_gates, load_flexidepth
from src.methods.removal import prune_layers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="FlexiDepth folder (or run folder/flexidepth)")
    p.add_argument("--new", type=int, default=24, help="decode steps per call")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from src.flexidepth.checkpoint import resolve_checkpoint
    from src.models.embedded import ensure_converted

    base = AutoModelForCausalLM.from_pretrained(
        ensure_converted("bfloat16"), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    flexi = load_flexidepth(shared_copy(base), resolve_checkpoint(args.ckpt)).eval()
    routed = list(flexi.flexidepth.layer_indices)
    pruned = prune_layers(shared_copy(base), routed)
    ids = torch.randint(5, 40000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    real_kv = layer_module.project_kv
    kept: dict[int, tuple] = {}

    def cached_kv(family, attn, z, cos, sin):
        if attn.layer_idx not in kept:
            kept[attn.layer_idx] = real_kv(family, attn, z, cos, sin)
        return kept[attn.layer_idx]

    def variant(model, gate=None, no_kv=False):
        def fn():
            if no_kv:
                layer_module.project_kv = cached_kv
            try:
                if gate is None:
                    return decode_timed(model, ids, args.new)
                with forced_gates(flexi, gate):
                    return decode_timed(model, ids, args.new)
            finally:
                layer_module.project_kv = real_kv

        return fn

    fns = {
        "base": variant(base),
        "pruned_routed": variant(pruned),
        "all_run": variant(flexi, 1.0),
        "all_skip": variant(flexi, 0.0),
        "all_skip_no_kv": variant(flexi, 0.0, no_kv=True),
    }
    res = interleaved(fns, args.rounds, 1)
    ms = {k: common.med(v["cpu"]) / args.new * 1000 for k, v in res.items()}
    n = len(routed)
    full = (ms["base"] - ms["pruned_routed"]) / n
    skip = (ms["all_skip"] - ms["pruned_routed"]) / n
    skip_no_kv = (ms["all_skip_no_kv"] - ms["pruned_routed"]) / n
    print(
        f"SmolLM2-135M fp32, batch-1 decode, {args.new} steps after {args.prompt} tokens, {args.rounds} rounds"
    )
    print("\n| variant | CPU ms / token | ratio to base |\n|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.2f} | {v / ms['base']:.3f} |")
    print(f"\n| per routed layer ({n}) | ms | of a full layer |\n|---|---|---|")
    print(f"| full layer F | {full:.3f} | 1.00 |")
    print(
        f"| router overhead (run path) | {(ms['all_run'] - ms['base']) / n:.3f} | {(ms['all_run'] - ms['base']) / n / full:.2f} |"
    )
    print(f"| skipped layer S | {skip:.3f} | {skip / full:.2f} |")
    print(f"| skipped layer without K/V | {skip_no_kv:.3f} | {skip_no_kv / full:.2f} |")


if __name__ == "__main__":
    main()
