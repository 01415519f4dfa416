"""FlexiDepth causal LM for Hugging Face `trust_remote_code` loading (self-contained: torch + transformers only).

This file is copied verbatim into every folder written by `python -m src.export` and imports nothing from the
FlexiDepth repository, so the folder loads anywhere:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)            # stored tau
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, flexidepth_tau=0.6)
    out = model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)
    model.flexidepth_generation.layers_used     # [B, n] layers used by the forward that produced each new token

What is loaded: the base model's own transformers class (Llama, Mistral, Qwen2 or Qwen3, chosen by
`config.json`'s `flexidepth.base_model_type`) with its routed decoder layers replaced by `FlexiDepthDecoderLayer`,
which computes, per token, g = sigmoid(router(N_a(x))) and run = g > tau (strict):

    run : x' = x + Attn(N_a(x));   y = x' + w_run * FFN(N_f(x'))
    skip: K/V of the token are still computed and cached (later tokens attend to it); no query, no
          attention output, no FFN;   y = x + w_skip * Adapter(N_f(x))

with (w_run, w_skip) = (g, 1 - g) for gate_mode "released" and (1, 1) for "ste" / "difference" (their
training differs, their serving arithmetic is this). A layer in `flexidepth.always_skip` is skipped by every
token (g = 0): it computes only y = x + Adapter(N_f(x)), without router, attention or K/V. Router: enc -> RMSNorm -> tanh -> dec -> head (+ scalar
bias), or a linear head; adapter: down(silu(gate(u)) * up(u)) or none (identity skip path).

Real skipping (the fast path) is used whenever autograd is off and the attention implementation is "sdpa" or
"eager" (the defaults on CPU): skipped tokens run neither the query projection, the attention nor the FFN;
K/V are projected for every token once. With autograd on, with attention maps requested, or with another
attention implementation, the layer computes every row and masks (the same numbers up to float rounding).

Recorded routes (plain attributes of the loaded model, documented in the export's README.md):
- `model.flexidepth_routes`: routes of the last forward: `.gates` [B, T, R] fp32, `.run` [B, T, R] bool
  (R = number of routed layers, in the order of `.layer_indices`), `.layers_used` [B, T].
- `model.flexidepth_generation`: after `model.generate(...)`: `.gates` / `.run` [B, n, R] and
  `.layers_used` [B, n] of the forward that produced each of the n new tokens (the prompt's prefill for the
  first one, then one decode step per token; rows that already finished still count their padding steps).
  Meaningful for greedy and sampling decoding (one sequence per row), not for beam search.

Tested with transformers 5.x (the export records the version it was written with in config.json).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn

EXPORT_FORMAT = "flexidepth-hf-export"
FORMAT_VERSION = 1
ROUTING_KEY = "flexidepth"
TAU_KWARG = "flexidepth_tau"
WEIGHTS_NAME = "model.safetensors"
# base model_type -> (config class, causal LM class) in transformers
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
ROUTING_FIELDS = {
    "format": str,
    "format_version": int,
    "base_model_type": str,
    "tau": float,
    "layers": list,
    "gate_mode": str,
    "router": str,
    "router_width": int,
    "router_bias": bool,
    "adapter": str,
    "adapter_width": int,
    "param_dtype": str,
}
_PretrainedConfig = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig


class FlexiDepthExportError(ValueError):
    """The export folder is damaged or not loadable here; the message names the file (and key)."""


# ------------------------------------------------------------------------------------------- routing config
def check_routing(routing, num_layers: int, source: str = "config.json") -> dict:
    """Validate the `flexidepth` block of config.json; returns a copy. FlexiDepthExportError naming the key."""
    if not isinstance(routing, dict):
        raise FlexiDepthExportError(f"{source}: no '{ROUTING_KEY}' object: not a FlexiDepth export")
    missing = sorted(k for k in ROUTING_FIELDS if k not in routing)
    if missing:
        raise FlexiDepthExportError(f"{source}: {ROUTING_KEY} lacks {missing}")
    out = dict(routing)
    if out["format"] != EXPORT_FORMAT:
        raise FlexiDepthExportError(
            f"{source}: {ROUTING_KEY}.format={out['format']!r}, expected {EXPORT_FORMAT!r}"
        )
    if int(out["format_version"]) > FORMAT_VERSION:
        raise FlexiDepthExportError(
            f"{source}: {ROUTING_KEY}.format_version={out['format_version']} is newer than this modeling file "
            f"({FORMAT_VERSION})"
        )
    if out["base_model_type"] not in FAMILIES:
        raise FlexiDepthExportError(
            f"{source}: {ROUTING_KEY}.base_model_type={out['base_model_type']!r} is not supported "
            f"(supported: {sorted(FAMILIES)})"
        )
    out["tau"] = check_tau(out["tau"], f"{source}: {ROUTING_KEY}.tau")
    layers = out["layers"]
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in layers)
        or len(set(layers)) != len(layers)
    ):
        raise FlexiDepthExportError(
            f"{source}: {ROUTING_KEY}.layers={layers!r} must be distinct layer indices in [0, {num_layers - 1}]"
        )
    out["layers"] = sorted(layers)
    always = out.get("always_skip", [])  # optional: layers every token skips (no router, attention or K/V)
    if (
        not isinstance(always, list)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i in out["layers"] for i in always)
        or len(set(always)) != len(always)
    ):
        raise FlexiDepthExportError(
            f"{source}: {ROUTING_KEY}.always_skip={always!r} must be distinct indices of routed layers"
        )
    out["always_skip"] = sorted(always)
    for key, allowed in (
        ("gate_mode", ("released", "ste", "difference")),
        ("router", ("mlp", "linear")),
        ("adapter", ("swiglu", "none")),
        ("param_dtype", ("float32", "bfloat16", "float16")),
    ):
        if out[key] not in allowed:
            raise FlexiDepthExportError(
                f"{source}: {ROUTING_KEY}.{key}={out[key]!r}, expected one of {list(allowed)}"
            )
    for key in ("router_width", "adapter_width"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0:
            raise FlexiDepthExportError(f"{source}: {ROUTING_KEY}.{key}={out[key]!r} must be an integer >= 0")
    return out


def check_tau(tau, name: str = TAU_KWARG) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
        raise FlexiDepthExportError(f"{name} must be a number in [0, 1], got {tau!r}")
    return float(tau)


def _family_config_class(model_type: str):
    return getattr(transformers, FAMILIES[model_type][0])


def build_config(config_dict: dict, kwargs: dict, source: str = "config.json"):
    """The base family's config (e.g. LlamaConfig) with the validated routing block as `config.flexidepth`.

    `flexidepth_tau` in kwargs overrides the stored tau. Returns (config, unused kwargs).
    """
    data = dict(config_dict)
    routing = data.pop(ROUTING_KEY, None)
    if not isinstance(routing, dict) or "base_model_type" not in routing:
        raise FlexiDepthExportError(f"{source}: no '{ROUTING_KEY}.base_model_type': not a FlexiDepth export")
    base_type = routing["base_model_type"]
    if base_type not in FAMILIES:
        raise FlexiDepthExportError(
            f"{source}: {ROUTING_KEY}.base_model_type={base_type!r} is not supported (supported: {sorted(FAMILIES)})"
        )
    tau = kwargs.pop(TAU_KWARG, None)
    auto_map = data.pop("auto_map", None)
    data["model_type"] = base_type
    config, unused = _family_config_class(base_type).from_dict(data, return_unused_kwargs=True, **kwargs)
    routing = check_routing(routing, config.num_hidden_layers, source)
    if tau is not None:
        routing["tau"] = check_tau(tau)
    config.flexidepth = routing
    if auto_map is not None:
        config.auto_map = auto_map
    return config, unused


class FlexiDepthConfig(_PretrainedConfig):
    """Loader of an export's config.json (`AutoConfig` entry of its `auto_map`).

    An export's config.json is the base model's config plus a `flexidepth` block (routing) and
    `model_type: "flexidepth"` (so that loading without `trust_remote_code=True` fails instead of silently
    giving the base model). Loading returns an instance of the base family's own config class (LlamaConfig, ...)
    carrying the routing block as `config.flexidepth`: the model is the family's own model class.
    """

    model_type = "flexidepth"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return_unused = kwargs.pop("return_unused_kwargs", False)
        tau = kwargs.pop(TAU_KWARG, None)
        config_dict, kwargs = _PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if tau is not None:
            kwargs[TAU_KWARG] = tau
        config, unused = build_config(config_dict, kwargs, f"{pretrained_model_name_or_path}/config.json")
        return (config, unused) if return_unused else config

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        return_unused = kwargs.pop("return_unused_kwargs", False)
        config, unused = build_config(config_dict, kwargs)
        return (config, unused) if return_unused else config


# ------------------------------------------------------------------------------------------- router, adapter
class RouterRMSNorm(nn.Module):
    """RMSNorm over the router bottleneck: variance in fp32, result cast back."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLPRouter(nn.Module):
    """logit = head(dec(tanh(RMSNorm(enc(z))))) [+ bias]: z [B, T, d] -> logits [B, T] fp32."""

    def __init__(self, hidden_size: int, width: int, eps: float, bias: bool):
        super().__init__()
        self.enc = nn.Linear(hidden_size, width, bias=False)
        self.norm = RouterRMSNorm(width, eps)
        self.dec = nn.Linear(width, hidden_size, bias=False)
        self.head = nn.Linear(hidden_size, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1)) if bias else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.enc.weight.dtype)
        logit = self.head(self.dec(torch.tanh(self.norm(self.enc(z))))).squeeze(-1).float()
        return logit if self.bias is None else logit + self.bias.float()


class LinearRouter(nn.Module):
    """logit = w.z [+ bias]: z [B, T, d] -> logits [B, T] fp32."""

    def __init__(self, hidden_size: int, bias: bool):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1, bias=False)
        self.bias = nn.Parameter(torch.zeros(1)) if bias else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logit = self.head(z.to(self.head.weight.dtype)).squeeze(-1).float()
        return logit if self.bias is None else logit + self.bias.float()


class SwiGLUAdapter(nn.Module):
    """down(silu(gate(u)) * up(u)) of width m: [..., d] -> [..., d] (in the input's dtype)."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        dtype = u.dtype
        u = u.to(self.gate_proj.weight.dtype)
        return self.down_proj(F.silu(self.gate_proj(u)) * self.up_proj(u)).to(dtype)


# ------------------------------------------------------------------------------------------- helpers
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rows(table: torch.Tensor, bsz: int) -> torch.Tensor:
    """Rotary table [1 or B, T, hd] -> [B*T, hd]."""
    return table.expand(bsz, -1, -1).reshape(-1, table.shape[-1])


def _collecting_attentions(kwargs: dict) -> bool:
    """Whether this forward collects attention maps (then the masked path runs: the fast one forms none)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


class _RouteStore:
    """Gates / decisions [B, T] of each routed layer in the current forward (a plain object, not a module)."""

    def __init__(self):
        self.gates: dict[int, torch.Tensor] = {}
        self.run: dict[int, torch.Tensor] = {}


# ------------------------------------------------------------------------------------------- the layer
class FlexiDepthDecoderLayer(nn.Module):
    """A routed decoder layer: the base layer's own submodules (same names, same state_dict keys) plus
    `router` and `adapter`. Made a subclass of the family's decoder layer class by `routed_layer_class`, so
    transformers' hidden-state recording (keyed on that class) still sees it.

    forward(hidden_states [B, T, d], attention_mask, position_ids, cache, use_cache, position_embeddings)
    -> [B, T, d]; the K/V of every token (run or skip) go to the cache.
    """

    def _flexi_setup(
        self, base_layer: nn.Module, routing: dict, config, layer_index: int, store: _RouteStore
    ):
        nn.Module.__init__(self)
        for name, child in base_layer.named_children():
            self.add_module(name, child)
        for attr in ("attention_type", "layer_type", "hidden_size", "gradient_checkpointing"):
            if hasattr(base_layer, attr):
                setattr(self, attr, getattr(base_layer, attr))
        d = config.hidden_size
        if routing["router"] == "linear":
            self.router = LinearRouter(d, routing["router_bias"])
        else:
            self.router = MLPRouter(d, routing["router_width"], config.rms_norm_eps, routing["router_bias"])
        self.adapter = SwiGLUAdapter(d, routing["adapter_width"]) if routing["adapter"] == "swiglu" else None
        self.routing = routing  # shared by every routed layer: tau is read on each forward
        self.layer_index = layer_index
        self.__dict__["_store"] = store
        params = inspect.signature(self.self_attn.forward).parameters
        self._cache_kw = next(
            (k for k in ("cache", "past_key_values", "past_key_value") if k in params), "cache"
        )

    @property
    def tau(self) -> float:
        return float(self.routing["tau"])

    def branch_weights(self, g: torch.Tensor, run: torch.Tensor, dtype: torch.dtype):
        """FFN weight of run rows and adapter weight of skip rows, each [B, T, 1]."""
        m = run.float()
        if self.routing["gate_mode"] == "released":
            w_run, w_skip = m * g, (1.0 - m) * (1.0 - g)
        else:
            st = g - g.detach()
            w_run, w_skip = m * (1.0 + st), (1.0 - m) * (1.0 - st)
        return w_run.unsqueeze(-1).to(dtype), w_skip.unsqueeze(-1).to(dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_ids=None,
        cache=None,
        use_cache: bool = False,
        position_embeddings=None,
        **kwargs,
    ) -> torch.Tensor:
        for old in ("past_key_values", "past_key_value"):  # older transformers name the cache so
            if cache is None and kwargs.get(old) is not None:
                cache = kwargs.pop(old)
            kwargs.pop(old, None)
        x = hidden_states
        if self.layer_index in self.routing["always_skip"]:  # every token skips: g = 0, no attention, no K/V
            skipped = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            self._store.gates[self.layer_index] = skipped.float()
            self._store.run[self.layer_index] = skipped
            return x if self.adapter is None else x + self.adapter(self.post_attention_layernorm(x))
        z = self.input_layernorm(x)
        g = torch.sigmoid(self.router(z))
        run = g > self.tau  # strict: g == tau skips
        self._store.gates[self.layer_index] = g
        self._store.run[self.layer_index] = run
        if self._fast_path_applies(attention_mask, position_embeddings) and not _collecting_attentions(
            kwargs
        ):
            return self._fast_forward(x, z, g, run, attention_mask, cache, position_embeddings)
        attn_kwargs = {
            "hidden_states": z,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            self._cache_kw: cache,
            "use_cache": use_cache,
            "position_embeddings": position_embeddings,
            **kwargs,
        }
        a = self.self_attn(**attn_kwargs)[0]
        h = x + run.unsqueeze(-1).to(x.dtype) * a  # skipped rows: no attention output
        u = self.post_attention_layernorm(h)
        w_run, w_skip = self.branch_weights(g, run, x.dtype)
        y = h + w_run * self.mlp(u)
        if self.adapter is not None:
            y = y + w_skip * self.adapter(u)
        return y

    # ---------------------------------------------------------------- fast path (real skipping)
    def _fast_path_applies(self, attention_mask, position_embeddings) -> bool:
        if torch.is_grad_enabled() or position_embeddings is None:
            return False
        if getattr(self.self_attn.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            return False
        return attention_mask is None or isinstance(attention_mask, torch.Tensor)

    def _project_kv(self, z, cos, sin):
        """K (RoPE'd, Qwen3 k_norm) and V of rows z [B, T, d] -> two [B, H_kv, T, hd]."""
        attn = self.self_attn
        bsz, seq, _ = z.shape
        k = attn.k_proj(z).view(bsz, seq, -1, attn.head_dim)
        v = attn.v_proj(z).view(bsz, seq, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return k * c + _rotate_half(k) * s, v

    def _project_q(self, z_rows, cos_rows, sin_rows):
        """Queries of flattened rows [N, d] -> [N, H, hd] (Qwen3 q_norm, RoPE)."""
        attn = self.self_attn
        q = attn.q_proj(z_rows).view(z_rows.shape[0], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        c, s = cos_rows.unsqueeze(1), sin_rows.unsqueeze(1)
        return q * c + _rotate_half(q) * s

    def _attend(self, q, keys, values, mask):
        """q [b, H, m, hd]; keys/values [b, H_kv, S, hd] -> [b, m, H*hd]."""
        o = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            scale=self.self_attn.scaling,
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _fast_forward(self, x, z, g, run, attention_mask, cache, position_embeddings):
        attn = self.self_attn
        bsz, seq, dim = x.shape
        cos, sin = position_embeddings
        past = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
        k, v = self._project_kv(z, cos, sin)  # every row: skipped tokens keep their K/V
        keys, values = cache.update(k, v, attn.layer_idx) if cache is not None else (k, v)
        released = self.routing["gate_mode"] == "released"
        if bsz * seq == 1:  # batch-1 decode: one branch, no gathers
            if bool(run):
                q = self._project_q(z[0], cos[0], sin[0])
                mask = None if attention_mask is None else attention_mask[..., : keys.shape[-2]]
                h = x + attn.o_proj(self._attend(q.transpose(0, 1)[None], keys, values, mask))
                ffn = self.mlp(self.post_attention_layernorm(h))
                return h + (g.unsqueeze(-1).to(x.dtype) * ffn if released else ffn)
            if self.adapter is None:
                return x
            ad = self.adapter(self.post_attention_layernorm(x))
            return x + ((1.0 - g).unsqueeze(-1).to(x.dtype) * ad if released else ad)

        w_run, w_skip = self.branch_weights(g, run, x.dtype)
        if seq == 1:
            return self._fast_decode(x, z, w_run, w_skip, run, attention_mask, keys, values, cos, sin)
        counts = run.sum(1)
        counts_host = counts.tolist()
        n_run = sum(counts_host)
        n_rows = bsz * seq
        x_flat = x.reshape(n_rows, dim)
        if n_run == n_rows:
            return self._dense_run(x, z, w_run, attention_mask, keys, values, past, cos, sin)
        out = torch.empty_like(x_flat)
        order = torch.argsort((~run.reshape(-1)).to(torch.uint8), stable=True)
        idx_run, idx_skip = order[:n_run], order[n_run:]
        xs = x_flat.index_select(0, idx_skip)
        if self.adapter is not None:
            ws = w_skip.reshape(n_rows, 1).index_select(0, idx_skip)
            xs = xs + ws * self.adapter(self.post_attention_layernorm(xs))
        out.index_copy_(0, idx_skip, xs)
        if n_run == 0:
            return out.view(bsz, seq, dim)
        q = self._project_q(
            z.reshape(n_rows, dim).index_select(0, idx_run),
            _rows(cos, bsz).index_select(0, idx_run),
            _rows(sin, bsz).index_select(0, idx_run),
        )
        # per-sequence padded layout: each sequence's running queries packed to the front of m_max slots
        seqs = [b for b, c in enumerate(counts_host) if c]
        n_seq, m_max = len(seqs), max(counts_host)
        b_of, t_of = idx_run // seq, idx_run % seq
        offsets = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n_run, device=x.device) - offsets[b_of]
        compact = torch.cumsum(counts > 0, 0)[b_of] - 1
        q_pad = q.new_zeros(n_seq, m_max, q.shape[1], q.shape[2])
        q_pad[compact, rank] = q
        t_pad = torch.full((n_seq, m_max), seq - 1, dtype=torch.long, device=x.device)
        t_pad[compact, rank] = t_of
        sel = None
        if n_seq < bsz:
            sel = torch.tensor(seqs, device=x.device)
            keys, values = keys.index_select(0, sel), values.index_select(0, sel)
        mask = self._gather_mask(attention_mask, sel, t_pad, past, keys.shape[-2], bsz, seq)
        o = self._attend(q_pad.transpose(1, 2), keys, values, mask)
        h = x_flat.index_select(0, idx_run) + attn.o_proj(o[compact, rank])
        wr = w_run.reshape(n_rows, 1).index_select(0, idx_run)
        out.index_copy_(0, idx_run, h + wr * self.mlp(self.post_attention_layernorm(h)))
        return out.view(bsz, seq, dim)

    def _fast_decode(self, x, z, w_run, w_skip, run, attention_mask, keys, values, cos, sin):
        """One new token per sequence (T = 1, B > 1): gather the running sequences, attend, scatter back."""
        attn = self.self_attn
        bsz, _, dim = x.shape
        flat = run.reshape(-1)
        n_run = int(flat.sum())
        if n_run == bsz:
            return self._dense_run(x, z, w_run, attention_mask, keys, values, 0, cos, sin)
        x_flat = x.reshape(bsz, dim)
        out = torch.empty_like(x_flat)
        order = torch.argsort((~flat).to(torch.uint8), stable=True)
        idx_run, idx_skip = order[:n_run], order[n_run:]
        xs = x_flat.index_select(0, idx_skip)
        if self.adapter is not None:
            xs = xs + w_skip.reshape(bsz, 1).index_select(0, idx_skip) * self.adapter(
                self.post_attention_layernorm(xs)
            )
        out.index_copy_(0, idx_skip, xs)
        if n_run == 0:
            return out.view(bsz, 1, dim)
        q = self._project_q(
            z.reshape(bsz, dim).index_select(0, idx_run),
            _rows(cos, bsz).index_select(0, idx_run),
            _rows(sin, bsz).index_select(0, idx_run),
        )
        mask = None
        if attention_mask is not None:
            mask = attention_mask[..., : keys.shape[-2]].expand(bsz, -1, -1, -1).index_select(0, idx_run)
        o = self._attend(q.unsqueeze(2), keys.index_select(0, idx_run), values.index_select(0, idx_run), mask)
        h = x_flat.index_select(0, idx_run) + attn.o_proj(o.reshape(n_run, -1))
        wr = w_run.reshape(bsz, 1).index_select(0, idx_run)
        out.index_copy_(0, idx_run, h + wr * self.mlp(self.post_attention_layernorm(h)))
        return out.view(bsz, 1, dim)

    def _dense_run(self, x, z, w_run, attention_mask, keys, values, past, cos, sin):
        """Every row runs: the plain layer with the FFN weighted by w_run."""
        attn = self.self_attn
        bsz, seq, dim = x.shape
        q = self._project_q(z.reshape(bsz * seq, dim), _rows(cos, bsz), _rows(sin, bsz))
        q = q.view(bsz, seq, q.shape[1], q.shape[2]).transpose(1, 2)
        if attention_mask is not None:
            mask = attention_mask[..., : keys.shape[-2]]
        else:
            t_pos = torch.arange(seq, device=x.device).expand(bsz, seq)
            mask = self._gather_mask(None, None, t_pos, past, keys.shape[-2], bsz, seq)
        h = x + attn.o_proj(self._attend(q, keys, values, mask))
        return h + w_run * self.mlp(self.post_attention_layernorm(h))

    @staticmethod
    def _gather_mask(attention_mask, sel, t_pad, past: int, kv_len: int, bsz: int, seq: int):
        """Mask rows of the gathered queries [n_seq, 1, m, S] (None: plain causal single query)."""
        if attention_mask is None:
            if seq == 1:
                return None
            k_pos = torch.arange(kv_len, device=t_pad.device)
            return (k_pos[None, None, :] <= (past + t_pad)[:, :, None]).unsqueeze(1)
        mask = attention_mask[..., :kv_len].expand(bsz, 1, seq, kv_len)
        if sel is not None:
            mask = mask.index_select(0, sel)
        idx = t_pad[:, None, :, None].expand(-1, 1, -1, kv_len)
        return torch.gather(mask, 2, idx)


_LAYER_CLASSES: dict[type, type] = {}


def routed_layer_class(base_layer_cls: type) -> type:
    """FlexiDepthDecoderLayer as a subclass of the family's decoder layer class (its methods take precedence)."""
    if base_layer_cls not in _LAYER_CLASSES:
        _LAYER_CLASSES[base_layer_cls] = type(
            f"FlexiDepth{base_layer_cls.__name__}",
            (FlexiDepthDecoderLayer, base_layer_cls),
            {"__module__": __name__},
        )
    return _LAYER_CLASSES[base_layer_cls]


# ------------------------------------------------------------------------------------------- the model
@dataclass
class FlexiDepthRoutes:
    """Routes of routed layers `layer_indices` (R of them) in a model of `num_layers` layers.

    gates: [B, N, R] fp32; run: [B, N, R] bool (N = positions of a forward, or generated tokens)."""

    gates: torch.Tensor
    run: torch.Tensor
    layer_indices: list
    num_layers: int

    @property
    def layers_used(self) -> torch.Tensor:
        """[B, N] layers used: the unrouted ones plus the routed layers run."""
        return (self.num_layers - self.run.shape[-1]) + self.run.sum(-1)


class FlexiDepthMixin:
    """Mixed into the family's *ForCausalLM: routed layers replaced, routes recorded (see module docstring)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        routing = check_routing(getattr(config, ROUTING_KEY, None), config.num_hidden_layers)
        config.flexidepth = routing
        self.__dict__["_flexidepth_store"] = _RouteStore()
        self.__dict__["_flexidepth_steps"] = None
        self.flexidepth_routes = None
        self.flexidepth_generation = None
        layers = self.model.layers
        for i in routing["layers"]:
            base = layers[i]
            layer = routed_layer_class(type(base)).__new__(routed_layer_class(type(base)))
            layer._flexi_setup(base, routing, config, i, self._flexidepth_store)
            dtype = getattr(torch, routing["param_dtype"])
            layer.router.to(dtype)
            if layer.adapter is not None:
                layer.adapter.to(dtype)
            layers[i] = layer

    @property
    def flexidepth_tau(self) -> float:
        return float(self.config.flexidepth["tau"])

    def set_flexidepth_tau(self, tau: float) -> None:
        """Change the threshold (run iff g > tau) of every routed layer."""
        self.config.flexidepth["tau"] = check_tau(tau, "tau")

    def forward(self, *args, **kwargs):
        store = self._flexidepth_store
        store.gates.clear()
        store.run.clear()
        out = super().forward(*args, **kwargs)
        idx = self.config.flexidepth["layers"]
        if all(i in store.gates for i in idx):
            routes = FlexiDepthRoutes(
                torch.stack([store.gates[i] for i in idx], -1),
                torch.stack([store.run[i] for i in idx], -1),
                list(idx),
                self.config.num_hidden_layers,
            )
            self.flexidepth_routes = routes
            if self._flexidepth_steps is not None:
                self._flexidepth_steps.append((routes.gates[:, -1], routes.run[:, -1]))
        return out

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`; afterwards `self.flexidepth_generation` holds the new tokens' routes."""
        self.__dict__["_flexidepth_steps"] = []
        try:
            out = super().generate(*args, **kwargs)
            steps = self._flexidepth_steps
        finally:
            self.__dict__["_flexidepth_steps"] = None
        if steps:
            self.flexidepth_generation = FlexiDepthRoutes(
                torch.stack([g for g, _ in steps], 1),
                torch.stack([r for _, r in steps], 1),
                list(self.config.flexidepth["layers"]),
                self.config.num_hidden_layers,
            )
        else:
            self.flexidepth_generation = None
        return out


_MODEL_CLASSES: dict[tuple, type] = {}


def family_model_class(model_type: str, param_dtype: str = "float32") -> type:
    """The FlexiDepth model class for a base family: FlexiDepthMixin + e.g. LlamaForCausalLM."""
    key = (model_type, param_dtype)
    if key not in _MODEL_CLASSES:
        base = getattr(transformers, FAMILIES[model_type][1])
        attrs = {"__module__": __name__}
        if param_dtype == "float32":  # fp32 router/adapter stay fp32 whatever dtype the base is loaded in
            attrs["_keep_in_fp32_modules_strict"] = ["router", "adapter"]
        _MODEL_CLASSES[key] = type(f"FlexiDepth{base.__name__}", (FlexiDepthMixin, base), attrs)
    return _MODEL_CLASSES[key]


HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder")


def _weights_file(path, hub: dict | None = None) -> str | None:
    """Local path of the export's weights file (downloaded when `path` is a hub repo, with `hub`: the
    caller's cache_dir / revision / token / ...); None if absent."""
    if os.path.isdir(str(path)):
        local = os.path.join(str(path), (hub or {}).get("subfolder") or "", WEIGHTS_NAME)
        return local if os.path.isfile(local) else None
    from transformers.utils import cached_file

    return cached_file(str(path), WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **(hub or {}))


def check_weights(path, config, model_cls, hub: dict | None = None) -> None:
    """Every tensor the model needs is in model.safetensors with its shape, and nothing else is.

    Raises FlexiDepthExportError naming the file and the first missing, unexpected or mis-shaped tensor
    (a damaged export, or weights of another base model)."""
    from safetensors import safe_open

    file = _weights_file(path, hub)
    if file is None:
        raise FlexiDepthExportError(f"{path}: no {WEIGHTS_NAME}: not a complete FlexiDepth export")
    try:
        with safe_open(file, framework="pt") as handle:
            stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as err:  # damaged header / truncated file
        raise FlexiDepthExportError(f"{file}: damaged safetensors file ({err})") from err
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in stored:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        raise FlexiDepthExportError(f"{file}: missing tensor(s) {missing[:5]} (of {len(missing)})")
    if unexpected:
        raise FlexiDepthExportError(f"{file}: unexpected tensor(s) {unexpected[:5]} (of {len(unexpected)})")
    for key, shape in expected.items():
        if stored[key] != shape:
            raise FlexiDepthExportError(
                f"{file}: tensor {key} has shape {list(stored[key])}, expected {list(shape)}"
            )


class FlexiDepthForCausalLM(transformers.PreTrainedModel):
    """Entry point of the export's `auto_map` (AutoModelForCausalLM): `from_pretrained` builds the family's
    FlexiDepth class (see `family_model_class`), checks the weights file, and loads it.

    Extra keyword: `flexidepth_tau` (float in [0, 1]) replaces the stored threshold."""

    config_class = FlexiDepthConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        tau = kwargs.pop(TAU_KWARG, None)
        hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
        if config is None or not isinstance(getattr(config, ROUTING_KEY, None), dict):
            config = FlexiDepthConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        if tau is not None:
            config.flexidepth["tau"] = check_tau(tau)
        routing = config.flexidepth
        model_cls = family_model_class(routing["base_model_type"], routing["param_dtype"])
        check_weights(pretrained_model_name_or_path, config, model_cls, hub)
        return model_cls.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        routing = check_routing(getattr(config, ROUTING_KEY, None), config.num_hidden_layers)
        return family_model_class(routing["base_model_type"], routing["param_dtype"])(config, **kwargs)


def read_export_config(folder) -> dict:
    """config.json of an export folder as a dict (for tools that only inspect it)."""
    with open(os.path.join(str(folder), "config.json")) as handle:
        return json.load(handle)


__all__ = [
    "FlexiDepthConfig",
    "FlexiDepthExportError",
    "FlexiDepthForCausalLM",
    "FlexiDepthRoutes",
    "check_routing",
    "family_model_class",
]
