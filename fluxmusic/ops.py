"""Plain-torch reference implementations of the transformer's fused-op candidates.

These are the ops the model, the training loop and the ONNX/TensorRT exporters use. Triton kernels in
``fluxmusic.kernels`` implement the same signatures; the model calls whichever :class:`OpSet` it holds.

Shapes: ``B`` batch, ``L`` sequence, ``D`` hidden size, ``H`` heads, ``Dh`` head dim.
A RoPE table is ``[Bp, L, Dh // 2, 2]`` float32 holding (cos, sin) per frequency, ``Bp`` in {1, B}; it rotates
adjacent channel pairs: ``(x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-6
RMS_EPS = 1e-6


def _per_sample(m: Tensor) -> Tensor:
    """Modulation vectors are [B, D]; make them broadcast over the sequence as [B, 1, D]."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LayerNorm without affine (eps 1e-6, statistics in fp32), then ``(1 + scale) * x + shift``."""
    xn = F.layer_norm(x.float(), x.shape[-1:], eps=LN_EPS).to(x.dtype)
    return (1 + _per_sample(scale)) * xn + _per_sample(shift)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """``x + gate * y`` with a per-sample gate."""
    return x + _per_sample(gate) * y


def gated_residual_modulate(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The residual update followed by the next modulation: returns (x + gate*y, modulate(LN(x + gate*y)))."""
    r = gated_residual(x, gate, y)
    return r, layernorm_modulate(r, shift, scale)


def rms_norm(x: Tensor, weight: Tensor) -> Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back before the learnable scale (as Flux)."""
    xf = x.float()
    rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    return (xf * rrms).to(x.dtype) * weight


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` [B, H, L, Dh] by ``rope`` [Bp, L, Dh/2, 2] (in fp32)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = rope[..., 0].unsqueeze(1), rope[..., 1].unsqueeze(1)
    out = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1)
    return out.reshape(x.shape).type_as(x)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*Dh] (q, k, v blocks, heads inside) -> three [B, H, L, Dh] views."""
    b, l, three_d = qkv.shape
    dh = three_d // (3 * num_heads)
    q, k, v = qkv.view(b, l, 3, num_heads, dh).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def qk_rmsnorm_rope(
    qkv: Tensor, q_scale: Tensor, k_scale: Tensor, rope: Tensor, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """QK RMSNorm (learnable scale over head_dim) then RoPE on q and k; v passes through.

    Returns q, k, v as [B, H, L, Dh], q and k in v's dtype (as the official QKNorm casts them).
    """
    q, k, v = split_qkv(qkv, num_heads)
    q = rms_norm(q, q_scale).to(v.dtype)
    k = rms_norm(k, k_scale).to(v.dtype)
    return apply_rope(q, rope), apply_rope(k, rope), v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention over [B, H, L, Dh], merged back to [B, L, H*Dh]."""
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, l, dh = out.shape
    return out.transpose(1, 2).reshape(b, l, h * dh)


def rope_attention(q: Tensor, k: Tensor, v: Tensor, rope: Tensor) -> Tensor:
    """Attention with RoPE applied to q and k first (q, k already RMS-normed)."""
    return attention(apply_rope(q, rope), apply_rope(k, rope), v)


@dataclass(frozen=True)
class OpSet:
    """The fusable ops the transformer calls; a kernel backend provides another instance."""

    name: str
    layernorm_modulate: Callable[[Tensor, Tensor, Tensor], Tensor]
    gated_residual: Callable[[Tensor, Tensor, Tensor], Tensor]
    gated_residual_modulate: Callable[..., tuple[Tensor, Tensor]]
    qk_rmsnorm_rope: Callable[..., tuple[Tensor, Tensor, Tensor]]
    attention: Callable[[Tensor, Tensor, Tensor], Tensor]


REFERENCE_OPS = OpSet(
    name="reference",
    layernorm_modulate=layernorm_modulate,
    gated_residual=gated_residual,
    gated_residual_modulate=gated_residual_modulate,
    qk_rmsnorm_rope=qk_rmsnorm_rope,
    attention=attention,
)
