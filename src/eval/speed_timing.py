"""What `python -m src.speed` times (src/eval/speed.py builds the systems, src/speed.py is the command): the
machine record, held-out prompts, decode timings in lockstep (every system's decode step t runs before any
system's step t + 1; `lockstep`) and prefill timings interleaved over rounds, wall and CPU time, speedups as
the median over rounds of the paired ratio base / system (`paired_speedup`), our loop against HF `generate`,
and the FLOP-ideal speedup at the layers a system skipped."""

from __future__ import annotations

import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from .speed_plan import SpeedSettings, System

log = logging.getLogger(__name__)


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


def heldout_prompts(tokenizer, names: list[str], n: int, length: int) -> list[list[int]]:
    """`n` prompts of exactly `length` tokens: the first windows of that length of each held-out set's
    documents, taken round robin over `names` (set 1 doc 1, set 2 doc 1, ..., set 1 doc 2, ...).

    Raises ValueError naming `prompts` / `prompt_length` when the sets hold fewer such windows."""
    from .curves import heldout_sets

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


def _clear_routes(model) -> None:
    state = getattr(model, "flexidepth", None)
    if state is not None:
        state.recorder.clear()


class DecodeSteps:
    """Decode of `new_tokens` tokens, one per step with the KV cache, stepped from outside: construction
    runs the untimed prefill of `input_ids` [B, P] (no padding), each `next()` runs and times one decode step
    and returns its (wall seconds, CPU seconds). Steps are greedy (each input is the previous step's
    argmax) or, with `forced` [B, new_tokens], teacher-forced (step i's input is forced[:, i] at position
    P + i: the per-token work of decoding that text, so its routes are those of a full forward over
    input_ids ++ forced).

    `prepare` (untimed) is called before the prefill and before every step: systems that share one model
    (a checkpoint at several taus) set their threshold there, so steps of different systems may alternate
    (`lockstep`). When `routes` is a list, each step's routed-layer decisions [B, R] (bool) are appended to
    it (outside the timed region). Raises ValueError on a `forced` of the wrong shape.
    """

    def __init__(
        self,
        model,
        input_ids: torch.Tensor,
        new_tokens: int,
        routes: list | None = None,
        forced: torch.Tensor | None = None,
        prepare=None,
    ):
        if forced is not None and tuple(forced.shape) != (input_ids.shape[0], new_tokens):
            raise ValueError(
                f"forced: expected shape {(input_ids.shape[0], new_tokens)}, got {tuple(forced.shape)}"
            )
        from transformers import DynamicCache

        self.model, self.new_tokens, self.routes, self.forced = model, new_tokens, routes, forced
        self.prepare = prepare or (lambda: None)
        self.cache = DynamicCache(config=model.config)
        self.bsz, self.plen = input_ids.shape
        self.step = 0
        self.prepare()
        _clear_routes(model)
        with torch.inference_mode():
            out = model(input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.nxt = out.logits[:, -1].argmax(-1, keepdim=True)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[float, float]:
        if self.step == self.new_tokens:
            raise StopIteration
        model, step = self.model, self.step
        nxt = self.nxt if self.forced is None else self.forced[:, step : step + 1]
        pos = torch.full((self.bsz, 1), self.plen + step, dtype=torch.long, device=nxt.device)
        self.prepare()
        with torch.inference_mode():
            c0, t0 = time.process_time(), time.perf_counter()
            _clear_routes(model)
            out = model(input_ids=nxt, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1)
            self.nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            if self.routes is not None and getattr(model, "flexidepth", None) is not None:
                self.routes.append(model.flexidepth.recorder.stacked()[1][:, -1].cpu())
        self.step += 1
        return wall, cpu


def decode_timed(
    model,
    input_ids: torch.Tensor,
    new_tokens: int,
    routes: list | None = None,
    forced: torch.Tensor | None = None,
):
    """One system's whole decode (`DecodeSteps`, same arguments) run alone. Returns (wall seconds, CPU
    seconds) of the decode steps only, the prefill excluded."""
    times = list(DecodeSteps(model, input_ids, new_tokens, routes, forced))
    return sum(w for w, _ in times), sum(c for _, c in times)


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


def lockstep(
    units: dict[str, Any], n_units: int, rounds: int, warmup: int, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Decode timings of several systems advanced one step at a time in turn (paired measurement).

    `units[name](u)` returns system `name`'s step iterator for unit u in [0, n_units) (e.g. a `DecodeSteps`
    over prompt u; each `next()` returns the (wall, cpu) seconds of one step). Per round and unit, every
    system's iterator is created (untimed prefills), then step t of every system runs before step t + 1 of
    any, in an order drawn afresh for every step (seeded: `seed`), so no system always follows the same
    other one. A machine whose speed drifts over seconds (other tenants' memory traffic on a shared host)
    then slows every system's step t alike, which system-after-system timing (`interleaved`, where two
    systems' runs lie seconds apart) does not give. `warmup` untimed rounds first. Returns
    {name: {"wall": [...], "cpu": [...]}}, one sum per round.
    """
    names = list(units)
    res = {n: {"wall": [], "cpu": []} for n in names}
    order_rng = random.Random(seed)
    for r in range(warmup + rounds):
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for u in range(n_units):
            its = {n: units[n](u) for n in names}
            while its:
                for name in order_rng.sample(names, len(names)):
                    if name not in its:
                        continue
                    try:
                        w, c = next(its[name])
                    except StopIteration:
                        del its[name]
                        continue
                    wall[name] += w
                    cpu[name] += c
        if r >= warmup:
            for n in names:
                res[n]["wall"].append(wall[n])
                res[n]["cpu"].append(cpu[n])
    return res


def paired_speedup(base: list[float], system: list[float]) -> float:
    """Median over rounds of base seconds / system seconds of the same round (the pairs `lockstep` and
    `interleaved` measure together)."""
    return _median([b / max(t, 1e-12) for b, t in zip(base, system, strict=True)])


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def measure_speed(
    systems: list[System],
    prompts: list[list[int]],
    prefill: list[int] | None,
    s: SpeedSettings,
    per_set: dict[str, list[list[int]]] | None = None,
    texts: dict[str, list[list[int]]] | None = None,
):
    """Timings of every system (decode modes in `lockstep`, prefill `interleaved`; see the module docstring),
    `s.rounds` rounds after `s.warmup` untimed ones. Returns {label: {mode: {...}}}
    with modes decode_b1, decode_b1@<set> (per_set: that held-out set's own prompts), text_b1@<set>
    (texts: windows of prompt_length + new_tokens tokens of that set, the last new_tokens decoded
    teacher-forced), decode_b<batch> (batch > 1), prefill (prefill_length > 0), each holding the wall/CPU
    seconds per round, their medians, tokens/s and speedup_wall / speedup_cpu (`paired_speedup` against the
    first system, the base); plus per system `layers_skipped` {batch-1 mode: routed layers skipped per
    decoded token}."""
    device = next(systems[0].model.parameters()).device
    one = [torch.tensor([p], device=device) for p in prompts]
    # mode -> (tokens per round, decode units: [(input_ids, forced or None)] or None, call fn(system))
    modes: dict[str, tuple[int, list | None, Any]] = {}
    batch1_modes: list[str] = []

    def add_decode(mode: str, units: list, batch1: bool = True) -> None:
        modes[mode] = (sum(ids.shape[0] for ids, _ in units) * s.new_tokens, units, None)
        if batch1:
            batch1_modes.append(mode)

    add_decode("decode_b1", [(ids, None) for ids in one])
    for name, set_prompts in (per_set or {}).items():
        add_decode(f"decode_b1@{name}", [(torch.tensor([p], device=device), None) for p in set_prompts])
    for name, windows in (texts or {}).items():
        add_decode(
            f"text_b1@{name}",
            [
                (
                    torch.tensor([w[: s.prompt_length]], device=device),
                    torch.tensor([w[s.prompt_length :]], device=device),
                )
                for w in windows
            ],
        )
    if s.batch > 1:
        rows = torch.tensor([prompts[i % len(prompts)] for i in range(s.batch)], device=device)
        add_decode(f"decode_b{s.batch}", [(rows, None)], batch1=False)
    if prefill is not None:
        pre = torch.tensor([prefill], device=device)

        def pref(sys_: System):
            sys_.prepare()
            return prefill_timed(sys_.model, pre)

        modes["prefill"] = (len(prefill), None, pref)

    # layers skipped on the decoded tokens (greedy or forced: the same in every round): one untimed pass
    out: dict[str, dict] = {}
    for sys_ in systems:
        skipped: dict[str, float] = {}
        for mode in batch1_modes:
            if sys_.routed:  # routes recorded (always_skip layers count as skipped)
                routes: list[torch.Tensor] = []
                for ids, forced in modes[mode][1]:
                    sys_.prepare()
                    decode_timed(sys_.model, ids, s.new_tokens, routes, forced)
                run = torch.cat(routes)  # [steps * prompts, R]
                skipped[mode] = float((~run).sum(-1).float().mean())
            else:
                skipped[mode] = float(sys_.k or 0)
        out[sys_.label] = {"layers_skipped": skipped}
    for mode, (tokens, units, call) in modes.items():
        log.info("speed: timing %s (%d systems x %d rounds)", mode, len(systems), s.rounds)
        if units is None:  # one call per system and round
            res = interleaved({x.label: (lambda x=x: call(x)) for x in systems}, s.rounds, s.warmup)
        else:  # decode: every system's steps alternate with the others' (paired)
            step_units = {
                x.label: (
                    lambda u, x=x, units=units: DecodeSteps(
                        x.model, units[u][0], s.new_tokens, forced=units[u][1], prepare=x.prepare
                    )
                )
                for x in systems
            }
            res = lockstep(step_units, len(units), s.rounds, s.warmup)
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
            r[mode]["speedup_wall"] = paired_speedup(base[mode]["wall_s"], r[mode]["wall_s"])
            r[mode]["speedup_cpu"] = paired_speedup(base[mode]["cpu_s"], r[mode]["cpu_s"])
    return out


def loop_vs_hf(
    model, prompts: list[list[int]], new_tokens: int, rounds: int, warmup: int
) -> dict[str, float]:
    """Our generation loop (`flexidepth.generation.generate`, the loop every speedup above is measured in)
    against HF `model.generate` on the same base model: greedy, batch 1, each prompt generating exactly
    `new_tokens` tokens, prefill included in both; interleaved rounds, medians of wall seconds.

    Returns {"ours_s", "hf_s", "hf_over_ours"} (hf_over_ours > 1: our loop is faster than HF's), so a
    speedup over our base loop can be read against HF `generate` as speedup * hf_over_ours."""
    from ..flexidepth.generation import generate

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
    from ..flexidepth.flops import layer_macs, model_macs_per_token

    base = model_macs_per_token(config)
    if system.routed:
        cfg = system.model.flexidepth.config
        return base / model_macs_per_token(config, cfg, layers_skipped, always_run=len(system.always_run))
    return base / (base - layers_skipped * layer_macs(config).full)
