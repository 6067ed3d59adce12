"""One CFG transformer evaluation of a config at the real shapes: optimized vs the unoptimized way.

optimized   : cond + uncond in ONE batched forward (batch 2), RoPE table from the per-shape cache
unoptimized : two forwards (batch 1 each), RoPE recomputed from position ids in every call (official sampler)
bf16        : the optimized path under CPU bf16 autocast (fp32 weights)

Variants run interleaved, round-robin, in one process so machine noise hits them alike; we report the
median per variant and ratios to the unoptimized path.

    python benchmarks/bench_transformer.py --config small --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from realshape import add_shape_arguments, official_cfg_evaluation, real_shape_inputs

from fluxmusic.flow import cfg_velocity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, repeats=5)
    args = ap.parse_args()
    cfg, model, x, t, cond, null, g, gh, gw = real_shape_inputs(args, t=0.5)

    batched = cfg_velocity(model, cond, null, g, model.rope_for(args.txt_len, gh, gw))

    def optimized():
        return batched(x, t)

    unoptimized = official_cfg_evaluation(model, x, t, cond, null, g, gh, gw)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return batched(x, t)

    variants = {
        "unoptimized (2 passes, RoPE each call)": unoptimized,
        "optimized (batched CFG, cached RoPE)": optimized,
        "optimized + bf16 autocast": bf16,
    }
    with torch.no_grad():
        ref = unoptimized()
        for name, fn in variants.items():
            err = (fn().float() - ref).abs().max().item()
            print(f"check {name}: max-abs vs unoptimized {err:.2e} ({err / ref.abs().max().item():.1e} of the peak)")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["unoptimized (2 passes, RoPE each call)"])
    print(f"\n{args.config}: {gh * gw} music + {args.txt_len} text tokens, CFG batch 2, "
          f"{args.threads} threads, median of {args.repeats}")
    print("| variant | ms per CFG evaluation | speed-up vs unoptimized |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
