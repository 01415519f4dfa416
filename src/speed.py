"""Measured speed of a trained checkpoint against its base model and really pruned static baselines, with
the held-out perplexity of every system: the speed-quality plane a deployment sees.

    python -m src.speed ckpt_path=outputs/train/runs/<run>                       # conf/speed.yaml
    python -m src.speed ckpt_path=<run> 'taus=[0.3,0.5,0.7]' prompts=2 new_tokens=16 rounds=3 batch=0

Systems, all built in one process from one base model (weights shared, not copied):
  base              the base model (ratio 1.0)
  flexidepth@<tau>  the checkpoint at each threshold of `taus` (its fast path: real skipping)
  shortgpt_k<k>     ShortGPT with k layers *deleted* (`prune_layers`: no router, no K/V, no call for them;
                    the KV cache holds only the kept layers): what a user deploying it runs

Timings (one intra-op thread by default), interleaved: every round runs every system once, the order
rotating per round, after `warmup` untimed runs; the median over `rounds` is reported, by wall time and by
process CPU time (CPU time excludes what other processes on a shared machine took from us):
  decode at batch 1 (each prompt alone) and at `batch` rows (prompts cycled): only the decode steps are
      timed (the prefill before them is not); tokens/s = rows * new_tokens / seconds;
  prefill at batch 1 over `prefill_length` tokens: tokens/s = prefill_length / seconds.
Ratios are base seconds / system seconds from the same rounds; our loop itself is timed against HF
`generate` on the base model (`loop_vs_hf`), so each ratio can also be read against HF's loop. FLOP-ideal = base MACs / system MACs per
token (src/flexidepth/flops.py; a deleted layer costs 0, FlexiDepth counts K/V, router and adapter of a
skipped layer) at the layers the system skipped on the timed generated tokens.

Prompts and the prefill text are windows of held-out text (src/data/mixture.py HELDOUT_SETS, never
trained on). Held-out perplexity per set reuses the curves code of src.compare (src/eval/curves.py).
The comparison at equal measured speedup interpolates FlexiDepth's perplexity (log-linear) along its
curve of (measured batch-1 decode speedup, ppl) at each ShortGPT point's speedup; outside the range its
taus reach there is no value (never extrapolated). A router skips more on some text than on other text, so
with `per_set_speed=true` batch-1 decode is also timed on each held-out set's own prompts
(`decode_b1@<set>`) and each set is compared at the speedups measured on its own prompts. Greedy
continuations are not the text the perplexity scores (a small model's greedy text repeats itself, and the
router treats repeated tokens differently), so with `text_decode=true` (the default) each set's own text is
also decoded teacher-forced, one token per step with the KV cache (`text_b1@<set>`): the same per-token work
as generation, on the set's own text (the last `new_tokens` of the first windows of `prompt_length` +
`new_tokens` tokens of its documents; the perplexity scores `ppl_max_length`-token windows of the same
documents, so the contexts, and with them the routes, differ: compare the layers skipped of both). The
comparison at equal speedup is given on both bases.

Writes <output_dir>/speed.json, speed.md and ppl_vs_speedup.png (one panel per held-out set).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .utils.cli import entry_point
from .utils.errors import PreflightError
from .utils.files import atomic_write_text

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ settings
@dataclass
class SpeedSettings:
    """The keys of conf/speed.yaml that shape the measurement (checked by `speed_settings`)."""

    taus: list[float]
    shortgpt_k: list[int]
    prompts: int = 2
    prompt_length: int = 32
    new_tokens: int = 24
    batch: int = 8
    prefill_length: int = 256
    rounds: int = 3
    warmup: int = 1
    threads: int = 1
    heldout: list[str] = field(default_factory=lambda: ["lee"])
    ppl_max_tokens: int | None = 2048
    ppl_max_length: int = 256
    ppl_batch_size: int = 8
    calibration_texts: int = 32
    per_set_speed: bool = False
    text_decode: bool = True


def speed_settings(cfg: DictConfig) -> SpeedSettings:
    """conf/speed.yaml's measurement keys, checked; ValueError naming the key otherwise (before any model
    work). taus: numbers in [0, 1]; shortgpt_k: whole numbers >= 1; counts >= 1 (batch, ppl_max_tokens:
    0 / null switch that part off); heldout: known held-out set names."""
    from .data.mixture import check_heldout

    def whole(key: str, low: int, allow_none: bool = False) -> int | None:
        v = cfg.get(key)
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {v!r}")
        return int(v)

    taus = cfg.get("taus")
    if taus is None or isinstance(taus, (str, int, float)) or len(taus) == 0:
        raise ValueError(f"taus must be a non-empty list of thresholds in [0, 1], got {taus!r}")
    for t in taus:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"taus: every threshold must be a number in [0, 1], got {t!r}")
    ks = cfg.get("shortgpt_k") or []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"shortgpt_k: every k must be an integer >= 1, got {k!r}")
    heldout = check_heldout(list(cfg.get("heldout") or []), "heldout")
    if not heldout:
        raise ValueError("heldout must name at least one held-out set (prompts come from them)")
    return SpeedSettings(
        taus=sorted({float(t) for t in taus}),
        shortgpt_k=sorted({int(k) for k in ks}),
        prompts=whole("prompts", 1),
        prompt_length=whole("prompt_length", 1),
        new_tokens=whole("new_tokens", 1),
        batch=whole("batch", 0),
        prefill_length=whole("prefill_length", 0),
        rounds=whole("rounds", 1),
        warmup=whole("warmup", 0),
        threads=whole("threads", 1),
        heldout=heldout,
        ppl_max_tokens=whole("ppl_max_tokens", 0, allow_none=True),
        ppl_max_length=whole("ppl_max_length", 2),
        ppl_batch_size=whole("ppl_batch_size", 1),
        calibration_texts=whole("calibration_texts", 1),
        per_set_speed=_flag(cfg, "per_set_speed"),
        text_decode=_flag(cfg, "text_decode"),
    )


def _flag(cfg: DictConfig, key: str) -> bool:
    v = cfg.get(key, False)
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


# ------------------------------------------------------------------------------------------ machine
def machine_record(dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """Where a measurement was taken: CPU model and the flags that decide bf16 speed (avx2, avx512f,
    avx512_bf16, amx_bf16, amx_tile; from /proc/cpuinfo where it exists), logical CPUs, intra-op threads,
    the 1-minute load average (a shared machine), dtype, torch / transformers versions, GPU name if any."""
    import transformers

    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu_model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if flags and key.strip() == "model name":
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {
        "cpu_model": cpu_model,
        "cpu_flags": {f: f in flags for f in wanted},
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": load1,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ------------------------------------------------------------------------------------------ text
def heldout_prompts(tokenizer, names: list[str], n: int, length: int) -> list[list[int]]:
    """`n` prompts of exactly `length` tokens: the first windows of that length of each held-out set's
    documents, taken round robin over `names` (set 1 doc 1, set 2 doc 1, ..., set 1 doc 2, ...).

    Raises ValueError naming `prompts` / `prompt_length` when the sets hold fewer such windows."""
    from .eval.curves import heldout_sets

    pools = []
    for name in names:
        windows = heldout_sets(tokenizer, [name], max_length=length, max_tokens=max(n, 1) * length * 4)[name]
        pools.append([w for w in windows if len(w) == length])
    out: list[list[int]] = []
    for i in range(max((len(p) for p in pools), default=0)):
        for pool in pools:
            if i < len(pool) and len(out) < n:
                out.append(list(pool[i]))
    if len(out) < n:
        raise ValueError(
            f"prompts={n} x prompt_length={length}: held-out sets {names} give only {len(out)} windows"
        )
    return out


# ------------------------------------------------------------------------------------------ timing
def _clear_routes(model) -> None:
    state = getattr(model, "flexidepth", None)
    if state is not None:
        state.recorder.clear()


@torch.inference_mode()
def decode_timed(
    model,
    input_ids: torch.Tensor,
    new_tokens: int,
    routes: list | None = None,
    forced: torch.Tensor | None = None,
):
    """Decode of `new_tokens` tokens, one per step with the KV cache, after an untimed prefill of
    `input_ids` [B, P] (no padding): greedy (each step's input is the previous step's argmax), or, with
    `forced` [B, new_tokens], teacher-forced (step i's input is forced[:, i] at position P + i: the per-token
    work of decoding that text, so its routes are those of a full forward over input_ids ++ forced).

    Returns (wall seconds, CPU seconds) of the decode steps only. When `routes` is a list, each step's
    routed-layer decisions [B, R] (bool) are appended to it (outside the timed region).
    """
    if forced is not None and tuple(forced.shape) != (input_ids.shape[0], new_tokens):
        raise ValueError(
            f"forced: expected shape {(input_ids.shape[0], new_tokens)}, got {tuple(forced.shape)}"
        )
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    bsz, plen = input_ids.shape
    device = input_ids.device
    _clear_routes(model)
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    wall = cpu = 0.0
    for step in range(new_tokens):
        if forced is not None:
            nxt = forced[:, step : step + 1]
        pos = torch.full((bsz, 1), plen + step, dtype=torch.long, device=device)
        c0, t0 = time.process_time(), time.perf_counter()
        _clear_routes(model)
        out = model(input_ids=nxt, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        if routes is not None and getattr(model, "flexidepth", None) is not None:
            routes.append(model.flexidepth.recorder.stacked()[1][:, -1].cpu())
    return wall, cpu


@torch.inference_mode()
def prefill_timed(model, input_ids: torch.Tensor) -> tuple[float, float]:
    """One cached forward over `input_ids` [1, P] (the prompt's prefill). Returns (wall, CPU) seconds."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    _clear_routes(model)
    c0, t0 = time.process_time(), time.perf_counter()
    model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(fns: dict[str, Any], rounds: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    """Call every fn (returning (wall, cpu) seconds) `warmup` times untimed, then `rounds` rounds, each
    system once per round, the order rotating per round. Returns {name: {"wall": [...], "cpu": [...]}}."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    res = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = fns[name]()
            res[name]["wall"].append(wall)
            res[name]["cpu"].append(cpu)
    return res


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


# ------------------------------------------------------------------------------------------ systems
@dataclass
class System:
    """One timed system: `model` (shared by the FlexiDepth taus), its threshold (None: not routed), the
    layers it deletes (static baselines)."""

    label: str
    kind: str  # base | flexidepth | shortgpt
    model: Any
    tau: float | None = None
    k: int | None = None
    removed: list[int] = field(default_factory=list)
    ckpt: str | None = None  # FlexiDepth systems: the label of their checkpoint (one curve per checkpoint)

    def prepare(self) -> None:
        if self.tau is not None:
            from .flexidepth import set_tau

            set_tau(self.model, self.tau)


def shared_copy(model):
    """A deep copy of `model` whose parameters and buffers are the original's tensors (no memory copied):
    module structure and config are new, so layers can be deleted or wrapped without touching `model`."""
    memo = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def checkpoint_labels(paths: list[Path]) -> list[str]:
    """Labels of the timed checkpoints: `flexidepth` for the first (ckpt_path), the run folder's name for
    the others (more_ckpts; `<run>/flexidepth` -> `<run>`). ValueError naming more_ckpts on a repeat."""
    labels = ["flexidepth"]
    for path in paths[1:]:
        path = Path(path)
        labels.append(path.parent.name if path.name == "flexidepth" else path.name)
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"more_ckpts: checkpoint labels must be unique (run folder names), repeated: {dup}")
    return labels


def build_systems(base, ckpts, taus, shortgpt_k, tokenizer, calibration_texts: int) -> list[System]:
    """base, <label>@tau for each (label, checkpoint folder) of `ckpts` and each tau (one injected copy per
    checkpoint), shortgpt_k<k> (pruned copies; Block Influence measured once on the base model's
    training-side calibration text)."""
    from .baselines import apply_method, checkpoint_method
    from .baselines.removal import prune_layers
    from .baselines.shortgpt import block_influence, shortgpt_layers
    from .methods.base import calibration_batches

    systems = [System("base", "base", base)]
    for name, ckpt in ckpts:
        method = checkpoint_method(ckpt)
        if method != "flexidepth":
            raise ValueError(
                f"ckpt_path: {ckpt} holds a {method!r} checkpoint; src.speed times FlexiDepth ones"
            )
        flexi = shared_copy(base)
        apply_method(flexi, {"name": "flexidepth"}, ckpt=ckpt)
        flexi.eval()
        systems += [System(f"{name}@{t:g}", "flexidepth", flexi, tau=float(t), ckpt=name) for t in taus]
    if shortgpt_k:
        bi = block_influence(base, calibration_batches(tokenizer, {"texts": calibration_texts}))
        for k in shortgpt_k:
            removed = shortgpt_layers(bi, k)
            systems.append(
                System(
                    f"shortgpt_k{k}",
                    "shortgpt",
                    prune_layers(shared_copy(base), removed),
                    k=k,
                    removed=removed,
                )
            )
    return systems


# ------------------------------------------------------------------------------------------ measure
def measure_speed(
    systems: list[System],
    prompts: list[list[int]],
    prefill: list[int] | None,
    s: SpeedSettings,
    per_set: dict[str, list[list[int]]] | None = None,
    texts: dict[str, list[list[int]]] | None = None,
):
    """Interleaved timings of every system (see the module docstring). Returns {label: {mode: {...}}}
    with modes decode_b1, decode_b1@<set> (per_set: that held-out set's own prompts), text_b1@<set>
    (texts: windows of prompt_length + new_tokens tokens of that set, the last new_tokens decoded
    teacher-forced), decode_b<batch> (batch > 1), prefill (prefill_length > 0), each holding the wall/CPU
    seconds per round, their medians and tokens/s; plus per system `layers_skipped` {batch-1 mode: routed
    layers skipped per decoded token} and layers_skipped_decode (= layers_skipped["decode_b1"])."""
    device = next(systems[0].model.parameters()).device
    one = [torch.tensor([p], device=device) for p in prompts]
    modes: dict[str, tuple[int, Any]] = {}  # mode -> (tokens per call, fn(system))
    batch1_modes: list[str] = []

    def batch1(ids_list, forced_list=None):
        forced_list = forced_list or [None] * len(ids_list)

        def fn(sys_: System, routes=None):
            sys_.prepare()
            walls = [
                decode_timed(sys_.model, ids, s.new_tokens, routes, forced)
                for ids, forced in zip(ids_list, forced_list, strict=True)
            ]
            return sum(w for w, _ in walls), sum(c for _, c in walls)

        return fn

    modes["decode_b1"] = (len(one) * s.new_tokens, batch1(one))
    batch1_modes.append("decode_b1")
    for name, set_prompts in (per_set or {}).items():
        ids_list = [torch.tensor([p], device=device) for p in set_prompts]
        modes[f"decode_b1@{name}"] = (len(ids_list) * s.new_tokens, batch1(ids_list))
        batch1_modes.append(f"decode_b1@{name}")
    for name, windows in (texts or {}).items():
        ids_list = [torch.tensor([w[: s.prompt_length]], device=device) for w in windows]
        forced = [torch.tensor([w[s.prompt_length :]], device=device) for w in windows]
        modes[f"text_b1@{name}"] = (len(ids_list) * s.new_tokens, batch1(ids_list, forced))
        batch1_modes.append(f"text_b1@{name}")
    if s.batch > 1:
        rows = torch.tensor([prompts[i % len(prompts)] for i in range(s.batch)], device=device)

        def decb(sys_: System):
            sys_.prepare()
            return decode_timed(sys_.model, rows, s.new_tokens)

        modes[f"decode_b{s.batch}"] = (s.batch * s.new_tokens, decb)
    if prefill is not None:
        pre = torch.tensor([prefill], device=device)

        def pref(sys_: System):
            sys_.prepare()
            return prefill_timed(sys_.model, pre)

        modes["prefill"] = (len(prefill), pref)

    # layers skipped on the decoded tokens (greedy or forced: the same in every round): one untimed pass
    out: dict[str, dict] = {}
    for sys_ in systems:
        skipped: dict[str, float] = {}
        for mode in batch1_modes:
            if sys_.kind == "flexidepth":
                routes: list[torch.Tensor] = []
                modes[mode][1](sys_, routes)
                run = torch.cat(routes)  # [steps * prompts, R]
                skipped[mode] = float((~run).sum(-1).float().mean())
            else:
                skipped[mode] = float(sys_.k or 0)
        out[sys_.label] = {"layers_skipped": skipped, "layers_skipped_decode": skipped["decode_b1"]}
    for mode, (tokens, fn) in modes.items():
        fns = {sys_.label: (lambda sys_=sys_: fn(sys_)) for sys_ in systems}
        log.info("speed: timing %s (%d systems x %d rounds)", mode, len(fns), s.rounds)
        res = interleaved(fns, s.rounds, s.warmup)
        for label, r in res.items():
            wall, cpu = _median(r["wall"]), _median(r["cpu"])
            out[label][mode] = {
                "wall_s": r["wall"],
                "cpu_s": r["cpu"],
                "wall_median_s": wall,
                "cpu_median_s": cpu,
                "tokens": tokens,
                "tokens_per_s": tokens / wall if wall > 0 else float("inf"),
            }
    base = out[systems[0].label]
    for label, r in out.items():
        for mode in modes:
            r[mode]["speedup_wall"] = base[mode]["wall_median_s"] / r[mode]["wall_median_s"]
            r[mode]["speedup_cpu"] = base[mode]["cpu_median_s"] / max(r[mode]["cpu_median_s"], 1e-12)
    return out


def loop_vs_hf(
    model, prompts: list[list[int]], new_tokens: int, rounds: int, warmup: int
) -> dict[str, float]:
    """Our generation loop (`flexidepth.generation.generate`, the loop every speedup above is measured in)
    against HF `model.generate` on the same base model: greedy, batch 1, each prompt generating exactly
    `new_tokens` tokens, prefill included in both; interleaved rounds, medians of wall seconds.

    Returns {"ours_s", "hf_s", "hf_over_ours"} (hf_over_ours > 1: our loop is faster than HF's), so a
    speedup over our base loop can be read against HF `generate` as speedup * hf_over_ours."""
    from .flexidepth.generation import generate

    device = next(model.parameters()).device
    ids_list = [torch.tensor([p], device=device) for p in prompts]
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else pad

    def timed(call):
        def fn():
            c0, t0 = time.process_time(), time.perf_counter()
            with torch.inference_mode():
                for ids in ids_list:
                    call(ids)
            return time.perf_counter() - t0, time.process_time() - c0

        return fn

    fns = {
        "ours": timed(
            lambda ids: generate(model, None, ids, torch.ones_like(ids), max_new_tokens=new_tokens)
        ),
        "hf": timed(
            lambda ids: model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        ),
    }
    res = interleaved(fns, rounds, warmup)
    ours, hf = _median(res["ours"]["wall"]), _median(res["hf"]["wall"])
    return {"ours_s": ours, "hf_s": hf, "hf_over_ours": hf / ours if ours > 0 else float("nan")}


def flop_ideal(config, system: System, layers_skipped: float) -> float:
    """Base MACs / system MACs per token (lm_head included; flops.py)."""
    from .flexidepth.flops import layer_macs, model_macs_per_token

    base = model_macs_per_token(config)
    if system.kind == "flexidepth":
        cfg = system.model.flexidepth.config
        return base / model_macs_per_token(config, cfg, layers_skipped)
    return base / (base - layers_skipped * layer_macs(config).full)


def set_mode(results: dict, mode: str, name: str) -> str:
    """`<mode>@<name>` when the run timed held-out set `name` in that mode (decode_b1: per_set_speed, its own
    prompts; text_b1: text_decode, its own text), else `mode`."""
    return f"{mode}@{name}" if f"{mode}@{name}" in results.get("modes", []) else mode


def equal_speedup(results: dict, mode: str = "decode_b1", basis: str = "wall") -> list[dict]:
    """Per held-out set and ShortGPT point: its ppl and FlexiDepth's ppl interpolated (log-linear) along the
    curve of (measured `mode` speedup by `basis` wall | cpu time, ppl) at the same speedup; None outside the
    curve's measured range. The curve's points are taken in speedup order (`curves.interpolate`), so on a
    noisy machine neighbouring taus may swap: read it with the speed table."""
    from .eval.curves import interpolate

    if basis not in ("wall", "cpu"):
        raise ValueError(f"basis must be 'wall' or 'cpu', got {basis!r}")
    key = f"speedup_{basis}"
    rows = []
    systems = results["systems"]
    for ckpt in results.get("ckpts", {"flexidepth": None}):
        flexi = [
            s for s in systems.values() if s["kind"] == "flexidepth" and s.get("ckpt", "flexidepth") == ckpt
        ]
        rows += _equal_rows(results, flexi, ckpt, mode, basis, key, interpolate)
    return rows


def _equal_rows(results, flexi, ckpt, mode, basis, key, interpolate) -> list[dict]:
    """`equal_speedup`'s rows for one checkpoint's curve (`flexi`: its systems in tau order)."""
    rows = []
    systems = results["systems"]
    for name in results["heldout"]:
        m = set_mode(results, mode, name)
        if m not in results["modes"]:
            continue
        curve = [(s["speed"][m][key], s["ppl"][name]["ppl"]) for s in flexi]
        for label, s in systems.items():
            if s["kind"] != "shortgpt":
                continue
            x = s["speed"][m][key]
            f = interpolate(curve, x)
            rows.append(
                {
                    "set": name,
                    "checkpoint": ckpt,
                    "baseline": label,
                    "basis": basis,
                    "mode": m,
                    "speedup": x,
                    "baseline_ppl": s["ppl"][name]["ppl"],
                    "flexidepth_ppl": f,
                    "flexidepth_wins": None if f is None else f < s["ppl"][name]["ppl"],
                }
            )
    return rows


# ------------------------------------------------------------------------------------------ reports
def speed_markdown(results: dict) -> str:
    """speed.md: the machine, the speed table (per system: layers skipped on generated tokens, tokens/s
    and speedups per mode, FLOP-ideal), held-out ppl per set and the comparison at equal measured speedup."""
    m = results["machine"]
    st = results["settings"]
    modes = results["modes"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of the listed"
    lines = [
        f"# Measured speed of `{results['ckpt']}` on `{results['model']}` ({results['num_layers']} layers)",
        "",
        *(
            [
                "Checkpoints (one tau curve each): "
                + "; ".join(f"`{n}` = `{p}`" for n, p in results["ckpts"].items())
                + ".",
                "",
            ]
            if len(results.get("ckpts", {})) > 1
            else []
        ),
        f"Machine: {m['cpu_model']} ({m['logical_cpus']} logical CPUs; flags: {flags}); {m['threads']} "
        f"thread(s), {m['dtype']}, torch {m['torch']}, transformers {m['transformers']}; 1-min load "
        f"{m['load_avg_1min']}. Ratios are only comparable on like hardware; on a shared machine compare the "
        "CPU-time ratios too.",
        "",
        f"{st['prompts']} held-out prompts of {st['prompt_length']} tokens, {st['new_tokens']} new tokens "
        f"(greedy; decode steps timed, not the prefill), batch {st['batch']}, prefill of "
        f"{st['prefill_length']} tokens; {st['rounds']} interleaved rounds after {st['warmup']} warm-up, "
        "medians. Speedup = base seconds / system seconds (wall; CPU in brackets). `decode_b1@<set>`: greedy "
        "continuations of that set's prompts; `text_b1@<set>`: that set's own text decoded teacher-forced, one "
        "token per step (held-out text, not a model's own continuation).",
        "",
    ]
    head = ["system", "layers skipped / gen. token", "FLOP-ideal"]
    for mode in modes:
        head += [f"{mode} tok/s", f"{mode} speedup"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in results["systems"].items():
        cells = [label, f"{s['speed']['layers_skipped_decode']:.2f}", f"{s['flop_ideal']:.3f}"]
        for mode in modes:
            r = s["speed"][mode]
            cells += [f"{r['tokens_per_s']:.1f}", f"{r['speedup_wall']:.3f} ({r['speedup_cpu']:.3f})"]
        lines.append("| " + " | ".join(cells) + " |")
    ref = results.get("loop_vs_hf")
    if ref:
        lines += [
            "",
            f"Our loop against HF `generate` on the base model (batch 1, prefill included): {ref['ours_s']:.3f} s vs "
            f"{ref['hf_s']:.3f} s, HF / ours = {ref['hf_over_ours']:.3f}; a speedup above times this is the "
            "speedup over HF `generate`.",
        ]
    lines += ["", *ideal_markdown(results)]
    sets = results["heldout"]
    if not sets:  # ppl_max_tokens=0: speed only
        return "\n".join(lines) + "\n"
    lines += ["", "## Held-out perplexity (layers skipped on the set / ppl)", ""]
    lines += ["| system | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for label, s in results["systems"].items():
        cells = [f"{s['ppl'][n]['layers_skipped']:.2f} / {s['ppl'][n]['ppl']:.2f}" for n in sets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## At equal measured decode speedup (batch 1)",
        "",
        "FlexiDepth's ppl interpolated (log-linear) along its (measured speedup, ppl) curve at each baseline's "
        "measured speedup, by wall time and by CPU time; '-' = outside the speedups its taus reached. Basis "
        "`set's text`: speed on the set's own text; `own prompts`: speed on greedy continuations.",
        "",
        "| held-out set | checkpoint | baseline | basis | speedup | baseline ppl | FlexiDepth ppl | FlexiDepth better |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["equal_speedup"]:
        f = "-" if r["flexidepth_ppl"] is None else f"{r['flexidepth_ppl']:.2f}"
        win = "-" if r["flexidepth_wins"] is None else ("yes" if r["flexidepth_wins"] else "no")
        lines.append(
            f"| {r['set']} | {r.get('checkpoint', 'flexidepth')} | {r['baseline']} | {basis_cell(r)} | {r['speedup']:.3f} | "
            f"{r['baseline_ppl']:.2f} | {f} | {win} |"
        )
    return "\n".join(lines) + "\n"


def ideal_markdown(results: dict) -> list[str]:
    """Per system and batch-1 mode: routed layers skipped per decoded token, FLOP-ideal speedup at that
    depth, measured speedup (wall) and measured / ideal (issue 23's T1 reads this table)."""
    modes = [m for m in results["modes"] if m.startswith(("decode_b1", "text_b1"))]
    lines = [
        "## Batch-1 speedup against its FLOP-ideal (layers skipped per decoded token: measured / ideal)",
        "",
        "| system | " + " | ".join(modes) + " |",
        "|" + "---|" * (len(modes) + 1),
    ]
    for label, s in results["systems"].items():
        cells = []
        for mode in modes:
            sk = s["speed"].get("layers_skipped", {}).get(mode, s["speed"]["layers_skipped_decode"])
            ideal = s.get("flop_ideal_by_mode", {}).get(mode, s["flop_ideal"])
            got = s["speed"][mode]["speedup_wall"]
            cells.append(f"{sk:.2f}: {got:.3f} / {ideal:.3f} = {got / ideal:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def basis_cell(row: dict) -> str:
    """`wall` / `cpu`, plus `, set's text` (teacher-forced decode of the set's own text) or `, own prompts`
    (greedy continuations of the set's prompts) when timed per set."""
    mode = row.get("mode", "")
    own = ", set's text" if mode.startswith("text_b1@") else (", own prompts" if "@" in mode else "")
    return f"{row.get('basis', 'wall')}{own}"


def plot_speed(results: dict, path: str | Path) -> Path:
    """Held-out ppl vs measured batch-1 decode speedup, one panel per set: FlexiDepth's tau curve (line, in
    tau order), the base at 1.0 and the static baselines as points. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = results["heldout"]
    systems = results["systems"]
    bases = [
        b for b in ("text_b1", "decode_b1") if any(set_mode(results, b, n) in results["modes"] for n in names)
    ]
    titles = {"text_b1": "speed on the set's text (teacher-forced)", "decode_b1": "speed on greedy decoding"}
    fig, axes = plt.subplots(
        len(bases), len(names), figsize=(4.2 * len(names), 3.6 * len(bases)), squeeze=False
    )
    for row, basis in enumerate(bases):
        for ax, name in zip(axes[row], names, strict=True):
            m = set_mode(results, basis, name)
            if m not in results["modes"]:
                ax.set_visible(False)
                continue
            _panel(ax, systems, m, name, f"{name}: {titles[basis]}")
        axes[row][0].set_ylabel("held-out perplexity")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    from .utils.files import atomic_save_figure

    try:
        return atomic_save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def _panel(ax, systems: dict, m: str, name: str, title: str) -> None:
    """One panel of `plot_speed`: ppl on set `name` against the speedup measured in mode `m`."""
    ckpts = list(
        dict.fromkeys(s.get("ckpt") or "flexidepth" for s in systems.values() if s["kind"] == "flexidepth")
    )
    for ckpt in ckpts:
        flexi = [
            s
            for s in systems.values()
            if s["kind"] == "flexidepth" and (s.get("ckpt") or "flexidepth") == ckpt
        ]
        xs = [s["speed"][m]["speedup_wall"] for s in flexi]
        ys = [s["ppl"][name]["ppl"] for s in flexi]
        label = "FlexiDepth (tau curve)" if len(ckpts) == 1 else f"{ckpt} (tau curve)"
        ax.plot(xs, ys, "-o", ms=3, label=label)
        for s, x, y in zip(flexi, xs, ys, strict=True):
            ax.annotate(f"{s['tau']:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    for kind, marker in (("base", "*"), ("shortgpt", "s")):
        pts = [
            (s["speed"][m]["speedup_wall"], s["ppl"][name]["ppl"])
            for s in systems.values()
            if s["kind"] == kind
        ]
        if pts:
            label = kind if kind == "base" else "ShortGPT (pruned)"
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=40, label=label, zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("measured decode speedup vs base (batch 1)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)


# ------------------------------------------------------------------------------------------ command
def run_speed(cfg: DictConfig) -> dict[str, Any]:
    """The whole measurement (module docstring); returns the results written to speed.json."""
    from .eval import curves as C
    from .flexidepth.checkpoint import resolve_checkpoint
    from .models.loader import load_base_model
    from .models.tokenizer import load_tokenizer, pad_token_id
    from .utils.hardware import resolve_device

    s = speed_settings(cfg)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"))
    if ckpt is None:
        raise ValueError("ckpt_path is required: a FlexiDepth folder or a run folder holding flexidepth/")
    paths = [ckpt] + [resolve_checkpoint(p) for p in (cfg.get("more_ckpts") or [])]
    ckpts = list(zip(checkpoint_labels(paths), paths, strict=True))
    torch.set_num_threads(s.threads)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    device = resolve_device(str(cfg.get("device", "cpu")))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_cfg)
    prompts = heldout_prompts(tokenizer, s.heldout, s.prompts, s.prompt_length)
    prefill = heldout_prompts(tokenizer, s.heldout, 1, s.prefill_length)[0] if s.prefill_length else None
    torch.manual_seed(0)
    base = load_base_model(model_cfg).eval().to(device)
    base_config = copy.deepcopy(base.config)
    num_layers = base_config.num_hidden_layers
    bad = [k for k in s.shortgpt_k if k >= num_layers]
    if bad:
        raise ValueError(f"shortgpt_k {bad}: a {num_layers}-layer model keeps at least one layer")
    systems = build_systems(base, ckpts, s.taus, s.shortgpt_k, tokenizer, s.calibration_texts)
    for sys_ in systems:
        sys_.model.to(device)
    per_set = None
    if s.per_set_speed:
        per_set = {n: heldout_prompts(tokenizer, [n], s.prompts, s.prompt_length) for n in s.heldout}
    texts = None
    if s.text_decode:
        length = s.prompt_length + s.new_tokens
        texts = {n: heldout_prompts(tokenizer, [n], s.prompts, length) for n in s.heldout}
    speed = measure_speed(systems, prompts, prefill, s, per_set, texts)
    log.info("speed: timing our loop against HF generate on the base model")
    reference = loop_vs_hf(base, prompts, s.new_tokens, s.rounds, s.warmup)

    ppl: dict[str, dict] = {}
    if s.ppl_max_tokens != 0:
        sets = C.heldout_sets(tokenizer, s.heldout, s.ppl_max_length, s.ppl_max_tokens)
        pad = pad_token_id(tokenizer)
        for sys_ in systems:
            sys_.prepare()
            ppl[sys_.label] = C.measure(sys_.model, sets, s.ppl_batch_size, pad, num_layers=num_layers)
            log.info(
                "speed: %s ppl %s", sys_.label, {n: round(v["ppl"], 2) for n, v in ppl[sys_.label].items()}
            )

    results: dict[str, Any] = {
        "model": str(model_cfg.get("name_or_path")),
        "ckpt": str(ckpt),
        "ckpts": {name: str(path) for name, path in ckpts},
        "num_layers": num_layers,
        "machine": machine_record(next(base.parameters()).dtype),
        "settings": {**s.__dict__},
        "heldout": s.heldout if ppl else [],
        "modes": [m for m in speed[systems[0].label] if not m.startswith("layers_skipped")],
        "loop_vs_hf": reference,
        "systems": {},
    }
    for sys_ in systems:
        sk = speed[sys_.label]["layers_skipped"]
        ideal = {mode: flop_ideal(base_config, sys_, v) for mode, v in sk.items()}
        results["systems"][sys_.label] = {
            "kind": sys_.kind,
            "ckpt": sys_.ckpt,
            "tau": sys_.tau,
            "k": sys_.k,
            "removed": sys_.removed,
            "flop_ideal": ideal["decode_b1"],
            "flop_ideal_by_mode": ideal,
            "speed": speed[sys_.label],
            "ppl": ppl.get(sys_.label, {}),
        }
    results["equal_speedup"] = []
    if ppl:
        for mode in ("text_b1", "decode_b1") if texts else ("decode_b1",):
            for basis in ("wall", "cpu"):
                results["equal_speedup"] += equal_speedup(results, mode, basis)
    atomic_write_text(output_dir / "speed.json", json.dumps(_finite(results), indent=2, sort_keys=True))
    atomic_write_text(output_dir / "speed.md", speed_markdown(results))
    if ppl:
        plot_speed(results, output_dir / "ppl_vs_speedup.png")
    return results


def _finite(obj):
    """JSON-safe copy: non-finite floats become None (json.dumps would write NaN / Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def preflight_speed(cfg: DictConfig) -> None:
    """Settings (ValueError naming the key), the model group, device, hub access and the checkpoint
    (trained on this base model, finite weights), before any model load; raises PreflightError."""
    from . import preflight as pf
    from .config_check import validate_groups

    validate_groups(cfg)
    speed_settings(cfg)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    device = str(cfg.get("device", "cpu"))
    problems = pf.accelerator_problems("cuda" if device.startswith("cuda") else device, "device")
    problems += pf.model_access_problems(model_cfg)
    if cfg.get("ckpt_path") in (None, "", "null"):
        problems.append("ckpt_path is required: a FlexiDepth folder or a run folder holding flexidepth/")
    else:
        try:
            folder = pf.resolve_flexidepth_folder(cfg.ckpt_path, "ckpt_path")
        except PreflightError as err:
            problems.append(str(err))
        else:
            if not problems:
                problems += pf.flexidepth_checkpoint_problems(folder, "ckpt_path", model_cfg)
    more = cfg.get("more_ckpts") or []
    if isinstance(more, str) or not all(isinstance(p, str) and p for p in more):
        problems.append(f"more_ckpts must be a list of checkpoint paths, got {more!r}")
        more = []
    folders = []
    for i, path in enumerate(more):
        try:
            folder = pf.resolve_flexidepth_folder(path, f"more_ckpts[{i}]")
        except PreflightError as err:
            problems.append(str(err))
        else:
            folders.append(folder)
            problems += pf.flexidepth_checkpoint_problems(folder, f"more_ckpts[{i}]", model_cfg)
    if cfg.get("ckpt_path") not in (None, "", "null") and not problems:
        try:
            checkpoint_labels([Path(str(cfg.ckpt_path)), *folders])
        except ValueError as err:
            problems.append(str(err))
    pf.raise_if(problems, "speed")


@hydra.main(
    version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="speed"
)
@entry_point
def main(cfg: DictConfig) -> None:
    preflight_speed(cfg)
    results = run_speed(cfg)
    out = Path(cfg.paths.output_dir)
    print(speed_markdown(results))
    figure = ", ppl_vs_speedup.png" if results["heldout"] else ""
    log.info("speed: %s (speed.md, speed.json%s)", out, figure)


if __name__ == "__main__":
    main()
