"""Plain-torch reference implementations of the transformer's fused-op candidates.

These are the ops the model, the training loop and the ONNX/TensorRT exporters use. Triton kernels in
``fluxmusic.kernels`` implement the same signatures; the model calls whichever :class:`OpSet` it holds.

Shapes: ``B`` batch, ``L`` sequence, ``D`` hidden size, ``H`` heads, ``Dh`` head dim.
A RoPE table is ``[Bp, L, Dh // 2, 2]`` float32 holding (cos, sin) per frequency, ``Bp`` in {1, B}; it rotates
adjacent channel pairs: ``(x0, x1) -> (cos x0 - sin x1, sin x0 + cos x1)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxmusic import cpu_attention
from fluxmusic.cpu_attention import scores_bounded

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


def project_qkv(layer: nn.Linear, x: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """The fused input projection (q, k, v, and in single-stream blocks the MLP input), as the checkpoint has it."""
    return layer(x)


def _halves_order(t: Tensor, width: int, head_dim: int) -> Tensor:
    """``t`` with its first ``width`` entries along dim 0 (every head's q and k channels) reordered from RoPE's
    adjacent pairs (0, 1), (2, 3), ... to halves: the even channels, then the odd ones; the rest stay."""
    qk = t[:width].reshape(width // head_dim, head_dim // 2, 2, *t.shape[1:]).transpose(1, 2)
    return torch.cat((qk.reshape(width, *t.shape[1:]), t[width:]))


def project_qkv_halves(layer: nn.Linear, x: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """:func:`project_qkv` with q and k channels in halves order (see :func:`qk_rmsnorm_rope_halves`).

    For compiled inference: with frozen weights inductor folds the reordering into the weight constants, so it
    costs nothing per call; eagerly it would copy the weights on every call."""
    width = 2 * num_heads * head_dim
    bias = None if layer.bias is None else _halves_order(layer.bias, width, head_dim)
    return F.linear(x, _halves_order(layer.weight, width, head_dim), bias)


def qk_rmsnorm_rope_halves(
    qkv: Tensor, q_scale: Tensor, k_scale: Tensor, rope: Tensor, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`qk_rmsnorm_rope` for q and k channels in halves order (:func:`project_qkv_halves`): every RoPE
    pair is (i, i + Dh/2) instead of (2i, 2i + 1), so the rotation reads and writes whole contiguous halves and
    vectorises; inductor gathers the adjacent-pair form element by element (2.3x slower at the ``small`` shapes).
    q.k is unchanged by a reordering of both q's and k's channels, and v keeps its order, so attention gives the
    reference output."""
    q, k, v = split_qkv(qkv, num_heads)
    dh = q.shape[-1]
    q = rms_norm(q, _halves_order(q_scale, dh, dh)).to(v.dtype)
    k = rms_norm(k, _halves_order(k_scale, dh, dh)).to(v.dtype)
    return _rope_halves(q, rope), _rope_halves(k, rope), v


def _rope_halves(x: Tensor, rope: Tensor) -> Tensor:
    """:func:`apply_rope` for channels in halves order."""
    xf = x.float()
    x0, x1 = xf.chunk(2, dim=-1)
    cos, sin = rope[..., 0].unsqueeze(1), rope[..., 1].unsqueeze(1)
    return torch.cat((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention over [B, H, L, Dh], merged back to [B, L, H*Dh]."""
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, l, dh = out.shape
    return out.transpose(1, 2).reshape(b, l, h * dh)


#: Elements of one block of attention scores (heads x queries x keys). ~1 M bf16 scores (2 MiB) stay in the
#: L2 cache with the softmax reading and writing them in place; measured on a 2-core AVX512-BF16 CPU at
#: the ``small`` shapes, larger blocks spill to memory and run the softmax at memory speed.
ATTENTION_BLOCK_ELEMENTS = 1 << 20


def blocked_attention(q: Tensor, k: Tensor, v: Tensor, block_elements: int = ATTENTION_BLOCK_ELEMENTS,
                      exp_sum: bool = True) -> Tensor:
    """Attention as two batched GEMMs per block of (heads, queries) with the softmax between; [B, L, H*Dh].

    For reduced-precision inputs (bf16/fp16) QK^T and PV run as bf16 GEMMs with fp32 accumulation (oneDNN,
    the matmul peak) and the softmax computes in fp32 internally, reading the bf16 scores; the 1/sqrt(Dh)
    scale is applied in the GEMM's fp32 epilogue (``baddbmm`` alpha). The scores are rounded to bf16 once
    before the softmax (CPU GEMMs cannot write fp32 from bf16 inputs), which flash attention avoids: the
    parity cost is measured in docs/performance.md. fp32 inputs, and any device other than the CPU, go to
    :func:`attention` (the fused flash kernel is already at the fp32 matmul rate there), as does training.
    When the scores are provably bounded (:func:`_exp_sum_values`) the softmax becomes one in-place exp and the
    row sums come out of the PV GEMM; ``exp_sum=False`` keeps the softmax (for comparison).
    """
    if not _cpu_reduced_inference(q, k, v):
        return attention(q, k, v)  # (the block loop writes with out=, which autograd cannot differentiate)
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    scale = dh**-0.5
    v_ones = _exp_sum_values(q, k, v, scale) if exp_sum else None  # (exp_sum=False: the softmax, for comparison)
    kt = k.transpose(2, 3)
    # One block: hb heads x bq queries x all keys, about block_elements scores.
    hb = max(1, min(h, block_elements // (lk * min(lq, 256))))
    bq = max(16, min(lq, block_elements // (hb * lk)))
    out = torch.empty(b, lq, h, dh, dtype=q.dtype, device=q.device)
    out_bhld = out.permute(0, 2, 1, 3)  # a view: results land directly in the merged [B, L, H*Dh] layout
    scores = torch.empty(hb, bq, lk, dtype=q.dtype, device=q.device)
    for bi in range(b):
        for h0 in range(0, h, hb):
            h1 = min(h0 + hb, h)
            kk, vv = kt[bi, h0:h1], v[bi, h0:h1]
            for s in range(0, lq, bq):
                s1 = min(s + bq, lq)
                sc = scores[: h1 - h0, : s1 - s]
                torch.baddbmm(sc, q[bi, h0:h1, s:s1], kk, beta=0.0, alpha=scale, out=sc)
                if v_ones is None:
                    out_bhld[bi, h0:h1, s:s1] = torch.bmm(torch.softmax(sc, dim=-1), vv)
                else:  # scores are bounded: exp, then the numerator and the row sum in one GEMM
                    pv = torch.bmm(sc.exp_(), v_ones[bi, h0:h1])
                    torch.div(pv[..., :dh], pv[..., dh : dh + 1], out=out_bhld[bi, h0:h1, s:s1])
    return out.view(b, lq, h * dh)


#: Largest score magnitude the exp-sum attention accepts: exp of scores in [-40, 40] neither overflows nor
#: underflows (bf16 shares fp32's exponent range, normal from ~1e-38 to ~3e38), and a row of 2^20 keys sums
#: to at most ~2.5e23.
EXP_SUM_MAX_SCORE = 40.0


def _exp_sum_values(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor | None:
    """``[v, 1, 0]`` (V with a ones channel, padded to an even width) when attention may skip the softmax's
    max; None when it may not, and the caller keeps the softmax.

    A softmax needs each row's max (one pass over the scores), exp and sum (a second) and a divide (a third);
    at Dh = 32 those passes cost more than both GEMMs. The max only guards exp against overflow: when every
    score is known to lie in [-40, 40] (Cauchy-Schwarz: ``|s| <= scale * max|q| * max|k|``, which QK RMS-norm
    keeps near sqrt(Dh)), exp(s) is safe as it is. The ones channel makes the PV GEMM return each row's sum
    beside its numerator, so what is left of the softmax is one in-place exp and a divide of [L, Dh].
    """
    if not scores_bounded(q, k, scale, EXP_SUM_MAX_SCORE):
        return None
    b, h, lk, dh = v.shape
    v_ones = v.new_zeros(b, h, lk, dh + 2)
    v_ones[..., :dh] = v
    v_ones[..., dh] = 1
    return v_ones


def _cpu_reduced_inference(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """bf16/fp16 CPU tensors outside autograd, tracing and ONNX export: where the CPU attention paths apply."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return not (q.dtype == torch.float32 or q.device.type != "cpu" or needs_grad or torch.jit.is_tracing()
                or _exporting())


def fused_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention through the fused AVX512-BF16 kernel (:mod:`fluxmusic.cpu_attention`) for bf16 on the CPU,
    else (fp16, no compiler, another CPU, unbounded scores, training, export) :func:`blocked_attention`.

    The kernel keeps the scores in registers from QK^T to PV, so the softmax costs no pass over memory; its
    scores stay fp32 until exp (the blocked path rounds them to bf16 first). Parity and speed:
    docs/performance.md.
    """
    if _cpu_reduced_inference(q, k, v):
        out = cpu_attention.fused_attention(q, k, v)
        if out is not None:
            return out
    return blocked_attention(q, k, v)


def fused_qk_rmsnorm_rope(
    qkv: Tensor, q_scale: Tensor, k_scale: Tensor, rope: Tensor, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`qk_rmsnorm_rope` through the one-pass C kernel (:func:`fluxmusic.cpu_attention.qk_norm_rope`) for
    bf16 inference on the CPU: it reads the projection once and writes q and k once, with the reference's
    rounding steps (eager, the op-by-op form made ~10 passes over q and k: 7.1 ms per block at the ``small``
    shapes, 18% of an evaluation). Elsewhere, or where the kernel does not apply, the reference."""
    if _cpu_reduced_inference(qkv, q_scale, k_scale):
        qk = cpu_attention.qk_norm_rope(qkv, q_scale, k_scale, rope, num_heads, RMS_EPS)
        if qk is not None:
            return qk[0], qk[1], split_qkv(qkv, num_heads)[2]
    return qk_rmsnorm_rope(qkv, q_scale, k_scale, rope, num_heads)


def gelu_tanh(x: Tensor) -> Tensor:
    """The MLP activation of Flux: GELU with the tanh approximation."""
    return F.gelu(x, approximate="tanh")


def fast_gelu(x: Tensor) -> Tensor:
    """:func:`gelu_tanh`, but the erf form for bf16 on the CPU.

    torch's bf16 tanh-GELU kernel on the CPU is ~8x slower than its erf GELU (9.9 vs 1.2 ms at [2560, 2048],
    one thread). The two forms differ by at most 5e-4 (the tanh approximation's own error), below bf16's
    resolution wherever |GELU(x)| > 0.13: over every bf16 input in [-8, 8] the bf16 outputs differ by at most
    one bf16 ulp or 4.9e-4, whichever is larger. The whole-model effect is measured in docs/performance.md.
    Other dtypes keep the tanh form.
    """
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return F.gelu(x)
    return gelu_tanh(x)


def _exporting() -> bool:
    """True while torch.onnx is exporting (the export keeps the plain SDPA graph)."""
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except AttributeError:  # pragma: no cover - very old torch
        return False


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
    gelu: Callable[[Tensor], Tensor] = gelu_tanh
    project_qkv: Callable[[nn.Linear, Tensor, int, int], Tensor] = project_qkv


REFERENCE_OPS = OpSet(
    name="reference",
    layernorm_modulate=layernorm_modulate,
    gated_residual=gated_residual,
    gated_residual_modulate=gated_residual_modulate,
    qk_rmsnorm_rope=qk_rmsnorm_rope,
    attention=attention,
)

#: The reference ops with block-GEMM attention: for bf16 on the CPU (see :func:`blocked_attention`).
BLOCKED_ATTENTION_OPS = OpSet(
    name="blocked-attention",
    layernorm_modulate=layernorm_modulate,
    gated_residual=gated_residual,
    gated_residual_modulate=gated_residual_modulate,
    qk_rmsnorm_rope=qk_rmsnorm_rope,
    attention=blocked_attention,
    gelu=fast_gelu,
)

#: The reference ops with the fused CPU attention kernel (falling back to block-GEMM attention where it cannot
#: run) and the one-pass QK norm + RoPE kernel: for bf16 on the CPU (see :func:`fused_attention`,
#: :func:`fused_qk_rmsnorm_rope`).
FUSED_ATTENTION_OPS = dataclasses.replace(BLOCKED_ATTENTION_OPS, name="fused-attention", attention=fused_attention,
                                          qk_rmsnorm_rope=fused_qk_rmsnorm_rope)

#: Attention implementations selectable by name (``attention=`` of the torch backend, the benchmarks).
ATTENTION_OPSETS = {"sdpa": REFERENCE_OPS, "blocked": BLOCKED_ATTENTION_OPS, "fused": FUSED_ATTENTION_OPS}


def opset_for(attention_impl: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> OpSet:
    """The op set for an attention choice: ``sdpa``, ``blocked``, ``fused`` or ``auto`` (fused for bf16/fp16 on
    the CPU, which runs the kernel for bf16 and block-GEMM attention for fp16)."""
    if attention_impl == "auto":
        reduced = dtype in (torch.bfloat16, torch.float16)
        return FUSED_ATTENTION_OPS if reduced and torch.device(device).type == "cpu" else REFERENCE_OPS
    if attention_impl not in ATTENTION_OPSETS:
        from fluxmusic.errors import FluxMusicError

        raise FluxMusicError(
            f"attention {attention_impl!r} is not supported; allowed: auto, {', '.join(ATTENTION_OPSETS)}"
        )
    return ATTENTION_OPSETS[attention_impl]
