"""How accurate is the sweep's reference? Latent distances of a few settings to a Heun-N and a Heun-M solution.

``fluxmusic eval --sweep`` measures every setting against a many-step Heun solution; when two settings' distances
differ by less than the reference's own error, the sweep cannot rank them. This solves one or more prompts of
the held-out split with Heun at two step counts and prints each setting's relative latent distance to both.

    OMP_NUM_THREADS=1 python benchmarks/reference_error.py --prompts 1 --coarse 40 --fine 100
"""

from __future__ import annotations

import argparse
import json

from fluxmusic.evaluation.generation import solve_with_stats
from fluxmusic.evaluation.sweep import relative_distance
from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir

SETTINGS = (("euler", 50, None), ("ab2", 12, 3.0), ("ab2", 14, 3.0), ("ab2", 16, 3.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--manifest", default="/work/run/corpus/manifest.jsonl")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--coarse", type=int, default=40)
    ap.add_argument("--fine", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pipe = FluxMusicPipeline.from_pretrained(args.model)
    with open(args.manifest) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = [r["caption"] for r in rows if r.get("split") == "val"][: args.prompts]
    seeds = [args.seed + i for i in range(len(prompts))]
    guidance = pipe.request(prompts[0]).settings.guidance

    def solve(solver, steps, shift):
        return solve_with_stats(pipe, prompts, seeds, steps, solver, shift, guidance)[0]

    coarse, fine = solve("heun", args.coarse, None), solve("heun", args.fine, None)
    print(f"{len(prompts)} prompt(s), guidance {guidance:g}; Heun-{args.coarse} to Heun-{args.fine}: "
          f"{relative_distance(coarse, fine):.4f}")
    print(f"| setting | to Heun-{args.coarse} | to Heun-{args.fine} |\n|---|---|---|")
    for solver, steps, shift in SETTINGS:
        lat = solve(solver, steps, shift)
        sched = "uniform" if shift is None else f"shift {shift:g}"
        print(f"| {solver} {steps}, {sched} | {relative_distance(lat, coarse):.4f} | "
              f"{relative_distance(lat, fine):.4f} |", flush=True)


if __name__ == "__main__":
    main()
