"""Triton kernel: QK RMSNorm (learnable scale over head_dim) + Flux RoPE for q and k in one launch.

Reads q and k straight from the qkv projection output ``[B, L, 3*H*Dh]`` through its strides (in the
single-stream blocks it is a strided slice of linear1's wider output: no rearrange copy), and writes rotated
q and k as contiguous ``[B, H, L, Dh]`` ready for attention. One program handles all heads of q and of k
for a tile of tokens, so each token's RoPE row (shared by every head) is loaded once. Channel pairs
(2j, 2j+1) are loaded as two stride-2 vectors; both hit the same cache lines, so DRAM traffic is one read
of q, k and the table and one write of q and k.

Rounding mirrors ``fluxmusic.ops.qk_rmsnorm_rope``: fp32 statistics, normalised value rounded to the storage
dtype, times the scale, rounded to v's dtype, rotated in fp32, rounded once more.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ._common import batch_stride, next_pow2, num_warps_for, rows_per_program

RMS_EPS = 1e-6


@triton.jit
def _rms_rope_heads(src, w_ptr, dst, dst_h, cos, sin, DH, eps, offs_h, offs_j, mask_j, mask):
    """Normalise and rotate all heads of a tile of tokens: [TOKENS, BLOCK_H, BLOCK_J] channel pairs.

    ``src`` / ``dst`` are [TOKENS, 1, 1] pointer tiles at each token's first channel; ``cos``/``sin`` are
    [TOKENS, 1, BLOCK_J].
    """
    ch = offs_h * DH + 2 * offs_j
    x0 = tl.load(src + ch, mask=mask, other=0.0)
    x1 = tl.load(src + ch + 1, mask=mask, other=0.0)
    x0f = x0.to(tl.float32)
    x1f = x1.to(tl.float32)
    ss = tl.sum(x0f * x0f, axis=2) + tl.sum(x1f * x1f, axis=2)
    rrms = (1.0 / tl.sqrt(ss / DH + eps))[:, :, None]
    w0 = tl.load(w_ptr + 2 * offs_j, mask=mask_j, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + 2 * offs_j + 1, mask=mask_j, other=0.0).to(tl.float32)
    ty = dst.dtype.element_ty
    # (x * rrms) is rounded to the input dtype before the scale, as the reference RMSNorm does.
    n0 = ((x0f * rrms).to(x0.dtype).to(tl.float32) * w0).to(ty).to(tl.float32)
    n1 = ((x1f * rrms).to(x1.dtype).to(tl.float32) * w1).to(ty).to(tl.float32)
    out = dst + offs_h * dst_h + 2 * offs_j
    tl.store(out, (cos * n0 - sin * n1).to(ty), mask=mask)
    tl.store(out + 1, (sin * n0 + cos * n1).to(ty), mask=mask)


@triton.jit
def _qk_rmsnorm_rope_kernel(
    QKV, QW, KW, ROPE, QO, KO,
    N, L, H, HALF, DH, D,
    s_b, s_l, r_b, r_l, r_j, r_c,
    eps,
    TOKENS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr,
):
    tok = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    b = (tok // L)[:, None, None]
    l = (tok % L)[:, None, None]
    offs_h = tl.arange(0, BLOCK_H)[None, :, None]
    offs_j = tl.arange(0, BLOCK_J)[None, None, :]
    mask_j = offs_j < HALF
    mask_t = (tok < N)[:, None, None]
    mask = mask_t & (offs_h < H) & mask_j
    rp = ROPE + b * r_b + l * r_l + offs_j * r_j
    cos = tl.load(rp, mask=mask_t & mask_j, other=1.0)
    sin = tl.load(rp + r_c, mask=mask_t & mask_j, other=0.0)
    src = QKV + b * s_b + l * s_l
    out_off = b * H * L * DH + l * DH  # [B, H, L, Dh] contiguous; head stride L * DH
    _rms_rope_heads(src, QW, QO + out_off, L * DH, cos, sin, DH, eps, offs_h, offs_j, mask_j, mask)
    _rms_rope_heads(src + D, KW, KO + out_off, L * DH, cos, sin, DH, eps, offs_h, offs_j, mask_j, mask)


def qk_rmsnorm_rope_fwd(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, rope: Tensor, num_heads: int,
                        q_out: Tensor, k_out: Tensor) -> None:
    """Write normalised, rotated q and k ([B, H, L, Dh], contiguous) from ``qkv`` [B, L, 3*H*Dh]."""
    b, l, three_d = qkv.shape
    d = three_d // 3
    dh = d // num_heads
    if three_d != 3 * num_heads * dh or dh % 2:
        raise ValueError(f"qkv last dim {three_d} is not 3 * {num_heads} heads * an even head_dim")
    if rope.dim() != 4 or rope.shape[1] != l or rope.shape[2] != dh // 2 or rope.shape[3] != 2:
        raise ValueError(f"rope must be [Bp, {l}, {dh // 2}, 2], got {tuple(rope.shape)}")
    if rope.shape[0] not in (1, b):
        raise ValueError(f"rope batch must be 1 or {b}, got {rope.shape[0]}")
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    q_scale, k_scale = q_scale.contiguous(), k_scale.contiguous()
    block_h, block_j = next_pow2(num_heads), next_pow2(dh // 2)
    tokens = rows_per_program(b * l, 2 * block_h * block_j)
    _qk_rmsnorm_rope_kernel[(triton.cdiv(b * l, tokens),)](
        qkv, q_scale, k_scale, rope, q_out, k_out,
        b * l, l, num_heads, dh // 2, dh, d,
        qkv.stride(0), qkv.stride(1), batch_stride(rope), rope.stride(1), rope.stride(2), rope.stride(3),
        RMS_EPS,
        TOKENS=tokens, BLOCK_H=block_h, BLOCK_J=block_j, num_warps=num_warps_for(tokens * block_h * block_j),
    )
