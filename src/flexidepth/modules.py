"""The two trainable pieces FlexiDepth adds per routed layer: a router and a skip-path adapter.

Shapes follow the released checkpoint (docs/method.md §3.2, §3.8; docs/checkpoints.md §2): no biases in the projections. Our
optional scalar `bias` on the router logit is the initialisation device described in `FlexiDepthConfig`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RouterRMSNorm(nn.Module):
    """RMSNorm over the bottleneck: variance in fp32, result cast back (as in the released code)."""

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
    """logit = head(dec(tanh(RMSNorm(enc(z))))) [+ bias]; z is the layer's own N_a(x).

    Args:
        hidden_size: d.
        width: bottleneck d_r.
        eps: the base model's rms_norm_eps.
        bias: add a learnable scalar to the logit.
        init_bias: its initial value; the head starts at zero so every gate starts at sigmoid(init_bias).
    """

    def __init__(self, hidden_size: int, width: int, eps: float, bias: bool = True, init_bias: float = 3.0):
        super().__init__()
        self.enc = nn.Linear(hidden_size, width, bias=False)
        self.norm = RouterRMSNorm(width, eps)
        self.dec = nn.Linear(width, hidden_size, bias=False)
        self.head = nn.Linear(hidden_size, 1, bias=False)
        # shape [1], not a 0-dim scalar: DeepSpeed cannot broadcast 0-dim parameters
        self.bias = nn.Parameter(torch.full((1,), float(init_bias))) if bias else None
        self._init_bias = float(init_bias)

    def reset_parameters(self) -> None:
        self.enc.reset_parameters()
        self.dec.reset_parameters()
        nn.init.ones_(self.norm.weight)
        if self.bias is None:
            self.head.reset_parameters()  # no bias to hold gates high: start from a random head
        else:
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.bias, self._init_bias)

    supports_folded = True  # forward(z, folded=True): see `folded_logits`

    def forward(self, z: torch.Tensor, folded: bool = False) -> torch.Tensor:
        """z: [B, T, d] -> logits [B, T] (fp32). folded=True: `folded_logits` (inference only)."""
        if folded:
            return self.folded_logits(z)
        z = z.to(self.enc.weight.dtype)
        logit = self.head(self.dec(torch.tanh(self.norm(self.enc(z))))).squeeze(-1).float()
        return logit if self.bias is None else logit + self.bias.float()

    def folded_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Inference form of `forward` (the layer's fast path calls it; no autograd): z [B, T, d] -> [B, T] fp32.

        `dec` and `head` are linear maps with nothing between them, so head(dec(t)) = t . w with
        w = head.weight @ dec.weight ([d_r], formed in fp32 and cached until either weight changes); the
        bottleneck RMSNorm is one fused `F.rms_norm`. Same value as `forward` up to fp32 rounding (the
        product is summed in another order): 6 ops instead of 16 and one d_r x d matrix-vector product
        fewer per routed layer and token (tests/test_generation.py checks routes and logits).
        """
        w = self._folded_head()
        h = self.enc(z.to(self.enc.weight.dtype))
        dtype = h.dtype
        h = F.rms_norm(h.float(), (h.shape[-1],), eps=self.norm.eps).to(dtype) * self.norm.weight
        logit = torch.tanh(h).float() @ w
        return logit if self.bias is None else logit + self.bias.float()

    def _folded_head(self) -> torch.Tensor:
        dec, head = self.dec.weight, self.head.weight
        key = (dec.data_ptr(), head.data_ptr(), dec._version, head._version, dec.device)
        if getattr(self, "_fold_key", None) != key:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable outside inference
                self._fold = (head.float() @ dec.float()).reshape(-1)  # [d_r]
            self._fold_key = key
        return self._fold


class LinearRouter(nn.Module):
    """logit = w.z [+ bias]: the paper's linear-router ablation (Table 3)."""

    def __init__(self, hidden_size: int, bias: bool = True, init_bias: float = 3.0):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1, bias=False)
        # shape [1], not a 0-dim scalar: DeepSpeed cannot broadcast 0-dim parameters
        self.bias = nn.Parameter(torch.full((1,), float(init_bias))) if bias else None
        self._init_bias = float(init_bias)

    def reset_parameters(self) -> None:
        if self.bias is None:
            self.head.reset_parameters()
        else:
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.bias, self._init_bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logit = self.head(z.to(self.head.weight.dtype)).squeeze(-1).float()
        return logit if self.bias is None else logit + self.bias.float()


class SwiGLUAdapter(nn.Module):
    """down(silu(gate(u)) * up(u)), intermediate width m; replaces the FFN on the skip path.

    `down_proj` starts at zero, so a fresh adapter outputs 0 and the skip path starts as the identity.
    """

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, width, bias=False)
        self.up_proj = nn.Linear(hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)

    def reset_parameters(self) -> None:
        self.gate_proj.reset_parameters()
        self.up_proj.reset_parameters()
        nn.init.zeros_(self.down_proj.weight)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        dtype = u.dtype
        u = u.to(self.gate_proj.weight.dtype)
        return self.down_proj(F.silu(self.gate_proj(u)) * self.up_proj(u)).to(dtype)


def build_router(cfg, hidden_size: int, eps: float) -> nn.Module:
    if cfg.router == "linear":
        router = LinearRouter(hidden_size, cfg.router_bias, cfg.router_init_bias)
    else:
        router = MLPRouter(
            hidden_size, cfg.router_width(hidden_size), eps, cfg.router_bias, cfg.router_init_bias
        )
    router.reset_parameters()
    if getattr(cfg, "init", "near_base") == "released":
        released_init(router)
    return router


def build_adapter(cfg, hidden_size: int, intermediate_size: int) -> nn.Module | None:
    if cfg.adapter == "none":
        return None
    adapter = SwiGLUAdapter(hidden_size, cfg.adapter_width(intermediate_size))
    adapter.reset_parameters()
    if getattr(cfg, "init", "near_base") == "released":
        released_init(adapter)
    return adapter


def released_init(module: nn.Module) -> None:
    """`skip.init=released`: every projection random (nn.Linear's own init), norm weights 1, logit bias 0.

    The release says only that router and adapter start "with random values" (docs/method.md,
    "Initialisation"); nn.Linear's default (uniform in +-1/sqrt(fan_in)) is our reading. Gates then start
    near 0.5 (about half the tokens run each routed layer) and the adapter output is non-zero.
    """
    for child in module.modules():
        if isinstance(child, nn.Linear):
            child.reset_parameters()
        elif isinstance(child, RouterRMSNorm):
            nn.init.ones_(child.weight)
    bias = getattr(module, "bias", None)
    if isinstance(bias, nn.Parameter):
        nn.init.zeros_(bias)
