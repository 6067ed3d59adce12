"""Closed-form backward passes of the fused ops, in plain torch (fp32 math, recomputing the statistics).

Forward kernels save only their inputs; backward recomputes LN / RMS statistics (one cheap reduction) rather
than storing them, which keeps activation memory equal to the unfused chain's inputs. These are ordinary torch
ops, so torch.compile can fuse them too. They are checked against autograd through the references in
tests/test_kernels.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

LN_EPS = 1e-6
RMS_EPS = 1e-6


def _as3(m: Tensor) -> Tensor:
    """[B, D] or [B, 1, D] modulation vector -> [B, 1, D]."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def reduce_to(g: Tensor, like: Tensor) -> Tensor:
    """Sum a [B, L, D] gradient down to a per-sample vector shaped like ``like`` ([B|1, D] or [B|1, 1, D])."""
    m3 = _as3(like)
    return g.sum_to_size(m3.shape).reshape(like.shape).to(like.dtype)


def layernorm_modulate_bwd(g: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``(1 + scale) * LN(x) + shift`` w.r.t. (x, shift, scale)."""
    xf, gf = x.float(), g.float()
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + LN_EPS)
    xhat = (xf - mean) * rstd
    gxh = gf * (1 + _as3(scale).float())
    dx = rstd * (gxh - gxh.mean(-1, keepdim=True) - xhat * (gxh * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), reduce_to(gf, shift), reduce_to(gf * xhat, scale)


def gated_residual_bwd(g: Tensor, gate: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``x + gate * y`` w.r.t. (x, gate, y)."""
    gf = g.float()
    return g, reduce_to(gf * y.float(), gate), (gf * _as3(gate).float()).to(y.dtype)


def _unrope(g: Tensor, rope: Tensor) -> Tensor:
    """Transpose of the RoPE rotation (rotate by -angle), fp32; g is [B, H, L, Dh]."""
    gf = g.float().reshape(*g.shape[:-1], -1, 2)
    g0, g1 = gf[..., 0], gf[..., 1]
    cos, sin = rope[..., 0].unsqueeze(1), rope[..., 1].unsqueeze(1)
    return torch.stack((cos * g0 + sin * g1, cos * g1 - sin * g0), dim=-1).reshape(g.shape)


def _rmsnorm_bwd(dn: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``rms_norm(x) * w`` w.r.t. (x, w), given the fp32 gradient ``dn`` of its output."""
    xf = x.float()
    rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    xhat = xf * rrms
    dw = (dn * xhat).sum(dim=tuple(range(dn.dim() - 1))).to(w.dtype)
    gxh = dn * w.float()
    dx = rrms * (gxh - xhat * (gxh * xhat).mean(-1, keepdim=True))
    return dx, dw


def qk_rmsnorm_rope_bwd(gq: Tensor, gk: Tensor, qkv: Tensor, q_scale: Tensor, k_scale: Tensor,
                        rope: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (qkv, q_scale, k_scale). The v third of d(qkv) is zero: v leaves the op as a view
    of qkv, so its gradient reaches qkv through autograd's view tracking, not through this op."""
    b, l, three_d = qkv.shape
    d = three_d // 3
    dh = d // num_heads
    heads = qkv.view(b, l, 3, num_heads, dh) if qkv.is_contiguous() else qkv.reshape(b, l, 3, num_heads, dh)
    dq, dqs = _rmsnorm_bwd(_unrope(gq, rope), heads[:, :, 0].transpose(1, 2), q_scale)
    dk, dks = _rmsnorm_bwd(_unrope(gk, rope), heads[:, :, 1].transpose(1, 2), k_scale)
    rows = (dq.transpose(1, 2).reshape(b, l, d), dk.transpose(1, 2).reshape(b, l, d))
    dqkv = torch.cat((*rows, qkv.new_zeros(b, l, d, dtype=torch.float32)), dim=-1)
    return dqkv.to(qkv.dtype), dqs, dks
