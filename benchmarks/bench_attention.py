"""Attention alone at a config's real shapes: SDPA (fp32, bf16) vs the block-GEMM attention, with parity.

Prints ms, GFLOP/s (4 L^2 Dh per batch and head), % of the bf16 matmul peak measured in the same run, and
the max-abs error / cosine against fp32 SDPA. Variants run round-robin; medians of ``--repeats``.

    OMP_NUM_THREADS=2 python benchmarks/bench_attention.py --config small --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fluxmusic import cpu_attention
from fluxmusic.config import get_config
from fluxmusic.ops import ATTENTION_BLOCK_ELEMENTS, attention, blocked_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--seq", type=int, default=1280, help="1024 music + 256 text tokens")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_config(args.config)
    b, h, seq, dh = args.batch, cfg.num_heads, args.seq, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, seq, dh, generator=g) for _ in range(3))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    flops = 4 * b * h * seq * seq * dh
    a, w = torch.randn(b * seq, cfg.hidden_size).bfloat16(), torch.randn(cfg.mlp_hidden_dim, cfg.hidden_size).bfloat16()
    mm_flops = 2 * b * seq * cfg.hidden_size * cfg.mlp_hidden_dim
    variants = {
        "SDPA fp32": lambda: attention(q, k, v),
        "SDPA bf16 (CPU flash kernel)": lambda: attention(qb, kb, vb),
        f"blocked bf16 ({ATTENTION_BLOCK_ELEMENTS >> 20} M scores per block)": lambda: blocked_attention(qb, kb, vb),
        "fused bf16 (AVX512-BF16 kernel, fluxmusic/csrc)": lambda: cpu_attention.fused_attention(qb, kb, vb),
        "blocked bf16 (4 M scores per block)": lambda: blocked_attention(qb, kb, vb, 1 << 22),
        "blocked bf16, softmax instead of exp-sum": lambda: blocked_attention(qb, kb, vb, exp_sum=False),
        "bf16 matmul peak (MLP up-projection shape)": lambda: F.linear(a, w),
    }
    load0 = os.getloadavg()[0]
    with torch.no_grad():
        ref = attention(q, k, v)
        times: dict[str, list[float]] = {n: [] for n in variants}
        for fn in variants.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        peak = mm_flops / statistics.median(times["bf16 matmul peak (MLP up-projection shape)"]) / 1e9
        print(f"{args.config}: B={b}, H={h}, L={seq}, Dh={dh}, {args.threads} threads, load average "
              f"{load0:.1f} -> {os.getloadavg()[0]:.1f}; bf16 matmul peak {peak:.0f} GFLOP/s, median of {args.repeats}")
        print("| variant | ms | GFLOP/s | % of bf16 matmul peak | max-abs err vs fp32 | cosine |")
        print("|---|---|---|---|---|---|")
        for name, fn in variants.items():
            if "peak" in name:
                continue
            med = statistics.median(times[name])
            out = fn().float()
            err = (out - ref).abs().max().item()
            cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
            gfs = flops / med / 1e9
            print(f"| {name} | {med * 1e3:.1f} | {gfs:.0f} | {100 * gfs / peak:.0f}% | {err:.1e} | {cos:.6f} |")


if __name__ == "__main__":
    main()
