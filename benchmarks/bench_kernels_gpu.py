"""GPU benchmark of the Triton kernels (fluxmusic.kernels) against the eager torch chains they replace.

    python benchmarks/bench_kernels_gpu.py [--config small] [--dtype bf16] [--batch 2] [--peak-gbps 2039]

For each fused op: median time of the eager reference (fluxmusic.ops) and of the kernel, side by side in one
run, and the kernel's achieved DRAM bandwidth (minimum bytes the op must move / time) as a fraction of the
device peak. Then attention (SDPA) next to the fused QK-RMSNorm+RoPE kernel at the same shapes (the data for
the "library attention + fused RMSNorm/RoPE" choice in docs/kernels.md), and the whole transformer forward at
real shapes (1024 music tokens + 256 text tokens) with kernels off and on.

Needs a CUDA GPU and Triton; without them it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fluxmusic import ops as ref
from fluxmusic.config import get_config
from fluxmusic.model import FluxMusicTransformer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MUSIC_GRID = (128, 8)  # latent [8, 256, 16] patchified 2x2 -> 128 x 8 = 1024 music tokens
TXT_LEN = 256


def peak_bandwidth_gbps(override: float | None) -> float | None:
    """Theoretical DRAM bandwidth from the device's memory clock and bus width (double data rate)."""
    if override:
        return override
    p = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def row(name: str, t_ref: float, t_ker: float, nbytes: int | None, peak: float | None) -> None:
    bw = f"{nbytes / t_ker / 1e6:8.0f} GB/s" if nbytes else " " * 13
    frac = f"{nbytes / t_ker / 1e6 / peak:6.1%}" if nbytes and peak else "   n/a"
    print(f"{name:34s} {t_ref * 1e3:9.1f} us {t_ker * 1e3:9.1f} us {t_ref / t_ker:6.2f}x {bw} {frac}")


def bench_ops(cfg_name: str, batch: int, dtype: torch.dtype, peak: float | None) -> None:
    from fluxmusic.kernels import TRITON_OPS as K

    cfg = get_config(cfg_name)
    d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    n_music = MUSIC_GRID[0] * MUSIC_GRID[1]
    length = n_music + TXT_LEN
    es = torch.tensor([], dtype=dtype).element_size()
    dev = "cuda"
    x = torch.randn(batch, length, d, device=dev, dtype=dtype)
    y = torch.randn_like(x)
    shift, scale, gate = torch.randn(batch, 3 * d, device=dev, dtype=dtype).chunk(3, dim=-1)
    qkv = torch.randn(batch, length, 3 * d, device=dev, dtype=dtype)
    qs, ks = torch.rand(dh, device=dev, dtype=dtype), torch.rand(dh, device=dev, dtype=dtype)
    model = FluxMusicTransformer(cfg)
    rope = model.rope_for(TXT_LEN, *MUSIC_GRID).to(dev)
    n = batch * length * d

    print(f"\n[{cfg_name}] B={batch} L={length} D={d} H={h} Dh={dh} {dtype}")
    print(f"{'op':34s} {'eager':>12s} {'triton':>12s} {'speedup':>7s} {'achieved':>13s} {'of peak':>6s}")
    cases = [
        ("layernorm_modulate", lambda o: o.layernorm_modulate(x, shift, scale), 2 * n * es),
        ("gated_residual", lambda o: o.gated_residual(x, gate, y), 3 * n * es),
        ("gated_residual_modulate", lambda o: o.gated_residual_modulate(x, gate, y, shift, scale), 4 * n * es),
        # q, k read from qkv and written once; v is a view; the fp32 (cos, sin) table read once per token.
        ("qk_rmsnorm_rope", lambda o: o.qk_rmsnorm_rope(qkv, qs, ks, rope, h), 4 * n * es + rope.numel() * 4),
    ]
    with torch.no_grad():
        for name, call, nbytes in cases:
            row(name, bench_ms(lambda c=call: c(ref.REFERENCE_OPS)), bench_ms(lambda c=call: c(K)), nbytes, peak)

        q, k, v = K.qk_rmsnorm_rope(qkv, qs, ks, rope, h)
        t_attn = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        t_qk = bench_ms(lambda: K.qk_rmsnorm_rope(qkv, qs, ks, rope, h))
        flops = 4 * batch * h * length * length * dh
        print(f"SDPA attention {t_attn * 1e3:.1f} us ({flops / t_attn / 1e9:.1f} TFLOP/s); fused RMSNorm+RoPE "
              f"{t_qk * 1e3:.1f} us = {t_qk / t_attn:.1%} of attention: the most a RoPE-in-load attention "
              "kernel could save (it would still read q, k once).")


def bench_model(cfg_name: str, batch: int, dtype: torch.dtype) -> None:
    from fluxmusic.kernels import disable_kernels, enable_kernels

    cfg = get_config(cfg_name)
    model = FluxMusicTransformer(cfg).to("cuda", dtype).eval()
    n_music = MUSIC_GRID[0] * MUSIC_GRID[1]
    x = torch.randn(batch, n_music, cfg.in_channels, device="cuda", dtype=dtype)
    t = torch.rand(batch, device="cuda", dtype=dtype)
    txt = torch.randn(batch, TXT_LEN, cfg.context_in_dim, device="cuda", dtype=dtype)
    y = torch.randn(batch, cfg.vec_in_dim, device="cuda", dtype=dtype)
    rope = model.rope_for(TXT_LEN, *MUSIC_GRID)
    with torch.no_grad():
        disable_kernels(model)
        want = model(x, t, txt, y, rope=rope)
        t_off = bench_ms(lambda: model(x, t, txt, y, rope=rope))
        if not enable_kernels(model):
            print("could not enable kernels on this model")
            return
        got = model(x, t, txt, y, rope=rope)
        t_on = bench_ms(lambda: model(x, t, txt, y, rope=rope))
    err = (got.float() - want.float()).abs().max().item()
    print(f"\n[{cfg_name}] transformer forward B={batch}, {n_music} music + {TXT_LEN} text tokens, {dtype}: "
          f"kernels off {t_off:.2f} ms, on {t_on:.2f} ms ({t_off / t_on:.2f}x), max |diff| {err:.2e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small", help="transformer config for shapes and the model forward")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--peak-gbps", type=float, default=None, help="device DRAM peak (default: from properties)")
    p.add_argument("--skip-model", action="store_true", help="only the per-op benchmarks")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels_gpu: skipped, no CUDA device (the kernels are tested on CPU by "
              "tests/test_kernels.py under TRITON_INTERPRET=1; timings need a GPU)")
        return 0
    from fluxmusic.kernels import interpreting, triton_available

    if not triton_available() or interpreting():
        print("bench_kernels_gpu: skipped, needs triton installed and TRITON_INTERPRET unset")
        return 0
    peak = peak_bandwidth_gbps(args.peak_gbps)
    print(f"device {torch.cuda.get_device_name(0)}, DRAM peak "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbps)'}")
    dtype = DTYPES[args.dtype]
    bench_ops(args.config, args.batch, dtype, peak)
    if not args.skip_model:
        bench_model(args.config, args.batch, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
