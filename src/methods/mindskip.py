"""mindskip: MindSkip-style routing (Router-Tuning, He et al. 2024), as a baseline: skip *attention* per *sequence*.

What differs from FlexiDepth (as far as the published description goes; our choices are marked):
  * the router reads the mean of the layer's normalised input over the sequence's real tokens, so one
    gate g decides for the whole sequence (FlexiDepth decides per token);
  * only attention is skipped: run  -> h = x + g * Attn(N_a(x));  skip -> h = x;
    the FFN always runs, y = h + FFN(N_f(h)), and there is no adapter;
  * training is the same router-only recipe (frozen base, L_lm + alpha * L_skip with the gate broadcast to
    the sequence's tokens), so the comparison isolates the routing granularity and what is skipped.
Our choices: the router is the config's (default `linear` in conf/method/mindskip.yaml), K/V of a skipped
sequence are still computed and cached like FlexiDepth's (so cached decoding stays consistent), and in
cached decoding each step's gate is computed from the new token alone (the prompt's gate decides prefill).
"Layers used" in route statistics counts a layer whose attention was skipped as skipped; the FFN still
runs, which `MindSkip.cost` accounts for.
`MindSkip` (method=mindskip) is trained like FlexiDepth (routers only); evaluation loads the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..flexidepth import FlexiDepthConfig, inject, load_flexidepth
from ..flexidepth.flops import layer_macs, model_macs_per_token
from ..flexidepth.layer import FlexiDepthLayer
from .base import AppliedMethod
from .flexidepth import FlexiDepth


class MindSkipLayer(FlexiDepthLayer):
    """A routed layer with a per-sequence gate that skips the attention block only."""

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, T, d] -> g: [B, T], the same gate for every token of a sequence.

        The pooled state is the mean over the sequence's real tokens of this forward (padding excluded, so
        the gate does not depend on the batch a sequence is in or on the pad id)."""
        if self.force_gate is not None:
            return super().gate(z)
        mask = self.recorder.token_mask  # [B, past + T] real-token mask of this forward (inject's hook)
        bsz, seq = z.shape[:2]
        if mask is not None and mask.shape[0] == bsz and mask.shape[1] >= seq:
            w = mask[:, -seq:].to(z.dtype).unsqueeze(-1)  # this forward's positions: padding weighs 0
            pooled = (z * w).sum(1) / w.sum(1).clamp_min(1.0)
        else:
            pooled = z.mean(1)
        g = torch.sigmoid(self.router(pooled.unsqueeze(1)))  # [B, 1]
        return g.expand(z.shape[0], z.shape[1])

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
        x = hidden_states
        z = self.input_layernorm(x)
        run = None
        if self.routing:
            g = self.gate(z)
            run = g > self.tau
            self.recorder.record(self.layer_index, g, run)
        a, _ = self._call_attention(
            run,  # a skipped sequence's attention map rows are zeros
            hidden_states=z,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        if not self.routing:
            h = x + a
        else:
            h = x + (run.float() * g).unsqueeze(-1).to(x.dtype) * a
        return h + self.mlp(self.post_attention_layernorm(h))


def inject_mindskip(model, cfg: FlexiDepthConfig) -> torch.nn.Module:
    """Inject MindSkip layers (router only; `adapter` must be `none`) and freeze everything else. ValueError
    naming the skip key for an adapter or `always_skip` layers."""
    if cfg.adapter != "none":
        raise ValueError("method=mindskip has no adapter: set skip.adapter=none (conf/skip/mindskip.yaml)")
    if cfg.always_skip:
        raise ValueError(
            f"method=mindskip routes every layer per sequence: skip.always_skip={list(cfg.always_skip)} is a "
            "FlexiDepth option (set skip.always_skip=[])"
        )
    return inject(model, cfg, layer_cls=MindSkipLayer)


@dataclass
class MindSkip(FlexiDepth):
    name: str = "mindskip"
    trains = True

    def inject(self, model, flexi_cfg: FlexiDepthConfig):
        return inject_mindskip(model, flexi_cfg)

    def load(self, model, ckpt, cfg: FlexiDepthConfig) -> None:
        self.inject(model, cfg)
        load_flexidepth(model, ckpt)

    def cost(self, config, applied: AppliedMethod, layers_skipped: float) -> float:
        """A skipped attention saves q and o (K/V are still computed); every routed layer pays the router."""
        lay = layer_macs(config, applied.flexi_cfg)
        routed = len(applied.flexi_cfg.routed_layers(config.num_hidden_layers))
        return model_macs_per_token(config) + routed * lay.router - layers_skipped * (lay.q + lay.o)
