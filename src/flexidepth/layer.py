"""The FlexiDepth decoder layer: one routed layer of a frozen HF model (docs/method.md §3.4-3.5).

Per token, g = sigmoid(router(N_a(x))) and the hard decision run = g > tau:

    run : x' = x + Attn(N_a(x));   y = x' + g * FFN(N_f(x'))
    skip: K/V of the token are still computed and cached; no query, no attention output;
          y = x + (1 - g) * Adapter(N_f(x))

A layer listed in `always_skip` (config.py) is skipped by every token with g = 0 and computes only
y = x + Adapter(N_f(x)): no router call, no attention and no K/V (no token runs it, so nothing would read
them), in training and at inference alike. Its mirror, a layer set to `always_run` (`set_always_run`, an
inference option for routed layers the router rarely skips), is run by every token with g = 1 and computes
exactly the base layer without calling the router.

The training forward below is the sequence form: attention and FFN run on every row and the rows that
skip are masked out, which equals the per-token definition (a row's query only affects its own output,
while every row's K/V still serves as keys/values). The layer keeps the base layer's submodules under
their own names, so the model's state_dict keys do not change; router and adapter are new children.

Hugging Face output contracts (`output_hidden_states`, `output_attentions`) hold as for the base model: the
layer's output is recorded as its hidden state (hooks installed by `inject`), and the attention module is
called by the layer itself, so it records one attention map per layer. The attention map row of a token that
skips a routed layer is all zeros (the token attended to nothing there). When attention maps are requested,
the layer takes the masked path (the fast path does not form attention probabilities).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .families import FAST_ATTN_IMPLEMENTATIONS, Family, project_kv, project_q_rows

GateForce = float | Callable[[torch.Tensor, int], torch.Tensor] | None


def collecting_outputs(key: str, kwargs: dict | None = None) -> bool:
    """Whether the running HF forward collects `key` ("attentions", "hidden_states") from the layers.

    Read from transformers' output collector (output_capturing), or the `output_<key>` flag in `kwargs`.
    """
    if kwargs and kwargs.get(f"output_{key}"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers: the flag in kwargs is all there is
        return False
    collected = _active_collector.get()
    return bool(collected) and key in collected


def _zero_skipped_attention_rows(module: nn.Module, args, output):
    """Forward hook on a routed layer's attention: rows of skipped queries in the attention map become 0."""
    keep = getattr(module, "_flexidepth_row_keep", None)
    if keep is None or not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
        return None
    weights = output[1]  # [B, H, T, S]
    return (output[0], weights * keep[:, None, :, None].to(weights.dtype), *output[2:])


class FlexiDepthLayer(GradientCheckpointingLayer):
    """Wraps (by composition) a decoder layer with a router and an adapter.

    Args:
        base_layer: the HF decoder layer; its children are re-registered here under the same names.
        router: module mapping N_a(x) [B, T, d] to logits [B, T].
        adapter: skip-path module [B, T, d] -> [B, T, d], or None for the identity skip path.
        layer_index: index of this layer in the decoder stack.
        cfg: the FlexiDepthConfig, shared by every routed layer of the model (tau is read from it on every
            forward; gate_mode, kv_for_skipped are copied at construction).
        recorder: shared RouteRecorder that receives this layer's gates and decisions.
        family: per-family details (families.py).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        router: nn.Module,
        adapter: nn.Module | None,
        layer_index: int,
        cfg,
        recorder,
        family: Family,
    ):
        super().__init__()
        for name, child in base_layer.named_children():
            self.add_module(name, child)
        for attr in ("attention_type", "layer_type", "hidden_size"):  # read by some model loops
            if hasattr(base_layer, attr):
                setattr(self, attr, getattr(base_layer, attr))
        self.router = router
        self.adapter = adapter
        self.layer_index = layer_index
        self.flexi_config = cfg  # shared with model.flexidepth.config: the one owner of tau (see `tau`)
        self.gate_mode = cfg.gate_mode
        self.train_decisions = cfg.train_decisions
        self.kv_for_skipped = cfg.kv_for_skipped
        # every token skips this layer (static): no router, attention or K/V; forced gates do not apply
        self.always_skip = layer_index in cfg.always_skip
        # every token runs this layer (inference option, `set_always_run`): the gate taken as 1 without
        # calling the router, i.e. exactly the base layer; recorded as run with g = 1
        self.always_run = False
        self.recorder = recorder
        self.family = family
        self.routing = True  # False: behave exactly like the base layer (no router, no g scaling)
        self.force_gate: GateForce = None  # constant or callable(z, layer_index) -> g, for tests/benchmarks
        # Inference fast path (real skipping, see `_fast_forward`): None = automatic, i.e. used whenever
        # autograd is off (torch.no_grad / inference_mode); True = always; False = never (masked path).
        self.fast_path: bool | None = None
        # the attention map rows of skipped tokens are zeroed before any other hook (e.g. HF's
        # output_attentions recorder) sees them; `_call_attention` arms it for one call
        self.self_attn.register_forward_hook(_zero_skipped_attention_rows, prepend=True)

    @property
    def tau(self) -> float:
        """The decision threshold (run iff g > tau), read from the shared FlexiDepthConfig on every forward.

        Its only writer is `src.flexidepth.set_tau(model, tau)`; assigning `layer.tau` raises AttributeError."""
        return float(self.flexi_config.tau)

    def _call_attention(self, row_keep: torch.Tensor | None, **kwargs):
        """self_attn(**kwargs) -> (output, weights); row_keep [B, T] bool zeroes skipped rows of the map."""
        self.self_attn._flexidepth_row_keep = row_keep
        try:
            return self.self_attn(**kwargs)
        finally:
            self.self_attn._flexidepth_row_keep = None

    # ------------------------------------------------------------------ gate
    def gate(self, z: torch.Tensor, folded: bool = False) -> torch.Tensor:
        """z = N_a(x): [B, T, d] -> g: [B, T] in fp32. folded: the router's inference form
        (routers with `supports_folded`, called through the module so hooks still see the logits;
        `MLPRouter.folded_logits`: the same value up to fp32 rounding, fewer ops; the fast path uses it)."""
        if self.force_gate is None:
            if folded and getattr(self.router, "supports_folded", False):
                return torch.sigmoid(self.router(z, folded=True))
            return torch.sigmoid(self.router(z))
        if callable(self.force_gate):
            return self.force_gate(z, self.layer_index).float()
        return torch.full(z.shape[:2], float(self.force_gate), device=z.device)

    def branch_weights(self, g: torch.Tensor, run: torch.Tensor, dtype: torch.dtype):
        """Weights of the FFN (run rows) and adapter (skip rows) outputs, each [B, T, 1]."""
        m = run.float()
        if self.gate_mode == "released":
            w_run, w_skip = m * g, (1.0 - m) * (1.0 - g)
        else:  # "ste" / "difference": value 1 on the taken branch; ste: gradient of g / (1 - g) passes through
            st = g - g.detach()
            w_run, w_skip = m * (1.0 + st), (1.0 - m) * (1.0 - st)
        return w_run.unsqueeze(-1).to(dtype), w_skip.unsqueeze(-1).to(dtype)

    # ------------------------------------------------------------------ forward
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
        """hidden_states: [B, T, d] -> [B, T, d]; K/V of every row go to `cache` (unless ablated)."""
        x = hidden_states
        if self.routing and self.always_skip:
            return self._static_skip(x)
        z = self.input_layernorm(x)
        attn_kwargs = dict(
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if self.routing and self.always_run:
            ran = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            self.recorder.record(self.layer_index, ran.float(), ran)
        if not self.routing or self.always_run:
            a, _ = self.self_attn(hidden_states=z, attention_mask=attention_mask, **attn_kwargs)
            h = x + a
            return h + self.mlp(self.post_attention_layernorm(h))

        fast = self._fast_path_applies(attention_mask, position_embeddings) and not collecting_outputs(
            "attentions", kwargs
        )
        g = self.gate(z, folded=fast)
        if self.train_decisions == "sample" and g.requires_grad:
            run = torch.rand_like(g) < g.detach()  # training only: run with probability g
        else:
            run = g > self.tau  # strict: g == tau skips
        self.recorder.record(self.layer_index, g, run)
        if fast:
            return self._fast_forward(x, z, g, run, attention_mask, cache, position_embeddings)

        if not self.kv_for_skipped:
            attention_mask = self._mask_skipped_keys(attention_mask, run, cache)
        a, _ = self._call_attention(run, hidden_states=z, attention_mask=attention_mask, **attn_kwargs)
        h = x + run.unsqueeze(-1).to(x.dtype) * a  # skipped rows: no attention output, x' = x

        if self.gate_mode == "difference" and g.requires_grad:
            return self._difference_forward(x, a, g, run)
        u = self.post_attention_layernorm(h)
        w_run, w_skip = self.branch_weights(g, run, x.dtype)
        y = h + w_run * self.mlp(u)
        if self.adapter is not None:
            y = y + w_skip * self.adapter(u)
        return y

    def _static_skip(self, x: torch.Tensor) -> torch.Tensor:
        """An `always_skip` layer: g = 0 and run = False for every token (recorded), y = x + Adapter(N_f(x))
        (the skip branch's weight 1 - g = 1 in every gate mode); x: [B, T, d] -> [B, T, d]."""
        skipped = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        self.recorder.record(self.layer_index, skipped.float(), skipped)
        if self.adapter is None:
            return x
        return x + self.adapter(self.post_attention_layernorm(x))

    def _difference_forward(self, x: torch.Tensor, a: torch.Tensor, g: torch.Tensor, run: torch.Tensor):
        """Training forward of gate_mode="difference": the value of the hard choice, gradient of the mixture.

        Both branches are computed for every row: y_run = the unmodified layer (x + a, then its FFN) and
        y_skip = x + Adapter(N_f(x)). The output is y_run on running rows and y_skip on skipped rows (unit
        weights, as "ste" serves it), and the gate receives dL/dg = <dL/dy, y_run - y_skip>: the derivative of
        the soft mixture g*y_run + (1-g)*y_skip at the taken branch (the first-order term of SparseMixer-style
        estimators, docs/method.md §3.6). A skipped token therefore still learns how much running would
        have helped, and a running token's output is exactly the base layer's.

        x, a: [B, T, d] (a = attention output of every row); g: [B, T] fp32; run: [B, T] bool -> [B, T, d].
        """
        h = x + a
        y_run = h + self.mlp(self.post_attention_layernorm(h))
        y_skip = x if self.adapter is None else x + self.adapter(self.post_attention_layernorm(x))
        st = (g - g.detach()).unsqueeze(-1).to(x.dtype)  # value 0, gradient 1 to g
        return torch.where(run.unsqueeze(-1), y_run, y_skip) + st * (y_run - y_skip).detach()

    # ------------------------------------------------------------------ ablation: no K/V for skipped
    def _mask_skipped_keys(self, attention_mask, run: torch.Tensor, cache) -> torch.Tensor:
        """Attention mask that hides, at this layer, the keys of tokens that skipped it.

        Every query may still see its own key (a skipped row's output is discarded anyway, and this keeps
        softmax rows non-empty). With a cache, the keep-flags of earlier steps are stored on the cache, over
        absolute positions. The model's mask covers the keys the attention will see: all of them, or with a
        sliding-window cache only the last ones (window - 1 cached + the new tokens); its key j is absolute
        position `total - kv_len + j` (a static cache longer than the sequence: position j).

        Returns a mask of the model mask's kind (bool, or additive float) [B, 1, T, kv_len].
        """
        bsz, seq = run.shape
        layer_idx = self.self_attn.layer_idx
        past = cache.get_seq_length(layer_idx) if cache is not None else 0
        keep = run
        if cache is not None:
            history = cache.__dict__.setdefault("_flexidepth_kv_keep", {})
            prev = history.get(layer_idx)
            if prev is None and past:
                prev = torch.ones(bsz, past, dtype=torch.bool, device=run.device)
            keep = run if prev is None else torch.cat([prev, run], dim=1)
            history[layer_idx] = keep
        total = past + seq
        cache_layers = getattr(cache, "layers", None) or []
        cache_layer = cache_layers[layer_idx] if layer_idx < len(cache_layers) else None
        if attention_mask is not None:
            kv_len = attention_mask.shape[-1]
        elif hasattr(cache_layer, "get_mask_sizes"):
            kv_len = cache_layer.get_mask_sizes(seq)[0]  # the keys this attention call will see
        else:
            kv_len = total
        offset = max(total - kv_len, 0)  # absolute position of the mask's first key
        q_pos = past + torch.arange(seq, device=run.device)
        k_pos = offset + torch.arange(kv_len, device=run.device)
        keep_k = torch.ones(
            bsz, kv_len, dtype=torch.bool, device=run.device
        )  # keys past `total`: masked anyway
        n = min(kv_len, total - offset)
        keep_k[:, :n] = keep[:, offset : offset + n]
        if attention_mask is None:
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None].expand(bsz, 1, seq, kv_len)
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask.expand(bsz, 1, seq, kv_len)
        else:
            allowed = (attention_mask > torch.finfo(attention_mask.dtype).min / 2).expand(bsz, 1, seq, kv_len)
        own = (k_pos[None, :] == q_pos[:, None])[None, None]
        allowed = allowed & (keep_k[:, None, None, :] | own)
        if attention_mask is None or attention_mask.dtype == torch.bool:
            return allowed
        out = torch.zeros(allowed.shape, dtype=attention_mask.dtype, device=run.device)
        return out.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)

    # ------------------------------------------------------------------ inference fast path
    # Real skipping (docs/method.md §3.5, last bullet). Same numbers as the masked forward above, but:
    #   * K/V (RoPE'd; Qwen3 k_norm) of *every* row are projected once and written to the cache once;
    #   * q_proj, attention scores, o_proj and the FFN run only on the rows with g > tau;
    #   * the adapter runs only on the skipped rows.
    # Rows are flattened to [B*T] and gathered with index_select, results written back with index_copy_.
    # The attention of the gathered queries reuses the model's own 4D mask (padding, causality and any
    # active sliding window are already in it), gathered to the running rows; a None mask means plain
    # causal attention (transformers drops the mask only when no padding and no active window).
    #
    # Host-device synchronisations that remain (one per routed layer and forward):
    #   * single row (batch-1 decode): `bool(run)` picks the branch;
    #   * batched decode (T = 1): `int(run.sum())` sizes the gathers;
    #   * prefill / several rows per sequence: `counts.tolist()` (running rows per sequence) sizes them.
    # They are inherent to gathering: a data-dependent shape needs its size on the host. On GPU the sync
    # waits for the router of this layer only; the alternative without syncs is the masked path above.
    # Everything else (gates, decisions, indices) stays on the device.

    def _fast_path_applies(self, attention_mask, position_embeddings) -> bool:
        if self.fast_path is False or not self.kv_for_skipped or position_embeddings is None:
            return False
        if self.fast_path is None and torch.is_grad_enabled():
            return False
        impl = getattr(self.self_attn.config, "_attn_implementation", "sdpa")
        if impl not in FAST_ATTN_IMPLEMENTATIONS:
            return False  # flash / flex kernels take other mask formats: use the masked path
        return attention_mask is None or isinstance(attention_mask, torch.Tensor)

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, is_causal: bool = False
    ) -> torch.Tensor:
        """q: [b, H, m, hd]; keys/values: [b, H_kv, S, hd] -> [b, m, H*hd]. GQA handled by SDPA.
        is_causal (mask None, m == S): SDPA's own causal masking, as the base model's attention does."""
        attn = self.self_attn
        o = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            is_causal=is_causal,
            scale=attn.scaling,
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def _fast_forward(self, x, z, g, run, attention_mask, cache, position_embeddings) -> torch.Tensor:
        attn = self.self_attn
        bsz, seq, dim = x.shape
        cos, sin = position_embeddings
        past = cache.get_seq_length(attn.layer_idx) if cache is not None else 0
        k, v = project_kv(self.family, attn, z, cos, sin)  # every row: skipped tokens keep their K/V
        if cache is not None:
            keys, values = cache.update(k, v, attn.layer_idx)
        else:
            keys, values = k, v
        if bsz * seq == 1:  # batch-1 decode: no gathers at all
            # the branch weight alone (equal to branch_weights' value for this row, in fewer ops):
            # released: g (run) or 1 - g (skip); ste: 1 on the taken branch
            if bool(run):  # host sync: the branch is data dependent
                q = project_q_rows(self.family, attn, z[0], cos[0], sin[0])  # [1, H, hd]
                mask = None if attention_mask is None else attention_mask[..., : keys.shape[-2]]
                h = x + attn.o_proj(self._attend(q.transpose(0, 1)[None], keys, values, mask))
                ffn = self.mlp(self.post_attention_layernorm(h))
                return h + (g.unsqueeze(-1).to(x.dtype) * ffn if self.gate_mode == "released" else ffn)
            if self.adapter is None:
                return x
            ad = self.adapter(self.post_attention_layernorm(x))
            return x + ((1.0 - g).unsqueeze(-1).to(x.dtype) * ad if self.gate_mode == "released" else ad)

        w_run, w_skip = self.branch_weights(g, run, x.dtype)

        if seq == 1:  # batched decode: one row per sequence, no padded layout needed
            return self._fast_decode(x, z, w_run, w_skip, run, attention_mask, keys, values, cos, sin)
        counts = run.sum(1)  # [B] running rows per sequence
        counts_host = counts.tolist()  # host sync: sizes of the gathered tensors
        n_run = sum(counts_host)
        n_rows = bsz * seq
        x_flat = x.reshape(n_rows, dim)
        if n_run == n_rows:  # everything runs: dense, no gathers
            return self._dense_run(x, z, w_run, attention_mask, keys, values, past, cos, sin)
        out = torch.empty_like(x_flat)
        # stable sort: running rows first, each group in (sequence, position) order
        order = torch.argsort((~run.reshape(-1)).to(torch.uint8), stable=True)
        idx_run, idx_skip = order[:n_run], order[n_run:]

        xs = x_flat.index_select(0, idx_skip)
        if self.adapter is not None:
            ws = w_skip.reshape(n_rows, 1).index_select(0, idx_skip)
            xs = xs + ws * self.adapter(self.post_attention_layernorm(xs))
        out.index_copy_(0, idx_skip, xs)
        if n_run == 0:
            return out.view(bsz, seq, dim)

        z_run = z.reshape(n_rows, dim).index_select(0, idx_run)
        q = project_q_rows(
            self.family,
            attn,
            z_run,
            _rows(cos, bsz).index_select(0, idx_run),
            _rows(sin, bsz).index_select(0, idx_run),
        )
        # Padded per-sequence layout for the attention: sequences with >= 1 running row, each with its
        # running queries packed to the front of m_max slots (unused slots have q = 0 and are dropped).
        seqs = [b for b, c in enumerate(counts_host) if c]
        n_seq, m_max = len(seqs), max(counts_host)
        b_of, t_of = idx_run // seq, idx_run % seq
        offsets = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n_run, device=x.device) - offsets[b_of]
        compact = torch.cumsum(counts > 0, 0)[b_of] - 1  # index among the selected sequences
        q_pad = q.new_zeros(n_seq, m_max, q.shape[1], q.shape[2])
        q_pad[compact, rank] = q
        t_pad = torch.full((n_seq, m_max), seq - 1, dtype=torch.long, device=x.device)
        t_pad[compact, rank] = t_of
        if n_seq < bsz:
            sel = torch.tensor(seqs, device=x.device)
            keys, values = keys.index_select(0, sel), values.index_select(0, sel)
        else:
            sel = None
        mask = self._gather_mask(attention_mask, sel, t_pad, past, keys.shape[-2], bsz, seq)
        o = self._attend(q_pad.transpose(1, 2), keys, values, mask)  # [n_seq, m_max, H*hd]
        h = x_flat.index_select(0, idx_run) + attn.o_proj(o[compact, rank])
        wr = w_run.reshape(n_rows, 1).index_select(0, idx_run)
        out.index_copy_(0, idx_run, h + wr * self.mlp(self.post_attention_layernorm(h)))
        return out.view(bsz, seq, dim)

    def _fast_decode(self, x, z, w_run, w_skip, run, attention_mask, keys, values, cos, sin) -> torch.Tensor:
        """One new token per sequence (T = 1, B > 1): gather the running sequences, attend, scatter back."""
        attn = self.self_attn
        bsz, _, dim = x.shape
        flat = run.reshape(-1)
        n_run = int(flat.sum())  # host sync: size of the gathered tensors
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
        q = project_q_rows(
            self.family,
            attn,
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

    def _dense_run(self, x, z, w_run, attention_mask, keys, values, past, cos, sin) -> torch.Tensor:
        """All rows run: the plain layer (FFN scaled by g), attention with the model's mask."""
        attn = self.self_attn
        bsz, seq, dim = x.shape
        q = project_q_rows(self.family, attn, z.reshape(bsz * seq, dim), _rows(cos, bsz), _rows(sin, bsz))
        q = q.view(bsz, seq, q.shape[1], q.shape[2]).transpose(1, 2)
        causal = False
        if attention_mask is not None:  # the model's own mask, rows already in order
            mask = attention_mask[..., : keys.shape[-2]]
        elif past == 0 and seq > 1:  # a prompt without padding: SDPA's causal flag, no mask tensor built
            mask, causal = None, True
        else:
            t_pos = torch.arange(seq, device=x.device).expand(bsz, seq)
            mask = self._gather_mask(None, None, t_pos, past, keys.shape[-2], bsz, seq)
        h = x + attn.o_proj(self._attend(q, keys, values, mask, is_causal=causal))
        return h + w_run * self.mlp(self.post_attention_layernorm(h))

    @staticmethod
    def _gather_mask(attention_mask, sel, t_pad, past: int, kv_len: int, bsz: int, seq: int):
        """The model's mask rows of the gathered queries: [n_seq, 1, m, S], or None if none is needed.

        t_pad: [n_seq, m] query positions (within this forward) per selected sequence; sel: the selected
        sequences (None = all). A None model mask means plain causal attention over [past keys, new keys].
        """
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


def _rows(table: torch.Tensor, bsz: int) -> torch.Tensor:
    """Rotary table [1 or B, T, hd] -> [B*T, hd] (flattened rows, broadcasting a shared batch dim)."""
    return table.expand(bsz, -1, -1).reshape(-1, table.shape[-1])
