"""Per-clip cost of the official sampling procedure vs our fastest, measured side by side in one process.

official : per Euler step two batch-1 fp32 forwards (cond, then uncond), RoPE recomputed from position ids
           in every call, 50 steps (the official sample.py)
ours     : one batch-2 CFG forward per guided evaluation, cached RoPE, weights stored in bf16, the fused
           CPU attention and QK norm + RoPE kernels (fluxmusic.cpu_attention); outside the guidance interval one
           batch-1 forward
           (cond only); with the step cache, the evaluations it answers cost one probe (the first block's
           modulation) instead of a forward
ours fp32: the batched forward in fp32 (``--fp32``; isolates the procedure from the numerics)

The setting of ours: ``--from-sweep RESULTS.json`` takes the cheapest setting that matched Euler-50 both by
latent distance and by FAD/CLAP in a ``fluxmusic eval --sweep`` run (``steps_sweep.fewest.both``: its solver,
steps, schedule, guidance interval, cache threshold, and its measured evaluations per clip), or give
``--evaluations N`` (guided, batched) and ``--unguided U`` (cond-only) by hand. The equal-quality claim rests on
that sweep, run on the bundled default: the ``small`` config here has random weights.

A full 10.24 s clip at the ``small`` size takes minutes on a 2-core CPU, so this times the per-evaluation
cost of each procedure (interleaved, round-robin, median of ``--repeats``) and multiplies by the evaluation
counts of a clip; the table says so. GFLOP/s are against the matmul peaks measured in the same run.

    OMP_NUM_THREADS=2 python benchmarks/bench_procedure.py --config small --from-sweep eval_results.json
    OMP_NUM_THREADS=2 python benchmarks/bench_procedure.py --config small --evaluations 16 --repeats 3
    OMP_NUM_THREADS=2 python benchmarks/bench_procedure.py --model fluxmusic/default_model --from-sweep RESULTS.json

``--model DIR`` times a model directory's transformer with its trained weights at its own shapes (the bundled
default: 256 music + 40 T5 tokens) on a real prompt, with its default guidance.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from realshape import add_shape_arguments, official_cfg_evaluation, real_shape_inputs

from fluxmusic.backend import compile_transformer
from fluxmusic.flow import Conditioning, cfg_velocity, function_evaluations
from fluxmusic.ops import FUSED_ATTENTION_OPS
from fluxmusic.step_cache import FirstBlockProbe

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


def our_setting(args: argparse.Namespace) -> dict:
    """Guided (B=2) and cond-only (B=1) forwards and probe calls per clip of our procedure, and its label."""
    if args.from_sweep:
        results = json.loads(Path(args.from_sweep).read_text())
        sweep = results.get("steps_sweep", results)
        best = (sweep.get("fewest") or {}).get("both")
        if not best:
            raise SystemExit(f"{args.from_sweep}: no setting matched the target both ways (steps_sweep.fewest.both)")
        # cost = guided + unguided / 2, nfe = guided + unguided (per clip, after the step cache)
        unguided = 2 * (best["nfe"] - best["cost"])
        probes = function_evaluations(best["steps"], best["solver"]) if best.get("cache_threshold") else 0
        return {"label": best["label"], "guided": best["nfe"] - unguided, "unguided": unguided, "probes": probes,
                "source": f"{args.from_sweep} (the sweep's cheapest match of Euler-50, both criteria)"}
    return {"label": f"{args.evaluations} guided + {args.unguided} cond-only evaluations",
            "guided": args.evaluations, "unguided": args.unguided, "probes": 0, "source": "--evaluations"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(ap, repeats=3)
    ap.add_argument("--evaluations", type=int, default=16,
                    help="guided (batched CFG) evaluations per clip of our procedure (default 16: AB2 16)")
    ap.add_argument("--unguided", type=float, default=0, help="cond-only evaluations per clip (guidance interval)")
    ap.add_argument("--from-sweep", help="fluxmusic eval --sweep results JSON: our setting is its cheapest match")
    ap.add_argument("--fp32", action="store_true", help="also time our batched forward in fp32")
    ap.add_argument("--compile", action="store_true",
                    help="ours with torch.compile of the transformer (fluxmusic.backend.compile_transformer); the "
                         "build time is printed apart: paid once per process and input shape")
    ap.add_argument("--all-parts", action="store_true",
                    help="time the cond-only forward and the cache probe even when our setting needs neither (their "
                         "seconds let another setting's per-clip cost be computed from the same run)")
    args = ap.parse_args()
    ours = our_setting(args)
    cfg, model, x, t, cond, null, g, gh, gw = real_shape_inputs(args, t=0.7)
    fast = copy.deepcopy(model).to(torch.bfloat16)
    fast.ops = FUSED_ATTENTION_OPS
    rope = model.rope_for(args.txt_len, gh, gw)

    official = official_cfg_evaluation(model, x, t, cond, null, g, gh, gw)  # one Euler step of sample.py

    ours32 = cfg_velocity(model, cond, null, g, rope)
    bf = torch.bfloat16
    ours_bf = cfg_velocity(fast, Conditioning(cond.txt.to(bf), cond.y.to(bf)),
                           Conditioning(null.txt.to(bf), null.y.to(bf)), g, rope)
    xb, tb = x.to(bf), t.to(bf)
    build_s = 0.0
    if args.compile:
        compile_transformer(fast)
        t0 = time.perf_counter()
        with torch.no_grad():
            ours_bf(xb, tb)
            if ours["unguided"] or args.all_parts:
                fast(xb, tb, cond.txt.to(bf), cond.y.to(bf), rope)
        build_s = time.perf_counter() - t0
    variants = {"official (2 x B=1 fp32, RoPE per call)": (official, OFFICIAL_STEPS, "fp32", 2)}
    if args.fp32:
        variants["ours fp32 (B=2, cached RoPE)"] = (lambda: ours32(x, t), ours["guided"], "fp32", 2)
    variants["ours bf16 + fused attention, guided (B=2)"] = (lambda: ours_bf(xb, tb).float(), ours["guided"],
                                                              "bf16", 2)
    if ours["unguided"] or args.all_parts:
        cb = Conditioning(cond.txt.to(bf), cond.y.to(bf))
        variants["ours bf16 + fused attention, cond only (B=1)"] = (
            lambda: fast(xb, tb, cb.txt, cb.y, rope).float(), ours["unguided"], "bf16", 1)
    probe = FirstBlockProbe.from_transformer(fast)
    yb = cond.y.to(bf)
    probe_fn = (lambda: probe(xb, tb, yb)) if ours["probes"] or args.all_parts else None
    tokens = 2 * (gh * gw + args.txt_len)
    a32, w32 = torch.randn(tokens, cfg.hidden_size), torch.randn(cfg.mlp_hidden_dim, cfg.hidden_size)
    abf, wbf = a32.bfloat16(), w32.bfloat16()
    peaks = {"fp32": lambda: F.linear(a32, w32), "bf16": lambda: F.linear(abf, wbf)}
    mm_gflop = 2 * tokens * cfg.hidden_size * cfg.mlp_hidden_dim / 1e9
    load0 = os.getloadavg()[0]
    with torch.no_grad():
        ref = official()  # also the warm-up of the official path (its first call pays one-off costs)
        parity = {next(iter(variants)): 1.0}
        for name, (fn, _, _, _) in list(variants.items())[1:]:
            out = fn()
            # the cond-only forward is not the guided velocity: no parity figure for it
            parity[name] = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item() if "B=1" not in name \
                else float("nan")
        probe_s = []
        if probe_fn is not None:
            probe_fn()
            for _ in range(5):
                t0 = time.perf_counter()
                probe_fn()
                probe_s.append(time.perf_counter() - t0)
        times = {k: [] for k in variants}
        ptimes = {k: [] for k in peaks}
        for _ in range(args.repeats):
            for name, fn in peaks.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(5):
                    fn()
                ptimes[name].append((time.perf_counter() - t0) / 5)
            for name, (fn, _, _, _) in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    peak = {k: mm_gflop / statistics.median(v) for k, v in ptimes.items()}
    gflop = evaluation_gflop(cfg, gh * gw, args.txt_len, 2)
    print(f"{args.config}: {gh * gw} music + {args.txt_len} text tokens, {args.threads} threads, "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}, median of {args.repeats}; "
          f"{gflop:.0f} GFLOP per CFG evaluation; matmul peaks fp32 {peak['fp32']:.0f}, "
          f"bf16 {peak['bf16']:.0f} GFLOP/s")
    print("per-clip seconds = measured seconds per evaluation x evaluations per clip (not a timed whole clip)")
    print(f"ours: {ours['label']} from {ours['source']}")
    if args.compile:
        print(f"ours is torch.compile'd: build {build_s:.0f} s, once per process (not in the per-clip figures)")
    print("| procedure | s per evaluation | evaluations per clip | s per clip | vs official | GFLOP/s "
          "| % of matmul peak | cosine vs official (one evaluation) |\n|---|---|---|---|---|---|---|---|")
    names = list(variants)
    base = statistics.median(times[names[0]]) * OFFICIAL_STEPS
    for name, (_, evals, kind, rows) in variants.items():
        per = statistics.median(times[name])
        clip = per * evals
        gfs = gflop * rows / 2 / per
        ratio = f"{base / clip:.2f}x" if not name.startswith("ours bf16") else "(part of ours)"
        print(f"| {name} | {per:.3f} | {evals:g} | {clip:.1f} | {ratio} | {gfs:.0f} "
              f"| {100 * gfs / peak[kind]:.0f}% | {parity[name]:.6f} |")
    # our whole procedure: its guided and cond-only forwards and, with the step cache, a probe per requested
    # evaluation (the cache decides on the probe before skipping)
    ours_clip = sum(statistics.median(times[n]) * variants[n][1] for n in names if n.startswith("ours bf16"))
    probe_clip = statistics.median(probe_s) * ours["probes"] if probe_s else 0.0
    ours_clip += probe_clip
    probes = f" + {ours['probes']} probes" if ours["probes"] else ""
    if probe_s:
        print(f"cache probe: {1000 * statistics.median(probe_s):.2f} ms per call")
    print(f"| **ours, whole procedure ({ours['label']})** | | {ours['guided']:g} guided + {ours['unguided']:g} "
          f"cond-only{probes} "
          f"| {ours_clip:.1f} | **{base / ours_clip:.2f}x** | | | |")


if __name__ == "__main__":
    main()
