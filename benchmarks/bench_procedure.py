"""Per-clip cost of the official sampling procedure vs our fastest, measured side by side in one process.

official : per Euler step two batch-1 fp32 forwards (cond, then uncond), RoPE recomputed from position ids
           in every call, 50 steps (the official sample.py)
ours     : one batch-2 CFG forward per evaluation, cached RoPE, weights stored in bf16, block-GEMM attention;
           ``--evaluations`` model evaluations per clip (31 = Heun 16, the bundled default's setting; set it
           to what the steps-vs-quality sweep of the solvers chose at equal quality)
ours fp32: the batched forward in fp32 (isolates the procedure from the numerics)

A full 10.24 s clip at the ``small`` size takes minutes on a 2-core CPU, so this times the per-evaluation
cost of each procedure (interleaved, round-robin, median of ``--repeats``) and multiplies by the evaluation
count of a clip; the table says so. GFLOP/s are against the matmul peaks measured in the same run.

    OMP_NUM_THREADS=2 python benchmarks/bench_procedure.py --config small --evaluations 31 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from realshape import add_shape_arguments, official_cfg_evaluation, real_shape_inputs

from fluxmusic.flow import Conditioning, cfg_velocity
from fluxmusic.ops import BLOCKED_ATTENTION_OPS

OFFICIAL_STEPS = 50


def evaluation_gflop(cfg, music: int, txt: int, batch: int) -> float:
    """FLOPs of one forward: 2 x params-in-linears x tokens, plus attention's QK^T and PV (4 L^2 Dh per head)."""
    d, m = cfg.hidden_size, cfg.mlp_hidden_dim
    seq = music + txt
    double = d * 3 * d + d * d + 2 * d * m  # MACs per token (either stream has its own weights): qkv, proj, MLP
    single = d * (3 * d + m) + (d + m) * d
    mm = 2 * (cfg.depth * double * seq + cfg.depth_single_blocks * single * seq)
    mm += 2 * (music * cfg.in_channels * d + txt * cfg.context_in_dim * d + music * d * cfg.in_channels)
    attn = (cfg.depth + cfg.depth_single_blocks) * 4 * cfg.num_heads * seq * seq * cfg.head_dim
    return batch * (mm + attn) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, repeats=3)
    ap.add_argument("--evaluations", type=int, default=31, help="model evaluations per clip of our procedure")
    args = ap.parse_args()
    cfg, model, x, t, cond, null, g, gh, gw = real_shape_inputs(args, t=0.7)
    fast = copy.deepcopy(model).to(torch.bfloat16)
    fast.ops = BLOCKED_ATTENTION_OPS
    rope = model.rope_for(args.txt_len, gh, gw)

    official = official_cfg_evaluation(model, x, t, cond, null, g, gh, gw)  # one Euler step of sample.py

    ours32 = cfg_velocity(model, cond, null, g, rope)
    bf = torch.bfloat16
    ours_bf = cfg_velocity(fast, Conditioning(cond.txt.to(bf), cond.y.to(bf)),
                           Conditioning(null.txt.to(bf), null.y.to(bf)), g, rope)
    xb, tb = x.to(bf), t.to(bf)
    variants = {
        "official (2 x B=1 fp32, RoPE per call)": (official, OFFICIAL_STEPS, "fp32"),
        "ours fp32 (B=2, cached RoPE)": (lambda: ours32(x, t), args.evaluations, "fp32"),
        "ours bf16 weights + blocked attention": (lambda: ours_bf(xb, tb).float(), args.evaluations, "bf16"),
    }
    tokens = 2 * (gh * gw + args.txt_len)
    a32, w32 = torch.randn(tokens, cfg.hidden_size), torch.randn(cfg.mlp_hidden_dim, cfg.hidden_size)
    abf, wbf = a32.bfloat16(), w32.bfloat16()
    peaks = {"fp32": lambda: F.linear(a32, w32), "bf16": lambda: F.linear(abf, wbf)}
    mm_gflop = 2 * tokens * cfg.hidden_size * cfg.mlp_hidden_dim / 1e9
    load0 = os.getloadavg()[0]
    with torch.no_grad():
        ref = official()  # also the warm-up of the official path (its first call pays one-off costs)
        parity = {next(iter(variants)): 1.0}
        for name, (fn, _, _) in list(variants.items())[1:]:
            out = fn()
            parity[name] = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        times = {k: [] for k in variants}
        ptimes = {k: [] for k in peaks}
        for _ in range(args.repeats):
            for name, fn in peaks.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(5):
                    fn()
                ptimes[name].append((time.perf_counter() - t0) / 5)
            for name, (fn, _, _) in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    peak = {k: mm_gflop / statistics.median(v) for k, v in ptimes.items()}
    gflop = evaluation_gflop(cfg, gh * gw, args.txt_len, 2)
    print(f"{args.config}: {gh * gw} music + {args.txt_len} text tokens, {args.threads} threads, "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}, median of {args.repeats}; "
          f"{gflop:.0f} GFLOP per CFG evaluation; matmul peaks fp32 {peak['fp32']:.0f}, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    print("per-clip seconds = measured seconds per CFG evaluation x evaluations per clip (not a timed whole clip)")
    print("| procedure | s per CFG evaluation | evaluations per clip | s per clip | vs official | GFLOP/s "
          "| % of matmul peak | cosine vs official (one evaluation) |\n|---|---|---|---|---|---|---|---|")
    base = statistics.median(times[next(iter(variants))]) * OFFICIAL_STEPS
    for name, (_, evals, kind) in variants.items():
        per = statistics.median(times[name])
        clip = per * evals
        gfs = gflop / per
        print(f"| {name} | {per:.3f} | {evals} | {clip:.1f} | {base / clip:.2f}x | {gfs:.0f} "
              f"| {100 * gfs / peak[kind]:.0f}% | {parity[name]:.6f} |")


if __name__ == "__main__":
    main()
