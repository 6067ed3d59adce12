"""Triton kernels vs the plain-torch references, run by Triton's CPU interpreter (TRITON_INTERPRET=1).

Shapes are small on purpose: the interpreter executes programs one by one in numpy. bf16 is not covered:
the interpreter has no bf16 arithmetic.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (see tests/conftest.py)

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fluxmusic import ops as ref  # noqa: E402
from fluxmusic.config import FluxMusicConfig, get_config  # noqa: E402
from fluxmusic.flow import Conditioning, cfg_velocity, sample  # noqa: E402
from fluxmusic.model import FluxMusicTransformer  # noqa: E402
from fluxmusic.ops import REFERENCE_OPS  # noqa: E402

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

from fluxmusic.kernels import TRITON_OPS, disable_kernels, enable_kernels, kernels_enabled  # noqa: E402
from fluxmusic.kernels import custom_ops as co  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.float16]
# fp16: the kernels compute in fp32 and round once where the reference rounds after each fp16 op: <= 2 ulp.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2)}
HEAD_DIMS = [32, 48, 64, 88, 128]  # the official configs' head dims


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


def _mods(batch: int, d: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per-sample modulation vectors as the model produces them: chunks (strided views) of one [B, n*D]."""
    return list((0.5 * torch.randn(batch, n * d, device=DEVICE)).to(dtype).chunk(n, dim=-1))


# --- adaLN -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 33, 67, 96, 130])
def test_layernorm_modulate(dtype, d):
    x = (3 * torch.randn(3, 11, d, device=DEVICE) + 1).to(dtype)
    shift, scale = _mods(3, d, 2, dtype)
    _close(TRITON_OPS.layernorm_modulate(x, shift, scale), ref.layernorm_modulate(x, shift, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_modulate_strided_input_and_3d_mods(dtype):
    """A sequence slice of a wider tensor (the final layer's x) and [B, 1, D] modulation."""
    h = torch.randn(2, 19, 40, device=DEVICE).to(dtype)
    x = h[:, 5:]
    shift, scale = (m.unsqueeze(1) for m in _mods(2, 40, 2, dtype))
    _close(TRITON_OPS.layernorm_modulate(x, shift, scale), ref.layernorm_modulate(x, shift, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [7, 67, 128])
def test_gated_residual_and_modulate(dtype, d):
    x, y = (torch.randn(3, 9, d, device=DEVICE).to(dtype) for _ in range(2))
    gate, shift, scale = _mods(3, d, 3, dtype)
    _close(TRITON_OPS.gated_residual(x, gate, y), ref.gated_residual(x, gate, y), dtype)
    got = TRITON_OPS.gated_residual_modulate(x, gate, y, shift, scale)
    want = ref.gated_residual_modulate(x, gate, y, shift, scale)
    for g, w in zip(got, want):
        _close(g, w, dtype)


def test_per_sample_modulation_is_per_sample():
    """Sample i must only see modulation row i (no batch-stride mix-ups)."""
    x = torch.randn(1, 5, 24, device=DEVICE).expand(3, 5, 24).contiguous()
    shift, scale = _mods(3, 24, 2, torch.float32)
    out = TRITON_OPS.layernorm_modulate(x, shift, scale)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], ref.layernorm_modulate(x[:1], shift[i : i + 1], scale[i : i + 1]))


def test_bad_modulation_shape_is_rejected():
    with pytest.raises(ValueError, match="shift"):
        TRITON_OPS.layernorm_modulate(torch.randn(2, 3, 8), torch.randn(2, 7), torch.randn(2, 8))


# --- QK RMSNorm + RoPE ---------------------------------------------------------------------------------------

def _rope(bp: int, length: int, dh: int) -> torch.Tensor:
    ang = torch.randn(bp, length, dh // 2, device=DEVICE) * 3
    return torch.stack((ang.cos(), ang.sin()), dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dh", HEAD_DIMS)
def test_qk_rmsnorm_rope_head_dims(dtype, dh):
    heads, length = 3, 13  # non-power-of-two heads; 13 tokens: not a multiple of any tile size
    qkv = torch.randn(2, length, 3 * heads * dh, device=DEVICE).to(dtype)
    q_scale, k_scale = (torch.rand(dh, device=DEVICE) + 0.5 for _ in range(2))
    rope = _rope(2, length, dh)  # per-sample table (the official ids path)
    got = TRITON_OPS.qk_rmsnorm_rope(qkv, q_scale, k_scale, rope, heads)
    for g, w in zip(got, ref.qk_rmsnorm_rope(qkv, q_scale, k_scale, rope, heads)):
        _close(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qk_rmsnorm_rope_strided_qkv_and_sliced_table(dtype):
    """Single-stream layout: qkv is a slice of linear1's wider output; the table is the text part of a longer one."""
    heads, dh, n_txt = 4, 48, 7
    h = torch.randn(3, n_txt, 3 * heads * dh + 4 * heads * dh, device=DEVICE).to(dtype)
    qkv = h[..., : 3 * heads * dh]
    rope = _rope(1, n_txt + 16, dh)[:, :n_txt]
    q_scale, k_scale = (torch.rand(dh, device=DEVICE) + 0.5 for _ in range(2))
    got = TRITON_OPS.qk_rmsnorm_rope(qkv, q_scale, k_scale, rope, heads)
    for g, w in zip(got, ref.qk_rmsnorm_rope(qkv, q_scale, k_scale, rope, heads)):
        _close(g, w, dtype)
    assert got[2].data_ptr() == qkv[..., 2 * heads * dh :].data_ptr()  # v is a view, not a copy


# --- backward ------------------------------------------------------------------------------------------------

def _grads(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o) for i, o in enumerate(outs)]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    return [t.grad for t in leaves if t.requires_grad]


def _check_grads(kernel_fn, ref_fn, inputs):
    for g, w in zip(_grads(kernel_fn, inputs), _grads(ref_fn, inputs), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_layernorm_modulate_backward():
    x = torch.randn(2, 9, 37, device=DEVICE)
    _check_grads(TRITON_OPS.layernorm_modulate, ref.layernorm_modulate, [x, *_mods(2, 37, 2, torch.float32)])


def test_gated_residual_backward():
    x, y = torch.randn(2, 9, 37, device=DEVICE), torch.randn(2, 9, 37, device=DEVICE)
    gate = _mods(2, 37, 1, torch.float32)[0]
    _check_grads(TRITON_OPS.gated_residual, ref.gated_residual, [x, gate, y])
    gate, shift, scale = _mods(2, 37, 3, torch.float32)
    _check_grads(TRITON_OPS.gated_residual_modulate, ref.gated_residual_modulate, [x, gate, y, shift, scale])


@pytest.mark.parametrize("dh", [32, 88])
def test_qk_rmsnorm_rope_backward(dh):
    heads = 3
    qkv = torch.randn(2, 6, 3 * heads * dh + 8, device=DEVICE)
    q_scale, k_scale = (torch.rand(dh, device=DEVICE) + 0.5 for _ in range(2))
    rope = _rope(1, 6, dh)

    def make(impl):  # strided qkv slice as in the single-stream blocks, rope and num_heads fixed
        return lambda h, qs, ks: impl(h[..., : 3 * heads * dh], qs, ks, rope, heads)

    _check_grads(make(TRITON_OPS.qk_rmsnorm_rope), make(ref.qk_rmsnorm_rope), [qkv, q_scale, k_scale])


def test_custom_op_registrations():
    """Schema, fake (meta) kernels and autograd registration, as torch.compile / torch.export rely on them."""
    x, y = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    gate, shift, scale = _mods(2, 24, 3, torch.float32)
    rq = dict(requires_grad=True)
    torch.library.opcheck(co.layernorm_modulate_op, (x.requires_grad_(), shift.requires_grad_(), scale))
    torch.library.opcheck(co.gated_residual_op, (x, gate, y))
    torch.library.opcheck(co.gated_residual_modulate_op, (x, gate.requires_grad_(), y, shift, scale))
    qkv = torch.randn(2, 5, 3 * 2 * 16, **rq)
    torch.library.opcheck(co.qk_rmsnorm_rope_op, (qkv, torch.rand(16, **rq), torch.rand(16), _rope(1, 5, 16), 2))


def test_export_sees_single_ops():
    model = FluxMusicTransformer(get_config("tiny")).eval()
    enable_kernels(model, force=True)
    rope = model.rope_for(5, 2, 4)
    args = (torch.randn(1, 8, 32), torch.rand(1), torch.randn(1, 5, 48), torch.randn(1, 32))
    graph = str(torch.export.export(model, args, kwargs={"rope": rope}).graph)
    for name in ("layernorm_modulate", "gated_residual_modulate", "gated_residual", "qk_rmsnorm_rope"):
        assert f"fluxmusic.{name}.default" in graph


# --- the whole transformer -------------------------------------------------------------------------------------

def _randomised(model: FluxMusicTransformer) -> FluxMusicTransformer:
    """Random QK scales: ones would hide a swapped q/k scale."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.scale"):
                p.uniform_(0.5, 1.5)
    return model


def test_tiny_transformer_forward_and_grads_match_reference():
    cfg = get_config("tiny")
    model = _randomised(FluxMusicTransformer(cfg)).to(DEVICE)
    x, t = torch.randn(3, 24, 32, device=DEVICE), torch.rand(3, device=DEVICE)
    txt, y = torch.randn(3, 11, cfg.context_in_dim, device=DEVICE), torch.randn(3, cfg.vec_in_dim, device=DEVICE)
    rope = model.rope_for(11, 4, 6)

    def run():
        model.zero_grad()
        out = model(x, t, txt, y, rope=rope)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_g = run()
    assert enable_kernels(model, force=True) and kernels_enabled(model)
    got, got_g = run()
    assert (got - want).abs().max().item() <= 1e-4
    for name, g in got_g.items():
        torch.testing.assert_close(g, want_g[name], atol=1e-5, rtol=1e-4, msg=name)
    disable_kernels(model)
    assert model.ops is REFERENCE_OPS


def test_official_parity_with_kernels(official_tiny):
    c = official_tiny
    model = FluxMusicTransformer(FluxMusicConfig.from_dict(c["meta"]["config"]))
    model.load_state_dict(c["state"], strict=True)
    model.eval()
    assert enable_kernels(model, force=True)
    with torch.no_grad():
        out = model(c["x"], c["t"], c["txt"], c["y"], img_ids=c["img_ids"], txt_ids=c["txt_ids"])
    assert (out - c["out"]).abs().max().item() <= 1e-5
    h, w = c["latent"].shape[2] // 2, c["latent"].shape[3] // 2
    meta = c["meta"]
    rope = model.rope_for(meta["txt_len"], h, w)
    guidance = torch.full((c["x"].shape[0],), float(meta["cfg"]))
    v = cfg_velocity(model, Conditioning(c["txt"], c["y"]), Conditioning(c["null_txt"], c["null_y"]), guidance, rope)
    with torch.no_grad():
        final = sample(v, c["x"], meta["steps"])
    assert (final - c["euler_final"]).abs().max().item() <= 1e-4


# --- enabling and the dependency direction ---------------------------------------------------------------------

def test_enable_kernels_needs_cuda_unless_forced():
    model = FluxMusicTransformer(get_config("tiny"))
    assert enable_kernels(model) is False and model.ops is REFERENCE_OPS
    assert enable_kernels(model, force=True) is True and model.ops is TRITON_OPS
    disable_kernels(model)
    assert model.ops is REFERENCE_OPS


def test_core_never_imports_kernels():
    code = (
        "import sys, fluxmusic, fluxmusic.model, fluxmusic.ops, fluxmusic.flow, fluxmusic.cli\n"
        "bad = [m for m in sys.modules if m.startswith('fluxmusic.kernels') or m == 'triton']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
