"""Cached generation for FlexiDepth models, with every step routed, and the fast-path switch.

    out = generate(model, None, input_ids, attention_mask, max_new_tokens=32)      # greedy
    out.sequences        # [B, P + n]: the (left-padded) prompt followed by the new tokens
    out.run              # [B, n, R]: routed-layer decisions of the forward that produced each new token
    out.layers_used      # [B, n]:   layers used by that forward ((L - R) + routed layers run)

Conventions:
- Left padding: `attention_mask` marks real prompt tokens; positions are `cumsum(mask) - 1` (pad rows
  get position 1), exactly what HF `generate` uses, so both give the same tokens.
- New token i is predicted by one forward of the model: the prompt's prefill for i = 0, otherwise the
  decode step over token i - 1. `run[:, i]` / `gates[:, i]` are the routes of the position processed by
  that forward (the last prompt token for i = 0). A teacher-forced forward over `sequences` therefore gives
  the same routes at positions P - 1 ... P + n - 2 (tested). `prefill` holds the routes of all prompt tokens.
- Rows that produced `eos_token_id` are finished: later positions hold `pad_token_id` and are marked
  invalid in `valid`. The loop stops early when every row has finished (one host sync per step).

The fast path (real skipping, layer.py) is on by default whenever autograd is off, so both this loop and
HF `model.generate` use it. `set_fast_path(model, False)` forces the masked (training) arithmetic,
`set_fast_path(model, True)` forces the fast path even with autograd on; `None` restores the default.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from .inject import flexi_layers
from .routes import Routes


def set_fast_path(model, enabled: bool | None) -> None:
    """None: fast path whenever autograd is off (default); True: always; False: never (masked path)."""
    if enabled not in (None, True, False):
        raise ValueError(f"enabled must be None, True or False, got {enabled!r}")
    for layer in flexi_layers(model):
        layer.fast_path = enabled


def compile_branches(model, **compile_kwargs) -> int:
    """torch.compile, in place, the branch functions of every decoder layer: the FFN (`mlp`) of each layer,
    routed or not, and the adapter of each routed layer. These are the parts of a layer without
    data-dependent control flow (the run/skip decision and the gathers stay eager). `nn.Module.compile`
    keeps parameters and state_dict keys unchanged. Compile the base model you compare against the same
    way, or a ratio measures the compiler, not the skipping.

    compile_kwargs go to `torch.compile` (e.g. dynamic=True, mode="max-autotune-no-cudagraphs").
    Returns the number of modules compiled. The first calls are slow (compilation); time after a warm-up.
    """
    from .inject import decoder_layers

    n = 0
    for layer in decoder_layers(model):
        for name in ("mlp", "adapter"):
            module = getattr(layer, name, None)
            if module is not None:
                module.compile(**compile_kwargs)
                n += 1
    return n


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, P + n] prompt (as given, left padded) + new tokens
    new_tokens: torch.Tensor  # [B, n]
    valid: torch.Tensor  # [B, n] bool: token produced before (and including) the row's EOS
    gates: torch.Tensor | None  # [B, n, R] fp32, None when the model has no routed layers / routing off
    run: torch.Tensor | None  # [B, n, R] bool
    prefill: Routes | None  # routes of the prompt tokens (padding marked invalid)
    num_layers: int
    logits: torch.Tensor | None = None  # [B, n, V] fp32 when return_logits=True

    @property
    def layers_used(self) -> torch.Tensor:
        """[B, n] layers used by the forward that produced each new token (L when routing is off)."""
        if self.run is None:
            return torch.full(self.new_tokens.shape, self.num_layers, device=self.new_tokens.device)
        return (self.num_layers - self.run.shape[-1]) + self.run.sum(-1)

    @property
    def layers_skipped_mean(self) -> float:
        """Mean routed layers skipped per valid generated token."""
        if self.run is None:
            return 0.0
        skipped = (~self.run).sum(-1).float()
        return float((skipped * self.valid).sum() / self.valid.sum().clamp_min(1))


class GenerationStreamer(Protocol):
    """What `generate(..., streamer=...)` calls: `put` once per decoding step, `end` once at the end."""

    def put(self, tokens: torch.Tensor, layers_used: torch.Tensor, valid: torch.Tensor) -> None: ...

    def end(self) -> None: ...


def check_generation_args(
    max_new_tokens=32,
    do_sample=False,
    temperature=1.0,
    top_p=1.0,
    seed=None,
    eos_token_id=None,
    pad_token_id=None,
) -> None:
    """Raise ValueError naming the parameter when a generation parameter is out of its domain.

    Domains: max_new_tokens an int >= 0 (0: no new token); do_sample a bool; temperature a finite float
    >= 0 (0 with do_sample: greedy); top_p a float in [0, 1] (0: only the top token, 1: no cut); seed None
    or an int; eos_token_id None, an int >= 0 or a list of them (empty: no stopping); pad_token_id None or
    an int >= 0. Cheap and model-free: call it before loading or running a model.
    """

    def is_int(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def real(name, v) -> float:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{name} must be a number, got {v!r}")
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {v}")
        return v

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be true or false, got {do_sample!r}")
    if real("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0.0 <= real("top_p", top_p) <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (0: only the most likely token), got {top_p}")
    if seed is not None and (not is_int(seed) or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {seed!r}")
    eos = [eos_token_id] if eos_token_id is None or is_int(eos_token_id) else eos_token_id
    if not isinstance(eos, list | tuple) or not all(e is None or (is_int(e) and e >= 0) for e in eos):
        raise ValueError(
            f"eos_token_id must be None, a token id >= 0 or a list of them, got {eos_token_id!r}"
        )
    if pad_token_id is not None and (not is_int(pad_token_id) or pad_token_id < 0):
        raise ValueError(f"pad_token_id must be None or a token id >= 0, got {pad_token_id!r}")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] by temperature + nucleus sampling.

    temperature 0 is greedy (argmax), a tiny one effectively so, a huge one near-uniform; top_p 0 keeps only the most likely token (ties: the first in sort
    order), top_p 1 keeps the whole distribution.
    """
    if temperature == 0:
        return logits.argmax(-1)
    # shifted by the row max first: a tiny temperature then sends the others to -inf (greedy), not to NaN
    logits = (logits - logits.max(-1, keepdim=True).values) / float(temperature)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass *before* it already reaches top_p; the first token always stays
        # (with top_p = 0 the mass before it, 0, already "reaches" top_p)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, sorted_idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_prompt_tensors(input_ids, attention_mask, vocab_size: int | None) -> None:
    """Shape, dtype and value checks of the prompt tensors (ValueError naming the argument and row)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [batch, prompt length] tensor, got {shape}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): every prompt needs a token")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = (
                tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            )
            raise ValueError(f"attention_mask {shape} != input_ids {tuple(input_ids.shape)}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt rows {empty} have no real token (attention_mask all 0)")
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate expects left padding: every row's last prompt position must be real")
        real = attention_mask.bool()
    else:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    ids = input_ids[real]
    if vocab_size is not None and bool(((ids < 0) | (ids >= vocab_size)).any()):
        bad = sorted({int(i) for i in ids[(ids < 0) | (ids >= vocab_size)].tolist()})[:5]
        raise ValueError(f"input_ids holds ids outside the vocabulary [0, {vocab_size}): {bad}")


def _step_routes(model):
    state = getattr(model, "flexidepth", None)
    if state is None or not state.recorder.gates:
        return None, None
    return state.recorder.stacked()


def generate(
    model,
    tokenizer=None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    return_logits: bool = False,
    prompts: list[str] | None = None,
    streamer: GenerationStreamer | None = None,
) -> GenerationOutput:
    """Greedy or sampled generation with a DynamicCache; every position (prompt too) is routed.

    Args:
        model: a HF causal LM, FlexiDepth-injected or not (then no routes are returned).
        tokenizer: optional; used to encode `prompts` (left padded) and for default eos/pad ids.
        input_ids / attention_mask: [B, P] left-padded prompts (mask 1 = real token).
        max_new_tokens: number of decode steps at most.
        do_sample / temperature / top_p / seed: sampling controls (greedy when do_sample is False;
            temperature 0 is greedy too, top_p 0 keeps only the most likely token).
        eos_token_id / pad_token_id: stopping (an empty list: none); pad defaults to the (first) eos id,
            else 0.

    Raises:
        ValueError naming the parameter, before any model work, for a parameter out of its domain (see
        `check_generation_args`), empty prompts, a row without real tokens, right padding, or token ids
        outside the vocabulary.
        return_logits: keep the fp32 next-token logits of every step.
        prompts: texts to encode with `tokenizer` instead of input_ids.
        streamer: optional; `streamer.put(tokens, layers_used, valid)` once per decoding step (CPU tensors
            [B]: the step's new token of every row, the layers used by the forward that produced it, and
            whether the row was still unfinished), then `streamer.end()`. Costs one host sync per step;
            the outputs are the same with or without it.
    """
    check_generation_args(max_new_tokens, do_sample, temperature, top_p, seed, eos_token_id, pad_token_id)
    if input_ids is None:
        if prompts is None or tokenizer is None:
            raise ValueError("pass input_ids, or prompts together with a tokenizer")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts is empty: pass at least one prompt")
        empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p]
        if empty:
            raise ValueError(f"prompts {empty} are empty or not strings: every prompt needs text")
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    device = next(model.parameters()).device
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    _check_prompt_tensors(input_ids, attention_mask, vocab)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    eos_ids = (
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    )
    eos_ids = [int(e) for e in eos_ids if e is not None]
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    generator = None
    if do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else int(seed))

    bsz, plen = input_ids.shape
    state = getattr(model, "flexidepth", None)
    num_layers = model.config.num_hidden_layers
    cache = DynamicCache(config=model.config)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    mask = attention_mask
    cur, pos = input_ids, position_ids
    tokens, gates, runs, logits_all = [], [], [], []
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    valid = []
    prefill = None
    with torch.inference_mode():
        for step in range(max_new_tokens):
            if state is not None:
                state.recorder.clear()
            out = model(
                input_ids=cur,
                attention_mask=mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1].float()
            g, r = _step_routes(model)
            if g is not None:
                if step == 0:
                    prefill = Routes(g, r, attention_mask.bool(), num_layers)
                gates.append(g[:, -1])
                runs.append(r[:, -1])
            if return_logits:
                logits_all.append(logits)
            nxt = _sample(logits, temperature, top_p, generator) if do_sample else logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            valid.append(~finished)
            tokens.append(nxt)
            if streamer is not None:
                used = (
                    torch.full_like(nxt, num_layers)
                    if g is None
                    else (num_layers - r.shape[-1]) + r[:, -1].sum(-1)
                )
                streamer.put(nxt.cpu(), used.cpu(), valid[-1].cpu())
            if eos is not None:
                finished = finished | torch.isin(nxt, eos)
                if bool(finished.all()):  # host sync, once per step, only when stopping is possible
                    break
            if step + 1 == max_new_tokens:
                break
            cur = nxt[:, None]
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    if streamer is not None:
        streamer.end()
    new_tokens = torch.stack(tokens, 1) if tokens else input_ids.new_zeros(bsz, 0)
    return GenerationOutput(
        sequences=torch.cat([input_ids, new_tokens], 1),
        new_tokens=new_tokens,
        valid=torch.stack(valid, 1) if valid else torch.zeros(bsz, 0, dtype=torch.bool, device=device),
        gates=torch.stack(gates, 1) if gates else None,
        run=torch.stack(runs, 1) if runs else None,
        prefill=prefill,
        num_layers=num_layers,
        logits=torch.stack(logits_all, 1) if return_logits and logits_all else None,
    )


__all__ = ["GenerationOutput", "GenerationStreamer", "check_generation_args", "generate", "set_fast_path"]
