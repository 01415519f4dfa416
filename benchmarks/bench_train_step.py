"""Training-step cost: FlexiDepth (fwd + bwd + AdamW on router/adapter) vs fwd + bwd of the frozen base.

    .venv/bin/python benchmarks/bench_train_step.py               # default (~1-2 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_train_step.py --batch 8 --seq 256 --reps 5

Variants (same weights, same batch):
  base_fwd_bwd   frozen base model, loss = LM loss, backward to the input embeddings (the base's activation
                 backward through every layer; no weight gradients, no optimizer)
  base_fwd_bwd_from_routed  the same, but the backward stops at the first routed layer (what FlexiDepth's
                 backward needs: nothing below it trains): the like-for-like cost of router + adapter
  flexi_step     FlexiDepth training step: routed forward (masked training path), L_lm + alpha * L_skip,
                 backward (router/adapter grads), AdamW step, zero_grad
  flexi_step_ckpt  the same with gradient checkpointing on the decoder layers (HF's non-reentrant)

Time: median of --reps interleaved rounds after a warm-up, in this process. Peak memory: the rise of the
process RSS above its level before the step, sampled every ~0.5 ms by a thread; the script re-executes
itself with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the OS and RSS follows the live
allocations (otherwise glibc keeps freed memory and later steps read as free).
Targets (issue 5): time <= 1.15x and peak memory <= 1.1x of base_fwd_bwd.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # before anything allocates: re-exec with the setting
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import argparse  # noqa: E402
import copy  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import common  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from src.flexidepth import FlexiDepthConfig, inject, routed_forward  # noqa: E402


class PeakRSS:
    """Context manager: peak RSS rise (bytes) above the RSS at entry, sampled by a background thread."""

    def __init__(self, interval: float = 0.0005):
        self.proc = psutil.Process()
        self.interval = interval

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.rise = self.peak - self.start


def build(args):
    base = common.random_llama(args).train()
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--alpha", type=float, default=1e-3)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: stable on a shared machine; 0 = torch default)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(" ".join(sys.argv), flush=True)

    base = build(args)
    base.train()
    flexi = inject(copy.deepcopy(base), FlexiDepthConfig())
    flexi.train()
    flexi_ckpt = inject(copy.deepcopy(base), FlexiDepthConfig())
    flexi_ckpt.train()
    flexi_ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    opts = {
        id(m): torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
        for m in (flexi, flexi_ckpt)
    }
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)

    def base_step():
        emb = base.model.embed_tokens(ids).detach().requires_grad_(True)
        logits = base(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
        )
        loss.backward()

    first_routed = flexi.flexidepth.layer_indices[0]

    def cut_graph(module, args, kwargs):  # backward stops at the first routed layer, as in FlexiDepth
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs

    def base_half_step():
        hook = base.model.layers[first_routed].register_forward_pre_hook(cut_graph, with_kwargs=True)
        try:
            logits = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)
            )
            loss.backward()
        finally:
            hook.remove()

    def flexi_step(model):
        opt = opts[id(model)]
        out = routed_forward(model, ids, attention_mask=mask, labels=ids)
        loss = out.lm_loss + args.alpha * out.routes.skip_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {
        "base_fwd_bwd": base_step,
        "base_fwd_bwd_from_routed": base_half_step,
        "flexi_step": lambda: flexi_step(flexi),
        "flexi_step_ckpt": lambda: flexi_step(flexi_ckpt),
    }
    cpu: dict[str, list[float]] = {}
    times = common.median_times(fns, reps=args.reps, warmup=1, cpu=cpu)
    peaks = {}
    for name, fn in fns.items():
        rises = []
        for _ in range(2):
            with PeakRSS() as m:
                fn()
            rises.append(m.rise)
        peaks[name] = max(rises)
    ref_t, ref_m = common.med(times["base_fwd_bwd"]), peaks["base_fwd_bwd"]
    ref_c = common.med(cpu["base_fwd_bwd"])
    rows = [
        [
            name,
            common.med(ts),
            common.med(ts) / ref_t,
            common.med(cpu[name]) / ref_c,
            peaks[name] / 2**20,
            peaks[name] / ref_m,
        ]
        for name, ts in times.items()
    ]
    routed = len(flexi.flexidepth.layer_indices)
    common.print_table(
        f"train step, random Llama d={args.hidden} ff={args.inter} L={args.layers} (R={routed} routed), "
        f"batch {args.batch} x seq {args.seq}, fp32, {torch.get_num_threads()} threads",
        [
            "variant",
            "wall secs (median)",
            "time ratio (wall)",
            "time ratio (CPU)",
            "peak RSS rise MiB",
            "memory ratio",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
