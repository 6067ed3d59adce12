"""Block-GEMM attention (fluxmusic.ops.blocked_attention): parity with SDPA, block edges, selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fluxmusic.errors import FluxMusicError
from fluxmusic.ops import (
    BLOCKED_ATTENTION_OPS,
    EXP_SUM_MAX_SCORE,
    FUSED_ATTENTION_OPS,
    REFERENCE_OPS,
    _exp_sum_values,
    attention,
    blocked_attention,
    fast_gelu,
    gelu_tanh,
    opset_for,
)


@pytest.mark.parametrize("block_elements", [1 << 20, 700, 50])
def test_blocked_attention_matches_sdpa_in_bf16(block_elements):
    g = torch.Generator().manual_seed(0)
    # Odd sizes so the last head group and the last query block are partial.
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g) for _ in range(3))
    ref = attention(q, k, v)
    out = blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), block_elements)
    sdpa_bf16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.shape == ref.shape == (2, 37, 24) and out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    err_sdpa = (sdpa_bf16.float() - ref).abs().max().item()
    # bf16 rounding of the scores costs at most a few bf16 ulps more than the fused kernel.
    assert err < max(4 * err_sdpa, 2e-2)
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.9999


def test_blocked_attention_text_and_music_lengths_differ():
    # Queries and keys of different lengths (cross attention shape) still come out in [B, Lq, H*Dh].
    q = torch.randn(1, 2, 5, 4).bfloat16()
    k, v = torch.randn(1, 2, 9, 4).bfloat16(), torch.randn(1, 2, 9, 4).bfloat16()
    out = blocked_attention(q, k, v, block_elements=20)
    ref = attention(q.float(), k.float(), v.float())
    assert out.shape == (1, 5, 8)
    assert (out.float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("magnitude", [1.0, 3.0])
def test_exp_sum_path_and_its_softmax_fallback_both_match_sdpa(magnitude):
    """RMS-normed q/k (as the model feeds it) take the one-pass exp-sum path; q/k so large that a score could
    leave [-40, 40] fall back to the softmax. Both match SDPA; the path taken is checked."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 33, 32, generator=g) for _ in range(3))
    q, k = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True)) * magnitude for t in (q, k))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    takes_exp_sum = _exp_sum_values(qb, kb, vb, 32**-0.5) is not None
    assert takes_exp_sum == (magnitude == 1.0)
    assert (32**0.5 * magnitude**2 > EXP_SUM_MAX_SCORE) == (not takes_exp_sum)
    ref = attention(q, k, v)
    out = blocked_attention(qb, kb, vb, block_elements=300)
    assert torch.isfinite(out).all()
    err_sdpa = (attention(qb, kb, vb).float() - ref).abs().max().item()
    assert (out.float() - ref).abs().max().item() < max(4 * err_sdpa, 2e-2)
    assert F.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0) > 0.9999


def test_fast_gelu_is_tanh_gelu_except_bf16_where_it_differs_by_one_ulp_or_less_than_1e3():
    x = torch.linspace(-12, 12, 20001)
    assert torch.equal(fast_gelu(x), gelu_tanh(x))  # fp32: the official activation, exactly
    xb = x.bfloat16()
    fast, exact = fast_gelu(xb).float(), gelu_tanh(xb).float()
    ulp = exact.abs().clamp_min(2.0**-20) * 2.0**-7  # one bf16 ulp (8 significant bits) of the output
    assert ((fast - exact).abs() <= torch.maximum(ulp, torch.full_like(ulp, 1e-3))).all()
    assert (fast - exact).abs().mean() < 1e-3


def test_blocked_attention_is_sdpa_in_fp32():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    assert torch.equal(blocked_attention(q, k, v), attention(q, k, v))


def test_opset_selection():
    assert opset_for("auto", torch.bfloat16, "cpu") is FUSED_ATTENTION_OPS
    assert opset_for("auto", torch.float16, "cpu") is FUSED_ATTENTION_OPS
    assert opset_for("fused", torch.bfloat16, "cpu") is FUSED_ATTENTION_OPS
    assert opset_for("auto", torch.float32, "cpu") is REFERENCE_OPS
    assert opset_for("sdpa", torch.bfloat16, "cpu") is REFERENCE_OPS
    assert opset_for("blocked", torch.float32, "cpu") is BLOCKED_ATTENTION_OPS
    allowed = "allowed: auto, sdpa, blocked, fused"
    with pytest.raises(FluxMusicError, match=f"attention 'flash2' is not supported; {allowed}"):
        opset_for("flash2", torch.float32, "cpu")


@pytest.mark.parametrize("ops", [BLOCKED_ATTENTION_OPS, FUSED_ATTENTION_OPS], ids=lambda o: o.name)
def test_tiny_model_bf16_blocked_matches_sdpa(ops):
    """Whole-model parity: bf16 weights with blocked attention (or the fused kernel) vs bf16 SDPA vs the fp32
    reference. (Where the fused kernel cannot run, its op set falls back to blocked attention.)"""
    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.model import FluxMusicTransformer

    torch.manual_seed(0)
    cfg = FluxMusicConfig(hidden_size=64, num_heads=4, depth=1, depth_single_blocks=2, axes_dim=(4, 6, 6),
                          context_in_dim=32, vec_in_dim=16)
    model = FluxMusicTransformer(cfg).eval()
    x, t = torch.randn(2, 16, cfg.in_channels), torch.tensor([0.3, 0.8])
    txt, y = torch.randn(2, 5, 32), torch.randn(2, 16)
    rope = model.rope_for(5, 4, 4)
    with torch.no_grad():
        ref = model(x, t, txt, y, rope)
        mb = model.to(torch.bfloat16)
        args = (x.bfloat16(), t.bfloat16(), txt.bfloat16(), y.bfloat16(), rope)
        sdpa = mb(*args).float()
        mb.ops = ops
        blocked = mb(*args).float()
    scale = ref.abs().max()
    assert (blocked - ref).abs().max() / scale < 3 * max((sdpa - ref).abs().max() / scale, 1e-2)
    assert F.cosine_similarity(blocked.flatten(), sdpa.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_rope_on_halves_with_reordered_projections_is_the_reference_model(qkv_bias):
    """The compiled path's q/k channel order (project_qkv_halves + qk_rmsnorm_rope_halves): reordering q's and
    k's channels alike leaves q.k and so the velocity unchanged, in double- and single-stream blocks (whose
    projection also carries the MLP input, which must keep its order), with and without a qkv bias."""
    import dataclasses

    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.model import FluxMusicTransformer
    from fluxmusic.ops import project_qkv_halves, qk_rmsnorm_rope_halves

    torch.manual_seed(1)
    cfg = FluxMusicConfig(hidden_size=64, num_heads=4, depth=1, depth_single_blocks=2, axes_dim=(4, 6, 6),
                          context_in_dim=32, vec_in_dim=16, qkv_bias=qkv_bias)
    model = FluxMusicTransformer(cfg).eval()
    for name, p in model.named_parameters():  # non-trivial norm scales, so a scale left in pair order shows
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    x, t = torch.randn(2, 16, cfg.in_channels), torch.tensor([0.3, 0.8])
    txt, y = torch.randn(2, 5, 32), torch.randn(2, 16)
    rope = model.rope_for(5, 4, 4)
    with torch.no_grad():
        ref = model(x, t, txt, y, rope)
        model.ops = dataclasses.replace(REFERENCE_OPS, project_qkv=project_qkv_halves,
                                        qk_rmsnorm_rope=qk_rmsnorm_rope_halves)
        got = model(x, t, txt, y, rope)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_blocked_attention_falls_back_under_autograd():
    q, k, v = (torch.randn(1, 2, 6, 4).bfloat16().requires_grad_() for _ in range(3))
    out = blocked_attention(q, k, v)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_auto_dtype_is_bf16_exactly_where_the_device_has_it_natively():
    from pathlib import Path

    from fluxmusic.backend import native_bf16, parse_dtype

    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    native = "avx512_bf16" in flags.split() or "amx_bf16" in flags.split()
    assert native_bf16("cpu") is native
    assert parse_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert parse_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(FluxMusicError, match="'int4' is not supported; allowed: auto"):
        parse_dtype("int4")


def test_bench_procedure_takes_our_setting_from_a_sweep(tmp_path):
    """benchmarks/bench_procedure.py at tiny shapes: our setting (evaluation counts, probes) comes from a sweep's
    cheapest match, and the whole-procedure row adds its guided, cond-only and probe costs (no timing asserted)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    best = {"solver": "ab2", "steps": 8, "shift": 3.0, "guidance_interval": [0.2, 1.0], "cache_threshold": 0.1,
            "guidance_schedule": "constant", "label": "ab2 8, shift 3, interval [0.2, 1], cache 0.1", "nfe": 6.0,
            "cost": 5.5}
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"steps_sweep": {"fewest": {"both": best}}}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_procedure.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(script), "--config", "tiny", "--music-tokens", "16", "--txt-len", "8",
                          "--repeats", "1", "--threads", "1", "--from-sweep", str(sweep)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "ours: ab2 8, shift 3, interval [0.2, 1], cache 0.1 from" in out.stdout
    # nfe 6, cost 5.5: 5 guided (B=2) + 1 cond-only (B=1) evaluations; the probe runs at all 8 steps
    assert "| ours bf16 + fused attention, guided (B=2) |" in out.stdout
    assert "| ours bf16 + fused attention, cond only (B=1) |" in out.stdout
    assert "5 guided + 1 cond-only + 8 probes" in out.stdout
    sweep.write_text(json.dumps({"steps_sweep": {"fewest": {"both": None}}}))
    bad = subprocess.run([sys.executable, str(script), "--config", "tiny", "--from-sweep", str(sweep)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "no setting matched the target both ways" in bad.stderr


def test_bench_procedure_runs_a_model_directory_at_its_own_shapes(tiny_model_dir):
    """``bench_procedure.py --model DIR``: the model directory's transformer with its weights, at its full window
    and T5 length, on a real prompt; ours and the official procedure agree on the velocity (cosine near 1)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(tiny_model_dir)
    gh, gw = pipe.geometry.grid(pipe.geometry.max_latent_frames)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_procedure.py"
    out = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--evaluations", "3",
                          "--repeats", "1", "--threads", "1"], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"model {tiny_model_dir}: {gh * gw} music + " in out.stdout
    cosine = float(re.search(r"\| ours bf16 \+ fused attention, guided \(B=2\) \|.*\| ([0-9.]+) \|$", out.stdout,
                             re.M).group(1))
    assert cosine > 0.99


def test_compiled_transformer_matches_eager(tmp_path):
    """``compile=True`` (torch.compile of the transformer, attention one registered op) through the real loader and
    backend: the same velocity as eager within fp32 rounding. Building the graph takes ~25 s here."""
    from fluxmusic.pipeline import FluxMusicPipeline
    from fluxmusic.tiny import build_tiny_model_dir

    model_dir = build_tiny_model_dir(tmp_path / "model")
    eager = FluxMusicPipeline.from_pretrained(model_dir, dtype="float32").backend
    compiled = FluxMusicPipeline.from_pretrained(model_dir, dtype="float32", compile=True).backend
    assert compiled.transformer.forward is not eager.transformer.forward
    g = torch.Generator().manual_seed(0)
    cfg = eager.transformer_config
    x, t = torch.randn(2, 16, cfg.in_channels, generator=g), torch.tensor([0.3, 0.8])
    txt, y = torch.randn(2, 5, cfg.context_in_dim, generator=g), torch.randn(2, cfg.vec_in_dim, generator=g)
    rope = eager.rope(5, 4, 4)
    ref, got = eager.velocity(x, t, txt, y, rope), compiled.velocity(x, t, txt, y, rope)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("impl", ["sdpa", "blocked", "fused"])
def test_compiled_attention_op_is_the_op_set_attention_and_differentiable(impl):
    """compile_transformer hands torch.compile each op set's attention as one registered op; it must compute the
    same output, and under autograd pass through to the differentiable path."""
    from fluxmusic.backend import _opaque_attention
    from fluxmusic.ops import ATTENTION_OPSETS

    attention_fn = ATTENTION_OPSETS[impl].attention
    op = _opaque_attention(attention_fn)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 20, 32, generator=g).bfloat16() for _ in range(3))
    with torch.no_grad():
        assert torch.equal(op(q, k, v), attention_fn(q, k, v))
    qg = q.float().requires_grad_()
    op(qg, k.float(), v.float()).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_compile_is_refused_with_exported_backends(tmp_path, capsys):
    from fluxmusic.cli import main

    code = main(["generate", "a piano", "--compile", "--onnx-dir", str(tmp_path), "-o", str(tmp_path / "x.wav")])
    assert code == 2
    assert "--compile applies to the torch backend" in capsys.readouterr().err
