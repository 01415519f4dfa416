"""Where batch-1 decode time goes on SmolLM2-135M: torch.profiler tables (top ops by self CPU time) and op
counts per decode step, for the base model and a FlexiDepth model (released-init routers: gates near 0.5,
so tokens mix running and skipping; or a trained checkpoint with --ckpt).

    .venv/bin/python benchmarks/profile_decode.py                     # ~1 min on 2 cores
    .venv/bin/python benchmarks/profile_decode.py --ckpt outputs/train/runs/<run> --tau 0.7 --rows 20

Timed region: `--new` decode steps after an untimed prefill of a `--prompt`-token prompt of random token ids
(`decode_timed`, src/eval/speed_timing.py), one thread, fp32.
"""

from __future__ import annotations

import argparse
import copy

import common  # noqa: F401  (sys.path, offline env)
import torch

from src.eval.speed_timing import decode_timed
from src.flexidepth import FlexiDepthConfig, inject, set_tau


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ckpt", default=None, help="FlexiDepth folder / run folder (default: released-init routers)"
    )
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--rows", type=int, default=16, help="rows of each profiler table")
    p.add_argument("--batch", type=int, default=1, help="decode batch (rows share the prompt)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from src.models.embedded import ensure_converted

    base = AutoModelForCausalLM.from_pretrained(
        ensure_converted("bfloat16"), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    flexi = copy.deepcopy(base)
    if args.ckpt:
        from src.methods import build_method

        build_method({"name": "flexidepth"}).apply(flexi, ckpt=args.ckpt)
    else:
        torch.manual_seed(0)
        inject(flexi, FlexiDepthConfig(init="released"))
    if args.tau is not None:
        set_tau(flexi, args.tau)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (1, args.prompt), generator=g).expand(args.batch, -1)
    for name, model in (("base", base), ("flexidepth", flexi)):
        decode_timed(model, ids, args.new)  # warm-up
        routes: list = []
        wall, cpu = decode_timed(model, ids, args.new, routes)
        skipped = float((~torch.cat(routes)).sum(-1).float().mean()) if routes else 0.0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode_timed(model, ids, args.new)
        ev = prof.key_averages()
        aten = sum(e.count for e in ev if e.key.startswith("aten::")) / (args.new + 1)
        print(
            f"--- {name}, batch {args.batch}: {args.new} decode steps {wall:.3f} s wall / {cpu:.3f} s CPU "
            f"({args.batch * args.new / wall:.1f} tok/s); layers skipped per token {skipped:.2f}; "
            f"aten ops per forward {aten:.0f} (the profile includes the prefill)"
        )
        print(ev.table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)


if __name__ == "__main__":
    main()
