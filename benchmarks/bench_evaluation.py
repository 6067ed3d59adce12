"""One CFG transformer evaluation per numeric variant: seconds, GFLOP/s, % of the matmul peak, parity.

Variants (all the batched CFG forward, batch 2, cached RoPE):
  fp32                       fp32 weights, SDPA (the parity reference)
  autocast-bf16/sdpa         fp32 weights under bf16 autocast (casts weights on every call), SDPA
  autocast-bf16/blocked      the same with the block-GEMM attention (fluxmusic.ops.blocked_attention)
  bf16/sdpa                  weights stored in bf16 (no casts), SDPA
  bf16/blocked               weights stored in bf16, block-GEMM attention
  bf16/fused, op-by-op QK    the same with the reference QK RMSNorm + RoPE (the op-by-op form, before its kernel)
  bf16/fused                 weights stored in bf16, the fused AVX512-BF16 attention and QK norm + RoPE kernels
                             (fluxmusic.cpu_attention): the eager default
  int8-dynamic (--int8)      torch dynamic quantisation of every Linear (int8 weights, fp32 activations)
  bf16/fused+compile (--compile)  fluxmusic.backend.compile_transformer (inductor, weights frozen, RoPE on halves),
                                  attention one registered op

The matmul peaks are measured in the same run, interleaved with the variants, on the MLP's up-projection
shape ([2 * tokens, hidden] x [hidden, 4 * hidden]); FLOPs are counted once with torch's FlopCounterMode.
Everything runs round-robin in one process so machine noise hits all variants alike; medians are reported.

    OMP_NUM_THREADS=2 python benchmarks/bench_evaluation.py --config small --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from realshape import add_shape_arguments, real_shape_inputs
from torch.utils.flop_counter import FlopCounterMode

from fluxmusic.backend import compile_transformer
from fluxmusic.flow import Conditioning, cfg_velocity
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.ops import BLOCKED_ATTENTION_OPS, FUSED_ATTENTION_OPS, REFERENCE_OPS, qk_rmsnorm_rope


def _with_ops(model: FluxMusicTransformer, ops) -> FluxMusicTransformer:
    """A shallow copy of the model holding another op set (parameters shared)."""
    m = copy.copy(model)
    m.ops = ops
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, repeats=3)
    ap.add_argument("--int8", action="store_true", help="add torch dynamic int8 quantisation of the Linears")
    ap.add_argument("--compile", action="store_true", help="add torch.compile of the bf16 model (slow to build)")
    args = ap.parse_args()
    cfg, model, x, t, cond, null, g, gh, gw = real_shape_inputs(args, t=0.7)
    rope = model.rope_for(args.txt_len, gh, gw)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    op_by_op_qk = dataclasses.replace(FUSED_ATTENTION_OPS, qk_rmsnorm_rope=qk_rmsnorm_rope)

    def fn_for(m: FluxMusicTransformer, dtype: torch.dtype, autocast: bool) -> Callable[[], torch.Tensor]:
        c = Conditioning(cond.txt.to(dtype), cond.y.to(dtype))
        n = Conditioning(null.txt.to(dtype), null.y.to(dtype))
        vel = cfg_velocity(m, c, n, g, rope)
        xd, td = x.to(dtype), t.to(dtype)

        def run() -> torch.Tensor:
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return vel(xd, td).float()
            return vel(xd, td).float()

        return run

    f32 = torch.float32
    bf = torch.bfloat16
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "fp32 (SDPA)": fn_for(model, f32, False),
        "autocast-bf16, SDPA": fn_for(model, f32, True),
        "autocast-bf16, blocked attention": fn_for(_with_ops(model, BLOCKED_ATTENTION_OPS), f32, True),
        "bf16 weights, SDPA": fn_for(_with_ops(bf16_model, REFERENCE_OPS), bf, False),
        "bf16 weights, blocked attention": fn_for(_with_ops(bf16_model, BLOCKED_ATTENTION_OPS), bf, False),
        "bf16 weights, fused attention kernel, op-by-op QK norm + RoPE": fn_for(
            _with_ops(bf16_model, op_by_op_qk), bf, False),
        "bf16 weights, fused attention + QK norm/RoPE kernels": fn_for(
            _with_ops(bf16_model, FUSED_ATTENTION_OPS), bf, False),
    }
    if args.int8:
        q8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        variants["int8 dynamic Linears (fp32 act.), SDPA"] = fn_for(q8, f32, False)
    if args.compile:
        cm = compile_transformer(_with_ops(bf16_model, FUSED_ATTENTION_OPS))  # as --compile does (weights frozen)
        t0 = time.perf_counter()
        fn = fn_for(cm, bf, False)
        with torch.no_grad():
            fn()
        print(f"torch.compile build: {time.perf_counter() - t0:.0f} s")
        variants["bf16 weights, fused kernels, torch.compile"] = fn

    # Matmul peaks at the MLP up-projection shape, fp32 and bf16.
    tokens = 2 * (gh * gw + args.txt_len)
    d, hdim = cfg.hidden_size, cfg.mlp_hidden_dim
    a32, w32 = torch.randn(tokens, d), torch.randn(hdim, d)
    abf, wbf = a32.bfloat16(), w32.bfloat16()
    mm_flops = 2 * tokens * d * hdim
    peaks = {"fp32": lambda: F.linear(a32, w32), "bf16": lambda: F.linear(abf, wbf)}

    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            ref = variants["fp32 (SDPA)"]()
        # FlopCounterMode counts the GEMMs; CPU SDPA is not counted, so attention is added analytically:
        # QK^T and PV are 2 * 2 * L^2 * head_dim FLOPs per (batch, head) in every block.
        seq = gh * gw + args.txt_len
        blocks = cfg.depth + cfg.depth_single_blocks
        attn_flops = blocks * 4 * 2 * cfg.num_heads * seq * seq * cfg.head_dim
        counted_attn = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "attention" in str(k))
        flops = fc.get_total_flops() - counted_attn + attn_flops
        print(f"{args.config}: {gh * gw} music + {args.txt_len} text tokens, CFG batch 2, {args.threads} threads, "
              f"load average {os.getloadavg()[0]:.2f} before; {flops / 1e9:.0f} GFLOP per evaluation "
              f"({attn_flops / 1e9:.0f} in attention)")
        parity = {}
        for name, fn in variants.items():
            out = fn()
            err = (out - ref).abs().max().item()
            cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
            parity[name] = (err / ref.abs().max().item(), cos)
        times: dict[str, list[float]] = {k: [] for k in variants}
        ptimes: dict[str, list[float]] = {k: [] for k in peaks}
        for _ in range(args.repeats):
            for name, fn in peaks.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(5):
                    fn()
                ptimes[name].append((time.perf_counter() - t0) / 5)
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    peak = {k: mm_flops / statistics.median(v) / 1e9 for k, v in ptimes.items()}
    print(f"matmul peak at [{tokens}x{d}]x[{d}x{hdim}]: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} "
          f"GFLOP/s; load average {os.getloadavg()[0]:.2f} after, median of {args.repeats}")
    base = statistics.median(times["fp32 (SDPA)"])
    print("| variant | s per CFG evaluation | vs fp32 | GFLOP/s | % of matching matmul peak "
          "| max-abs err / peak | cosine |\n|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        gfs = flops / med / 1e9
        ref_peak = peak["fp32"] if name.startswith(("fp32", "int8")) else peak["bf16"]
        err, cos = parity[name]
        print(f"| {name} | {med:.3f} | {base / med:.2f}x | {gfs:.0f} | {100 * gfs / ref_peak:.0f}% "
              f"| {err:.1e} | {cos:.6f} |")


if __name__ == "__main__":
    main()
