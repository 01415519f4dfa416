"""The GPU check (issue 23, part 3): one command, sized for <= 8 minutes on one H200.

    bash benchmarks/gpu_check.sh                 # on the GPU machine (installs wheels carried in .whl/)
    python benchmarks/gpu_check.py --dry-run     # on CPU, toy sizes: checks that every step runs

Steps, each printing its tables (markdown, ratios side by side) and a one-line verdict:
  1. tests   pytest -m gpu (the GPU-marked tests: DeepSpeed ZeRO-2 through Lightning, bf16 paths)
  2. decode  benchmarks/bench_decode.py on a random Llama-3-8B shape (d 4096, ff 14336, 32 layers, 32/8
             heads, vocab 128256) in bf16 at batch 1, 8 and 64: HF generate, our loop, forced 25% / 50% of
             the routed layers skipped, rows skipping different and (batch > 1) the same layers, and the
             same with every FFN and adapter compiled (`compile_branches`)
  3. fit     20 optimizer steps of `python -m src.train` on a random ~1B Llama (d 2048, ff 5632, 22
             layers), bf16-mixed, once with the default single-device strategy and once with
             trainer=deepspeed_zero2: seconds per step after 5 warm-up steps and peak GPU memory, with the
             ZeRO-2 / default ratios

--dry-run runs the same code on CPU at toy sizes (the fit without DeepSpeed, which Lightning refuses on
CPU): tests/test_gpu_check.py runs it so that the script is known to work before a GPU is lent.
Writes everything it prints to --out/gpu_check.md as well (default: $OUT when set, else outputs/gpu_check).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = ["--hidden", "4096", "--inter", "14336", "--layers", "32", "--heads", "32", "--kv-heads", "8"]
LLAMA3_8B += ["--vocab", "128256"]
TOY = [
    "--hidden",
    "64",
    "--inter",
    "128",
    "--layers",
    "4",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--vocab",
    "512",
]
FIT_1B = [
    "model.arch.hidden_size=2048",
    "model.arch.intermediate_size=5632",
    "model.arch.num_hidden_layers=22",
    "model.arch.num_attention_heads=32",
    "model.arch.num_key_value_heads=4",
    "model.dtype=bfloat16",
]


def run(cmd: list[str], log: list[str], timeout: int) -> tuple[int, str]:
    """Run `cmd` from the repository root, echo and keep its output; (exit code, output)."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out, rc = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout} s", 124
    print(out[-6000:], flush=True)
    log += [f"$ {' '.join(cmd)}  (rc {rc}, {time.perf_counter() - t0:.0f} s)", "", out[-20000:], ""]
    return rc, out


def step_tests(dry: bool, log: list[str]) -> str:
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    rc, out = run(args + (["--collect-only"] if dry else []), log, timeout=240)
    return f"tests: rc {rc} ({out.strip().splitlines()[-1] if out.strip() else 'no output'})"


def step_decode(dry: bool, log: list[str]) -> str:
    shape = TOY if dry else LLAMA3_8B
    device = ["--device", "cpu", "--dtype", "fp32"] if dry else ["--device", "cuda", "--dtype", "bf16"]
    sizes = ["--batches", "1,8", "--new", "4", "--prompt", "8", "--reps", "1"]
    if not dry:
        sizes = ["--batches", "1,8,64", "--new", "32", "--prompt", "64", "--reps", "5"]
    cmd = [sys.executable, "benchmarks/bench_decode.py", *shape, *device, *sizes, "--smollm2", "none"]
    # the dry run traces the compiled variants without generating code (inductor takes minutes on CPU)
    cmd += ["--compile"] + (["--compile-backend", "eager"] if dry else [])
    rc, _ = run(cmd, log, timeout=300)
    return f"decode: rc {rc}"


FIT_SCRIPT = r"""
import json, sys, time, torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict
sys.path.insert(0, {root!r})
import src.train as T  # registers the config's resolvers and schemas, as the command does

class StepTimer(Callback):
    def __init__(self, warmup):
        self.warmup, self.times, self.t0 = warmup, [], None
    def on_train_batch_start(self, trainer, *a):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
    def on_train_batch_end(self, trainer, *a):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.t0)

timer = StepTimer(5)
configured = T.trainer_arguments
def with_timer(s):  # the run's own callbacks, plus the step timer
    arguments = configured(s)
    arguments["callbacks"].append(timer)
    return arguments
T.trainer_arguments = with_timer
with initialize_config_dir(config_dir={conf!r}, version_base="1.3"):
    cfg = compose("train", overrides={overrides!r})
with open_dict(cfg):
    cfg.paths.output_dir = {out!r}
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
metrics = T.train(cfg)
steady = timer.times[timer.warmup:] or timer.times
peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
print("FIT " + json.dumps({{"steps": len(timer.times), "s_per_step": sorted(steady)[len(steady) // 2],
                           "peak_gib": peak, "val_ppl": float(metrics.get("val/ppl", float("nan")))}}))
"""


def step_fit(dry: bool, out_dir: Path, log: list[str]) -> str:
    import json

    common = [
        "logger=none",
        "trainer.max_steps=20",
        "trainer.val_check_interval=20",
        "trainer.limit_val_batches=2",
    ]
    common += ["data.micro_batch_size=4", "data.max_length=512", "model=tiny_llama", "data=builtin"]
    if dry:
        common = ["debug=tiny", "logger=none", "trainer.max_steps=7"]
        strategies = {"default": ["trainer=cpu"]}
    else:
        common += FIT_1B + ["trainer.precision=bf16-mixed", "trainer.devices=1"]
        strategies = {"default": ["trainer=gpu"], "zero2": ["trainer=deepspeed_zero2"]}
    tokenizer = os.environ.get("FLEXIDEPTH_GPU_TOKENIZER")  # carried by gpu_check.sh --fetch
    if tokenizer and not dry:
        common.append(f"model.tokenizer={tokenizer}")
    res = {}
    for name, extra in strategies.items():
        overrides = [*common, *extra, f"run_name=gpu_check_{name}"]
        script = FIT_SCRIPT.format(
            root=str(ROOT), conf=str(ROOT / "conf"), overrides=overrides, out=str(out_dir / f"fit_{name}")
        )
        rc, out = run([sys.executable, "-c", script], log, timeout=600 if dry else 240)
        line = [x for x in out.splitlines() if x.startswith("FIT ")]
        res[name] = json.loads(line[-1][4:]) if rc == 0 and line else {"rc": rc}
    rows = ["| strategy | s / step | peak GPU GiB | val ppl |", "|---|---|---|---|"]
    for name, r in res.items():
        if "s_per_step" in r:
            rows.append(f"| {name} | {r['s_per_step']:.3f} | {r['peak_gib']:.2f} | {r['val_ppl']:.1f} |")
        else:
            rows.append(f"| {name} | failed (rc {r['rc']}) | | |")
    if "s_per_step" in res.get("zero2", {}) and "s_per_step" in res.get("default", {}):
        z, d = res["zero2"], res["default"]
        rows.append(
            f"| zero2 / default | {z['s_per_step'] / d['s_per_step']:.3f} | {z['peak_gib'] / d['peak_gib']:.3f} | |"
        )
    table = "\n".join(rows)
    print(table, flush=True)
    log += ["### fit", "", table, ""]
    ok = all("s_per_step" in r for r in res.values())
    return f"fit: {'ok' if ok else 'FAILED'} ({', '.join(res)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: check the script itself")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "outputs" / "gpu_check"))
    p.add_argument("--steps", default="tests,decode,fit", help="comma list of tests, decode, fit")
    args = p.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "CPU dry run" if args.dry_run else torch.cuda.get_device_name(0)
    log = [f"# GPU check on {dev} (torch {torch.__version__})", ""]
    verdicts = []
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - {"tests", "decode", "fit"})
    if unknown:
        print(f"error: --steps: unknown step(s) {unknown}; known: tests, decode, fit", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if "tests" in steps:
        verdicts.append(step_tests(args.dry_run, log))
    if "decode" in steps:
        verdicts.append(step_decode(args.dry_run, log))
    if "fit" in steps:
        verdicts.append(step_fit(args.dry_run, out_dir, log))
    verdicts.append(f"total {time.perf_counter() - t0:.0f} s")
    log += ["## Verdicts", "", *[f"- {v}" for v in verdicts], ""]
    tmp = out_dir / "gpu_check.md.tmp"
    tmp.write_text("\n".join(log))
    os.replace(tmp, out_dir / "gpu_check.md")
    print("\n".join(verdicts), flush=True)
    return 0 if all("rc 0" in v or "ok" in v or v.startswith("total") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
