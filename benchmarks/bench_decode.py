"""Decode throughput: HF generate on the base model vs our cached loop with FlexiDepth (real skipping).

    .venv/bin/python benchmarks/bench_decode.py                   # default (~4-5 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_decode.py --smollm2 none --reps 5 --new 64 --profile
    python benchmarks/bench_decode.py --device cuda --dtype bf16 --hidden 4096 --inter 14336 --layers 32 \
        --heads 32 --kv-heads 8 --vocab 128256 --batches 1,8,64 --smollm2 none --compile   # GPU check

Variants, measured side by side in one process (interleaved rounds, median of --reps after a warm-up):
  hf_base    (a) HF `generate` on the base model (the reference: ratio 1.0)
  ours_base      our `generate` loop on the base model (loop overhead vs HF's)
  ours_off   (b) our loop on the FlexiDepth model with routing disabled (target <= 5% slower than (a))
  skip_00        routing on, every gate forced high: router cost only, nothing skipped
  skip_25    (c) 25% of routed layers skipped per token (target: batch 1 >= 0.9 x FLOP-ideal; batch 8 >= 1.0)
  skip_50    (c) 50% skipped
  hf_skip_50     HF `generate` on the FlexiDepth model at 50% (the fast path is used inside HF's loop too)
  skip_XX_aligned  (batch > 1) every row skips the same routed layers: the best case for a batch
  *_compiled     (--compile) the same loop with every layer's FFN and adapter compiled
                 (`compile_branches`), base and FlexiDepth alike

Skips are forced (no trained checkpoint needed): each router still runs on every token (its cost is
paid), then its output is replaced by a fixed pattern: token row b skips routed layer j iff
floor((b + j + 1) f) > floor((b + j) f), i.e. exactly a fraction f of consecutive routed layers per row and a
fraction f of the rows at every layer (batch 8 mixes running and skipped rows in one forward).
tokens/s counts generated tokens only; the time includes the (short, --prompt tokens) prefill.
speedups are ratios of medians vs hf_base, by wall time and by process CPU time (with one thread, the
CPU time excludes the time other processes on a shared machine took from us; use it when wall times of
identical runs scatter, as the min-max column shows).
FLOP-ideal = base MACs / FlexiDepth MACs per token (flops.py: K/V, router and adapter of skipped layers
counted, lm_head included, attention scores excluded).
"""

from __future__ import annotations

import argparse
import copy
import sys

import common  # noqa: F401  (sys.path, offline env)
import torch

from src.flexidepth import FlexiDepthConfig, flexi_layers, forced_gates, inject, set_routing
from src.flexidepth.flops import flop_ideal_speedup
from src.flexidepth.generation import compile_branches, generate


def skip_pattern(model, frac: float, aligned: bool = False):
    """forced_gates callable: router computed (cost paid) then replaced by the deterministic pattern.

    aligned=False: row b skips routed layer j iff floor((b+j+1) f) > floor((b+j) f) (rows differ);
    aligned=True: the same with b = 0 for every row (all rows skip the same layers: best case for batches).
    """
    layers = {layer.layer_index: layer for layer in flexi_layers(model)}
    first = min(layers)

    patterns: dict[tuple[int, int], torch.Tensor] = {}

    def gate(z: torch.Tensor, index: int) -> torch.Tensor:
        torch.sigmoid(layers[index].router(z))  # the router's cost is paid, its output discarded
        key = (index, z.shape[0])
        if key not in patterns:  # built once per layer and batch size: no pattern ops in the timed loop
            k = torch.arange(z.shape[0], device=z.device)[:, None] * (0 if aligned else 1) + (index - first)
            skip = torch.floor((k + 1) * frac) > torch.floor(k * frac)
            patterns[key] = torch.where(skip, 0.1, 0.9).float()
        return patterns[key].expand(z.shape[:2])

    return gate


def smollm2(dtype):
    from transformers import AutoModelForCausalLM

    from src.models.embedded import ensure_converted

    path = ensure_converted("bfloat16")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def bench_model(name: str, base, args) -> list[str]:
    device = torch.device(args.device)
    base = base.to(device)
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    model = inject(copy.deepcopy(base), FlexiDepthConfig())
    model.generation_config.eos_token_id = None
    cfg = model.flexidepth.config
    compiled = {}
    if args.compile:  # compiled copies (weights copied: the eager variants stay eager)
        compiled["base"], compiled["model"] = copy.deepcopy(base), copy.deepcopy(model)
        for m in compiled.values():
            compile_branches(m, dynamic=True, backend=args.compile_backend)
    n_new = args.new
    tables = []
    for bsz in args.batches:
        g = torch.Generator().manual_seed(bsz)
        ids = torch.randint(3, base.config.vocab_size, (bsz, args.prompt), generator=g)
        mask = torch.ones_like(ids)
        if bsz > 1:  # left padding on half of the rows
            mask[1::2, : args.prompt // 2] = 0
            ids = ids.masked_fill(mask == 0, 0)
        ids, mask = ids.to(device), mask.to(device)

        def synced(out=None):
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        def hf(m):
            with torch.inference_mode():
                m.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=n_new,
                    min_new_tokens=n_new,
                    do_sample=False,
                    pad_token_id=0,
                )
            synced()

        def ours(m, routing=True, frac=None, aligned=False):
            routed = m if hasattr(m, "flexidepth") else model
            set_routing(routed, routing)
            try:
                if frac is None:
                    return synced(generate(m, None, ids, mask, max_new_tokens=n_new))
                with forced_gates(routed, skip_pattern(routed, frac, aligned)):
                    return synced(generate(m, None, ids, mask, max_new_tokens=n_new))
            finally:
                set_routing(routed, True)

        def hf_skip(frac):
            with forced_gates(model, skip_pattern(model, frac)):
                hf(model)

        fns = {
            "hf_base": lambda: hf(base),
            "ours_base": lambda: ours(base),
            "ours_off": lambda: ours(model, routing=False),
            "skip_00": lambda: ours(model, frac=0.0),
            "skip_25": lambda: ours(model, frac=0.25),
            "skip_50": lambda: ours(model, frac=0.5),
            "hf_skip_50": lambda: hf_skip(0.5),
        }
        if bsz > 1:
            fns["skip_25_aligned"] = lambda: ours(model, frac=0.25, aligned=True)
            fns["skip_50_aligned"] = lambda: ours(model, frac=0.5, aligned=True)
        if compiled:
            fns["ours_base_compiled"] = lambda: ours(compiled["base"])
            fns["skip_00_compiled"] = lambda: ours(compiled["model"], frac=0.0)
            fns["skip_25_compiled"] = lambda: ours(compiled["model"], frac=0.25)
            fns["skip_50_compiled"] = lambda: ours(compiled["model"], frac=0.5)
        # check the pattern really skips what it says
        for frac in (0.25, 0.5):
            got = 1.0 - ours(model, frac=frac).run.float().mean().item()
            assert abs(got - frac) < 0.02 + 1.0 / (bsz * len(model.flexidepth.layer_indices)), (frac, got)
        cpu: dict[str, list[float]] = {}
        times = common.median_times(fns, reps=args.reps, warmup=1, cpu=cpu)
        ref, ref_cpu = common.med(times["hf_base"]), common.med(cpu["hf_base"])
        rows = []
        for var, ts in times.items():
            frac = {
                "skip_00": 0.0,
                "skip_25": 0.25,
                "skip_50": 0.5,
                "hf_skip_50": 0.5,
                "skip_25_aligned": 0.25,
                "skip_50_aligned": 0.5,
                "skip_00_compiled": 0.0,
                "skip_25_compiled": 0.25,
                "skip_50_compiled": 0.5,
            }.get(var)
            ideal = flop_ideal_speedup(base.config, cfg, frac) if frac is not None else 1.0
            speed, speed_cpu = ref / common.med(ts), ref_cpu / common.med(cpu[var])
            rows.append(
                [
                    var,
                    bsz * n_new / common.med(ts),
                    speed,
                    speed_cpu,
                    ideal,
                    speed / ideal,
                    speed_cpu / ideal,
                    f"{min(ts):.2f}-{max(ts):.2f}",
                ]
            )
        tables.append(
            common.print_table(
                f"{name}, batch {bsz}, {n_new} new tokens, prompt {args.prompt}, "
                + (f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)),
                [
                    "variant",
                    "tok/s",
                    "speedup (wall)",
                    "speedup (CPU time)",
                    "FLOP-ideal",
                    "wall/ideal",
                    "CPU/ideal",
                    "wall secs (min-max)",
                ],
                rows,
            )
        )
        if args.profile:
            profile(fns, ["hf_base", "skip_50"])
    return tables


def profile(fns, names):
    from torch.profiler import ProfilerActivity, profile

    for name in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fns[name]()
        print(f"--- profile {name} (top ops by self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--new", type=int, default=8, help="new tokens per generate call")
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: stable on a shared machine; 0 = torch default)",
    )
    p.add_argument("--smollm2", choices=["none", "bf16", "fp32", "both"], default="fp32")
    p.add_argument("--skip-random", action="store_true", help="only the SmolLM2 runs")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per batch size")
    p.add_argument("--device", default="cpu", help="cpu | cuda (timings synchronise the device)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the random Llama's dtype")
    p.add_argument("--compile", action="store_true", help="add *_compiled variants (compile_branches)")
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (eager: tracing only)"
    )
    args = p.parse_args(argv)
    if args.skip_random and args.smollm2 == "none":
        p.error("--skip-random with --smollm2 none leaves nothing to measure")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(" ".join(sys.argv), flush=True)
    if not args.skip_random:
        bench_model(
            f"random Llama d={args.hidden} ff={args.inter} L={args.layers} {args.dtype}",
            common.random_llama(args),
            args,
        )
    dtypes = {
        "none": [],
        "bf16": [torch.bfloat16],
        "fp32": [torch.float32],
        "both": [torch.bfloat16, torch.float32],
    }[args.smollm2]
    for dtype in dtypes:
        try:
            base = smollm2(dtype)
        except Exception as err:  # the embedded model may not be installed in this checkout
            print(f"SmolLM2 skipped: {type(err).__name__}: {err}", flush=True)
            break
        bench_model(f"SmolLM2-135M {str(dtype).removeprefix('torch.')}", base, args)


if __name__ == "__main__":
    main()
