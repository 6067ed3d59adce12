"""``torch.library`` registration of the Triton kernels as ``fluxmusic::*`` ops, and the ``TRITON_OPS`` set.

Each fused op is a ``custom_op``: torch.compile and torch.export see one opaque node per op and propagate
shapes through its ``register_fake`` (meta) function, so tracing never launches a kernel. (``triton_op`` would
let Inductor look inside, but these ops are already single fused kernels, and its tracing path runs the
kernel on fake tensors under ``TRITON_INTERPRET=1``, so it could not be tested without a GPU.) Backward
passes are the closed-form torch formulas in :mod:`.backward`.

Attention stays the library's ``scaled_dot_product_attention`` (FlashAttention-2 / memory-efficient backends on
CUDA): see docs/kernels.md for why it is not replaced by a RoPE-in-load kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from fluxmusic import ops as ref
from fluxmusic.ops import OpSet

from . import backward as bw
from .modulate import gated_residual_fwd, gated_residual_modulate_fwd, layernorm_modulate_fwd
from .qk_norm_rope import qk_rmsnorm_rope_fwd


def _empty_rows(x: Tensor) -> Tensor:
    """A contiguous [B, L, D] output in x's dtype and device (x may be a strided slice)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _qk_out(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    b, l, three_d = qkv.shape
    dh = three_d // (3 * num_heads)
    shape = (b, num_heads, l, dh)
    return (torch.empty(shape, dtype=qkv.dtype, device=qkv.device),
            torch.empty(shape, dtype=qkv.dtype, device=qkv.device))


# --- layernorm_modulate ------------------------------------------------------------------------------------

@custom_op("fluxmusic::layernorm_modulate", mutates_args=())
def layernorm_modulate_op(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    out = _empty_rows(x)
    layernorm_modulate_fwd(x, shift, scale, out)
    return out


@layernorm_modulate_op.register_fake
def _(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return _empty_rows(x)


def _lnm_setup(ctx, inputs, output) -> None:
    x, shift, scale = inputs
    ctx.save_for_backward(x, shift, scale)


def _lnm_backward(ctx, g: Tensor):
    x, shift, scale = ctx.saved_tensors
    dx, dshift, dscale = bw.layernorm_modulate_bwd(g, x, scale, shift)
    return dx, dshift, dscale


layernorm_modulate_op.register_autograd(_lnm_backward, setup_context=_lnm_setup)


# --- gated_residual ----------------------------------------------------------------------------------------

@custom_op("fluxmusic::gated_residual", mutates_args=())
def gated_residual_op(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    out = _empty_rows(x)
    gated_residual_fwd(x, gate, y, out)
    return out


@gated_residual_op.register_fake
def _(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return _empty_rows(x)


def _gr_setup(ctx, inputs, output) -> None:
    _, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gr_backward(ctx, g: Tensor):
    gate, y = ctx.saved_tensors
    return bw.gated_residual_bwd(g, gate, y)


gated_residual_op.register_autograd(_gr_backward, setup_context=_gr_setup)


# --- gated_residual_modulate -------------------------------------------------------------------------------

@custom_op("fluxmusic::gated_residual_modulate", mutates_args=())
def gated_residual_modulate_op(
    x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor]:
    r, m = _empty_rows(x), _empty_rows(x)
    gated_residual_modulate_fwd(x, gate, y, shift, scale, r, m)
    return r, m


@gated_residual_modulate_op.register_fake
def _(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    return _empty_rows(x), _empty_rows(x)


def _grm_setup(ctx, inputs, output) -> None:
    _, gate, y, shift, scale = inputs
    r, _ = output
    ctx.save_for_backward(gate, y, shift, scale, r)


def _grm_backward(ctx, gr: Tensor | None, gm: Tensor | None):
    gate, y, shift, scale, r = ctx.saved_tensors
    dshift = dscale = None
    dr = torch.zeros_like(r, dtype=torch.float32) if gr is None else gr.float()
    if gm is not None:
        dr_ln, dshift, dscale = bw.layernorm_modulate_bwd(gm, r, scale, shift)
        dr = dr + dr_ln.float()
    dx, dgate, dy = bw.gated_residual_bwd(dr, gate, y)
    return dx.to(r.dtype), dgate, dy, dshift, dscale


gated_residual_modulate_op.register_autograd(_grm_backward, setup_context=_grm_setup)


# --- qk_rmsnorm_rope ---------------------------------------------------------------------------------------

@custom_op("fluxmusic::qk_rmsnorm_rope", mutates_args=())
def qk_rmsnorm_rope_op(
    qkv: Tensor, q_scale: Tensor, k_scale: Tensor, rope: Tensor, num_heads: int
) -> tuple[Tensor, Tensor]:
    q, k = _qk_out(qkv, num_heads)
    qk_rmsnorm_rope_fwd(qkv, q_scale, k_scale, rope, num_heads, q, k)
    return q, k


@qk_rmsnorm_rope_op.register_fake
def _(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, rope: Tensor, num_heads: int) -> tuple[Tensor, Tensor]:
    return _qk_out(qkv, num_heads)


def _qk_setup(ctx, inputs, output) -> None:
    qkv, q_scale, k_scale, rope, num_heads = inputs
    ctx.num_heads = num_heads
    ctx.save_for_backward(qkv, q_scale, k_scale, rope)


def _qk_backward(ctx, gq: Tensor | None, gk: Tensor | None):
    qkv, q_scale, k_scale, rope = ctx.saved_tensors
    b, l, three_d = qkv.shape
    shape = (b, ctx.num_heads, l, three_d // (3 * ctx.num_heads))
    gq = gq if gq is not None else qkv.new_zeros(shape)
    gk = gk if gk is not None else qkv.new_zeros(shape)
    dqkv, dqs, dks = bw.qk_rmsnorm_rope_bwd(gq, gk, qkv, q_scale, k_scale, rope, ctx.num_heads)
    return dqkv, dqs, dks, None, None


qk_rmsnorm_rope_op.register_autograd(_qk_backward, setup_context=_qk_setup)


# --- the OpSet ---------------------------------------------------------------------------------------------

def _exporting() -> bool:
    """ONNX / TensorRT export always traces the plain-torch references (the custom ops have no ONNX symbolic)."""
    return torch.onnx.is_in_onnx_export()


def layernorm_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    if _exporting():
        return ref.layernorm_modulate(x, shift, scale)
    return layernorm_modulate_op(x, shift, scale)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    if _exporting():
        return ref.gated_residual(x, gate, y)
    return gated_residual_op(x, gate, y)


def gated_residual_modulate(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    if _exporting():
        return ref.gated_residual_modulate(x, gate, y, shift, scale)
    return gated_residual_modulate_op(x, gate, y, shift, scale)


def qk_rmsnorm_rope(
    qkv: Tensor, q_scale: Tensor, k_scale: Tensor, rope: Tensor, num_heads: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`fluxmusic.ops.qk_rmsnorm_rope`; v is returned as a view of ``qkv``."""
    if _exporting():
        return ref.qk_rmsnorm_rope(qkv, q_scale, k_scale, rope, num_heads)
    q, k = qk_rmsnorm_rope_op(qkv, q_scale, k_scale, rope, num_heads)
    return q, k, ref.split_qkv(qkv, num_heads)[2]


TRITON_OPS = OpSet(
    name="triton",
    layernorm_modulate=layernorm_modulate,
    gated_residual=gated_residual,
    gated_residual_modulate=gated_residual_modulate,
    qk_rmsnorm_rope=qk_rmsnorm_rope,
    attention=ref.attention,
)
