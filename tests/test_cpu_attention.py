"""The fused AVX512-BF16 attention kernel (fluxmusic.cpu_attention, fluxmusic/csrc/attention_bf16.c): parity
with fp32 SDPA at every compiled head dim and at key counts around the 16/32/64-key tile edges, the paths it
declines, the build, and fork safety (the whole model through ``FUSED_ATTENTION_OPS``: test_perf_ops)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fluxmusic import cpu_attention
from fluxmusic.ops import attention, blocked_attention, fused_attention

needs_kernel = pytest.mark.skipif(
    not cpu_attention.available(),
    reason=f"the fused kernel does not run here: {cpu_attention.unavailable_reason()}",
)


def _rms_normed(b: int, h: int, lq: int, lk: int, dh: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k RMS-normed over the head dim (as QKNorm leaves them), v plain; fp32."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(b, h, lq, dh, generator=g), torch.randn(b, h, lk, dh, generator=g), \
        torch.randn(b, h, lk, dh, generator=g)
    q, k = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True)) for t in (q, k))
    return q, k, v


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """The kernel's output against fp32 SDPA on the same bf16-rounded inputs, at bf16 SDPA's accuracy."""
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = cpu_attention.fused_attention(qb, kb, vb, threads=threads)
    assert out is not None
    ref = attention(qb.float(), kb.float(), vb.float())
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    # The output is rounded to bf16 (relative 2^-9) and so are the probabilities: a few bf16 ulps of |v|.
    assert (out.float() - ref).abs().max() < 2e-2
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.9999
    return out


@needs_kernel
@pytest.mark.parametrize("dh", [16, 32, 48, 64, 80, 96, 112, 128])
def test_every_compiled_head_dim_matches_sdpa(dh):
    # 19 query rows: full row groups and a tail for every row-group size; 77 keys: a partial second tile.
    _check(*_rms_normed(2, 3, 19, 77, dh, seed=dh))


@needs_kernel
@pytest.mark.parametrize("dh", [8, 24, 88])
def test_head_dims_between_kernels_run_zero_padded(dh):
    """giant's Dh = 88 runs in the 96 kernel with zero channels; the scale stays 1/sqrt(88)."""
    assert not cpu_attention.supports_head_dim(dh)
    _check(*_rms_normed(1, 2, 11, 40, dh, seed=dh))


@needs_kernel
@pytest.mark.parametrize("lk", [1, 15, 16, 17, 31, 32, 33, 47, 48, 63, 64, 65, 128, 130])
def test_padded_keys_never_count(lk):
    """Keys are zero-padded to a multiple of 64; the masks must drop exactly the padding in every 16-key block."""
    _check(*_rms_normed(1, 2, 9, lk, 32, seed=lk))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 7, 13])
def test_thread_splits_give_identical_results(threads):
    """Whole (batch, head) slices per thread while there are at least as many slices as threads (6 here), else a
    pack phase then query rows split at arbitrary boundaries; every split must compute the same rows."""
    q, k, v = _rms_normed(2, 3, 150, 100, 32, seed=3)
    one = _check(q, k, v, threads=1)
    assert torch.equal(_check(q, k, v, threads=threads), one)


@needs_kernel
def test_strided_values_as_split_qkv_leaves_them():
    """v arrives as a strided view of the fused qkv projection ([B, L, 3, H, Dh] permuted); k may be too."""
    from fluxmusic.ops import split_qkv

    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 70, 3 * 4 * 32, generator=g).bfloat16()
    q, k, v = split_qkv(qkv, 4)
    assert not v.is_contiguous() and v.bfloat16() is v  # reaches the kernel strided
    q, k = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True)) for t in (q, k))
    _check(q, k, v, threads=2)


@needs_kernel
def test_cross_attention_shapes_land_in_the_merged_layout():
    """Lq != Lk, batch and heads > 1: row (b, l) of the [B, Lq, H*Dh] output holds every head's result."""
    q, k, v = _rms_normed(3, 2, 5, 70, 64, seed=5)
    out = _check(q, k, v)
    per_head = attention(q[:, 1:2].bfloat16().float(), k[:, 1:2].bfloat16().float(), v[:, 1:2].bfloat16().float())
    assert (out[..., 64:].float() - per_head).abs().max() < 2e-2


@needs_kernel
def test_declines_what_it_cannot_compute_and_the_op_falls_back():
    q, k, v = _rms_normed(1, 2, 8, 24, 32)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert cpu_attention.fused_attention(q, k, v) is None  # fp32
    assert cpu_attention.fused_attention(qb.half(), kb.half(), vb.half()) is None  # fp16
    big_q, big_k = qb * 4, kb * 4  # scores up to 16 * sqrt(32) ~ 90 > 40: exp would need a running max
    assert not cpu_attention.scores_bounded(big_q, big_k, 32**-0.5)
    assert cpu_attention.fused_attention(big_q, big_k, vb) is None
    nan_k = kb.clone()
    nan_k[0, 1, 5, 3] = float("nan")
    for threads in (1, 2, 5):  # nan in the second slice: one-phase (1, 2 threads) and two-phase (5) paths
        assert cpu_attention.fused_attention(qb, nan_k, vb, threads=threads) is None
    big = qb.clone()
    big[0, 1] *= 8  # only the second slice's bound (8 sqrt(32) ~ 45) exceeds 40: the one-phase path must see it
    assert cpu_attention.fused_attention(big, kb, vb, threads=2) is None
    assert not cpu_attention.supports_head_dim(136)  # beyond the largest kernel (128)
    wide = tuple(torch.cat([t] * 5, dim=-1)[..., :136] for t in (qb, kb, vb))
    assert cpu_attention.fused_attention(*wide) is None
    # The op falls back to block-GEMM attention in each case and still matches SDPA.
    for args in ((big_q, big_k, vb), wide):
        ref = attention(*(t.float() for t in args))
        assert torch.equal(fused_attention(*args), blocked_attention(*args))
        assert (fused_attention(*args).float() - ref).abs().max() < 5e-2


def test_training_and_fp32_never_reach_the_kernel():
    q, k, v = (t.bfloat16().requires_grad_() for t in _rms_normed(1, 2, 6, 6, 32))
    out = fused_attention(q, k, v)
    out.float().sum().backward()  # only SDPA is differentiable here
    assert q.grad is not None
    q32, k32, v32 = _rms_normed(1, 2, 6, 6, 32)
    assert torch.equal(fused_attention(q32, k32, v32), attention(q32, k32, v32))


def test_build_without_a_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("FLUXMUSIC_KERNEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="no C compiler found"):
        cpu_attention.build()


@needs_kernel
def test_build_is_cached_per_source(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUXMUSIC_KERNEL_CACHE", str(tmp_path))
    first = cpu_attention.build()
    mtime = os.stat(first).st_mtime_ns
    assert cpu_attention.build() == first and os.stat(first).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


def _attend_in_child(args, expected, queue) -> None:
    queue.put(bool(torch.equal(cpu_attention.fused_attention(*args, threads=2), expected)))


@needs_kernel
def test_a_forked_child_attends_without_waiting_for_threads_it_lacks():
    """A fork copies the parent's OpenMP state but not its threads: a child entering a parallel region after its
    parent did waits forever, so the kernel runs on the calling thread in a forked child."""
    import multiprocessing as mp

    args = tuple(t.bfloat16() for t in _rms_normed(1, 4, 40, 40, 32, seed=9))
    parent = cpu_attention.fused_attention(*args, threads=2)  # the parent's threads exist before the fork
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_attend_in_child, args=(args, parent, queue))
    child.start()
    same = queue.get(timeout=60)  # (raises queue.Empty if the child hangs on threads it does not have)
    child.join(timeout=60)
    assert child.exitcode == 0 and same


def _projection(b: int, length: int, heads: int, dh: int, extra: int = 0, seed: int = 0):
    """A bf16 projection [B, L, 3*H*Dh] (a view into a wider one when ``extra``, as single-stream blocks have it),
    bf16 norm scales and a RoPE table."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(b, length, 3 * heads * dh + extra, generator=g) * 3).bfloat16()
    scales = tuple((torch.rand(dh, generator=g) + 0.5).bfloat16() for _ in range(2))
    angles = torch.rand(1, length, dh // 2, generator=g) * 6.3
    return wide[..., : 3 * heads * dh], *scales, torch.stack((angles.cos(), angles.sin()), -1)


def _same_up_to_one_ulp(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-identical but for the odd value one bf16 ulp away before the rotation (the sum of squares is taken in
    another order, which can flip a rounding), so at most ~2 ulps of the row's largest value after it."""
    g, r = got.float(), ref.float()
    assert (g == r).float().mean() > 0.999
    assert ((g - r).abs() <= r.abs().amax(-1, keepdim=True) * 2.0**-6).all()


@needs_kernel
@pytest.mark.parametrize("dh", [16, 32, 48, 64, 80, 96, 112, 128])
def test_qk_norm_rope_kernel_is_the_reference_at_every_head_dim(dh):
    from fluxmusic.ops import fused_qk_rmsnorm_rope, qk_rmsnorm_rope

    qkv, qs, ks, rope = _projection(2, 37, 3, dh, extra=5 * dh, seed=dh)
    with torch.no_grad():
        ref = qk_rmsnorm_rope(qkv, qs, ks, rope, 3)
        assert cpu_attention.qk_norm_rope(qkv, qs, ks, rope, 3, 1e-6) is not None  # the kernel, not a fallback
        got = fused_qk_rmsnorm_rope(qkv, qs, ks, rope, 3)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == torch.bfloat16
        _same_up_to_one_ulp(a, b)
    assert got[0].is_contiguous() and got[1].is_contiguous() and torch.equal(got[2], ref[2])


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_qk_norm_rope_kernel_per_sample_rope_and_a_slice_of_the_table(threads):
    """A RoPE table per batch item, and a view into a longer table (double-stream blocks pass rope[:, n_txt:])."""
    from fluxmusic.ops import qk_rmsnorm_rope

    qkv, qs, ks, _ = _projection(3, 20, 2, 32, seed=1)
    angles = torch.rand(3, 27, 16, generator=torch.Generator().manual_seed(2)) * 6.3
    table = torch.stack((angles.cos(), angles.sin()), -1)[:, 7:]
    with torch.no_grad():
        q, k = cpu_attention.qk_norm_rope(qkv, qs, ks, table, 2, 1e-6, threads=threads)
        rq, rk, _ = qk_rmsnorm_rope(qkv, qs, ks, table, 2)
    _same_up_to_one_ulp(q, rq)
    _same_up_to_one_ulp(k, rk)


def test_qk_norm_rope_kernel_declines_what_it_does_not_compute():
    from fluxmusic.ops import fused_qk_rmsnorm_rope, qk_rmsnorm_rope

    qkv, qs, ks, rope = _projection(1, 9, 2, 32)
    assert cpu_attention.qk_norm_rope(qkv.float(), qs, ks, rope, 2, 1e-6) is None  # fp32
    assert cpu_attention.qk_norm_rope(qkv.half(), qs, ks, rope, 2, 1e-6) is None  # fp16
    assert cpu_attention.qk_norm_rope(qkv, qs, ks, rope.double(), 2, 1e-6) is None  # a fp64 table
    odd = _projection(1, 9, 2, 24)  # head dim not a multiple of 16 (and giant's 88)
    assert cpu_attention.qk_norm_rope(*odd, 2, 1e-6) is None
    strided = torch.stack((qkv, qkv), -1)[..., 0]  # channels not contiguous
    assert cpu_attention.qk_norm_rope(strided, qs, ks, rope, 2, 1e-6) is None
    # The op takes the reference path for each, and under autograd.
    with torch.no_grad():
        for args in ((qkv.float(), qs, ks, rope), odd, (strided, qs, ks, rope)):
            for a, b in zip(fused_qk_rmsnorm_rope(*args, 2), qk_rmsnorm_rope(*args, 2)):
                assert torch.equal(a, b)
    g = qkv.float().requires_grad_()
    fused_qk_rmsnorm_rope(g, qs.float(), ks.float(), rope, 2)[0].sum().backward()
    assert g.grad is not None
