"""Recipe search on the embedded SmolLM2-135M: train many configurations, measure each on the held-out sets.

    .venv/bin/python experiments/recipe_search.py baselines --out search/baselines.json
    .venv/bin/python experiments/recipe_search.py measure outputs/train/runs/<name> --out search/runs.jsonl
    .venv/bin/python experiments/recipe_search.py train --grid search/grid.jsonl --out search/runs.jsonl \
        --workers 2 [--device cuda]

`train`: each line of the grid file is {"name": ..., "overrides": ["loss.objective=kd", ...]}; every entry is
trained with the framework's own `src.train.train` (Hydra composition of conf/train.yaml plus the overrides,
`logger=none`), then its exported checkpoint is measured with `src.eval.curves.tau_curve` on the held-out
sets (a threshold sweep: layers skipped and ppl per set). Results are appended as JSON lines, so an interrupted
search keeps what it finished. `--workers` processes run entries in parallel (on a GPU they share it).

`measure`: the same numbers for runs already trained with `python -m src.train` (give their run folders).

`baselines`: the base model, ShortGPT, LaCo and random skipping (identity skip path) at k = 2 and 4, on the
same held-out windows.

Held-out text is never trained on (src/data/mixture.py); the search reads the *training-side* validation
numbers only for the log and picks recipes by the held-out table, which is the evaluation the issue asks for:
the final comparison (src.compare) reruns the chosen recipes from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

# The held-out sets and the threshold curve are src.compare's (conf/compare.yaml `curves`): tau = 0.5 (as
# trained) plus the thresholds that skip `curve_k` routed layers on calibration text (training-side Lee
# articles, `tau_for_k`); the measured skip count on held-out text then differs per set.
_CURVES = OmegaConf.load(ROOT / "conf" / "compare.yaml").curves
HELDOUT = list(_CURVES.heldout)
CURVE_K = [float(k) for k in _CURVES.curve_k]
CALIBRATION_TEXTS = int(_CURVES.calibration_texts)


def held_sets(tokenizer, max_tokens: int):
    from src.eval.curves import heldout_sets

    return heldout_sets(tokenizer, HELDOUT, max_length=256, max_tokens=max_tokens)


def load(device: str, dtype: str):
    import torch

    from src.models.loader import load_base_model
    from src.models.tokenizer import load_tokenizer

    model_cfg = {
        "name_or_path": "embedded:smollm2-135m-instruct",
        "dtype": dtype,
        "attn_implementation": "sdpa",
    }
    tok = load_tokenizer(model_cfg)
    model = load_base_model(model_cfg).eval().to(torch.device(device))
    return model_cfg, tok, model


def run_entry(entry: dict, args) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from src.train import train

    out_dir = Path(args.runs_dir) / entry["name"]
    overrides = [
        "logger=none",
        f"run_name={entry['name']}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        *entry["overrides"],
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        if args.device == "cuda":
            cfg.trainer.enable_progress_bar = False
    t0 = time.time()
    metrics = train(cfg)
    train_s = time.time() - t0
    return measure_checkpoint(entry, out_dir / "flexidepth", args, train_s, metrics)


def measure_checkpoint(entry: dict, ckpt: Path, args, train_s: float | None, metrics: dict) -> dict:
    """Own-threshold and threshold-curve numbers of one exported FlexiDepth folder on the held-out sets."""
    import torch

    from src.eval.curves import measure, tau_curve
    from src.flexidepth.calibrate import tau_for_k
    from src.methods import build_method
    from src.methods.base import calibration_batches
    from src.models.tokenizer import pad_token_id

    model_cfg, tok, model = load(args.device, args.dtype)
    build_method({"name": "flexidepth"}).apply(model, ckpt=ckpt)
    sets = held_sets(tok, args.max_tokens)
    pad = pad_token_id(tok)
    own = measure(model, sets, batch_size=16, pad_id=pad)
    device = next(model.parameters()).device
    cal = [
        (i.to(device), m.to(device))
        for i, m in calibration_batches(tok, {"texts": CALIBRATION_TEXTS})
    ]
    taus = sorted({0.5, *(round(tau_for_k(model, cal, k), 6) for k in CURVE_K)})
    curve = tau_curve(model, sets, taus, batch_size=16, pad_id=pad)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {
        "name": entry["name"],
        "overrides": entry["overrides"],
        "train_s": None if train_s is None else round(train_s, 1),
        "val": {k: v for k, v in metrics.items() if k.startswith(("val/", "skip/"))},
        "own": own,
        "curve": curve,
    }


def worker(entries: list[dict], args, rank: int) -> None:
    import torch

    torch.set_num_threads(args.threads)
    for entry in entries:
        try:
            result = run_entry(entry, args)
        except Exception as err:  # one failed configuration must not stop the search
            result = {
                "name": entry["name"],
                "overrides": entry["overrides"],
                "error": repr(err),
                "trace": traceback.format_exc()[-2000:],
            }
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[worker {rank}] {entry['name']}: {'error' if 'error' in result else 'done'}", flush=True)


def cmd_train(args) -> None:
    import multiprocessing as mp

    entries = [json.loads(line) for line in Path(args.grid).read_text().splitlines() if line.strip()]
    done = set()
    if Path(args.out).is_file():
        done = {json.loads(line)["name"] for line in Path(args.out).read_text().splitlines() if line.strip()}
    todo = [e for e in entries if e["name"] not in done]
    print(f"{len(todo)} of {len(entries)} entries to run with {args.workers} workers", flush=True)
    if args.workers <= 1:
        worker(todo, args, 0)
        return
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(todo[r :: args.workers], args, r)) for r in range(args.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def cmd_measure(args) -> None:
    """Measure runs already trained with `python -m src.train` (their run folders), appended like `train`'s."""
    import torch

    torch.set_num_threads(args.threads)
    for run in args.runs:
        run = Path(run)
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        entry = {"name": run.name, "overrides": [f"(trained with src.train: {run})"]}
        result = measure_checkpoint(entry, run / "flexidepth", args, None, metrics.get("metrics", {}))
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"{run.name}: done", flush=True)


def cmd_baselines(args) -> None:
    import copy

    from src.eval.curves import measure
    from src.methods import build_method
    from src.models.tokenizer import pad_token_id

    model_cfg, tok, base = load(args.device, args.dtype)
    sets = held_sets(tok, args.max_tokens)
    pad = pad_token_id(tok)
    results = {"base": {"k": 0, "sets": measure(base, sets, 16, pad)}}
    for k in (2, 4):
        for name in ("shortgpt", "laco", "random_skip"):
            model = copy.deepcopy(base)
            method = {"name": name, "k": k, "k32": None}
            if name == "random_skip":
                method.update(match_rates=False, seed=0)
            applied = build_method(method).apply(model, tokenizer=tok)
            results[f"{name}_k{k}"] = {
                "k": k,
                "removed": applied.removed,
                "sets": measure(model, sets, 16, pad, num_layers=30),
            }
            print(
                name,
                k,
                {s: round(v["ppl"], 1) for s, v in results[f"{name}_k{k}"]["sets"].items()},
                flush=True,
            )
    Path(args.out).write_text(json.dumps(results, indent=2))


def cmd_summary(args) -> None:
    """Markdown table of a search: per run, own-threshold skip/ppl and ppl at k = 2, 4 per held-out set,
    against the best static baseline at the same k (from `baselines` output or a compare run's curves.json)."""
    from src.eval.curves import interpolate

    ref = json.loads(Path(args.baselines).read_text())
    points = ref.get("points", ref)  # compare's curves.json keeps static systems under "points"
    base = ref.get("base", points.get("base", {}))
    base_sets = base.get("sets", base)
    runs = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    ks = (2, 4)
    head = "| run | train s | " + " | ".join(
        f"{s} own (skip / x base) | {s} k2 (best static) | {s} k4 (best static)" for s in HELDOUT
    )
    print(head + " |")
    print("|" + "---|" * (2 + 3 * len(HELDOUT)))
    for r in runs:
        if "error" in r:
            print(f"| {r['name']} | error: {r['error'][:80]} |")
            continue
        cells = [r["name"], str(r["train_s"])]
        for s in HELDOUT:
            own = r["own"][s]
            cells.append(f"{own['layers_skipped']:.2f} / {own['ppl'] / base_sets[s]['ppl']:.2f}")
            pts = [(p["sets"][s]["layers_skipped"], p["sets"][s]["ppl"]) for p in r["curve"]]
            for k in ks:
                fd = interpolate(pts, k)
                best = min(
                    (v["sets"][s]["ppl"] for n, v in points.items() if n != "base" and v.get("k") == k),
                    default=float("nan"),
                )
                mark = "" if fd is None else (" **win**" if fd < best else "")
                cells.append(f"{'-' if fd is None else f'{fd:.1f}'} ({best:.1f}){mark}")
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["train", "measure", "baselines", "summary"])
    p.add_argument("runs", nargs="*", help="measure: src.train run folders (outputs/train/runs/<name>)")
    p.add_argument("--baselines", help="summary: baselines JSON (this script's `baselines` output)")
    p.add_argument("--grid")
    p.add_argument("--out", required=True)
    p.add_argument("--runs-dir", default=str(ROOT / "outputs" / "search"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-tokens", type=int, default=8192)
    args = p.parse_args()
    if args.mode != "summary":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    modes = {"train": cmd_train, "measure": cmd_measure, "baselines": cmd_baselines, "summary": cmd_summary}
    modes[args.mode](args)


if __name__ == "__main__":
    main()
