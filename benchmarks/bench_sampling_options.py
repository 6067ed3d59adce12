"""Cost and accuracy of each sampling option on a model directory (default: the bundled default), one process.

For every setting: model evaluations per clip (each a batched cond+uncond call inside the guidance interval,
a B-row call outside it), the sampling seconds per 10.24 s clip, and the relative
L2 distance of the final latent to a high-accuracy solution of the full-guidance flow (Heun, 50 steps, the
model's shift), averaged over ``--prompts`` prompts (one batch). Run it on a quiet machine with one thread:

    OMP_NUM_THREADS=1 python benchmarks/bench_sampling_options.py
"""

from __future__ import annotations

import argparse
import time

import torch

from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir

PROMPTS = ["a slow soft piano melody", "fast energetic drums with bass", "calm ambient pad with strings"]

#: (label, build_request options); None for the model's own default settings
SETTINGS = [
    ("model default", {}),
    ("official sampler (euler 50, no shift), negative ''", {"preset": "official", "negative_prompt": ""}),
    ("euler 16, shift 3", {"solver": "euler", "steps": 16}),
    ("ab2 16, shift 3", {"solver": "ab2", "steps": 16}),
    ("ab2 24, shift 3", {"solver": "ab2", "steps": 24}),
    ("heun 8, shift 3", {"solver": "heun", "steps": 8}),
    ("model default + guidance interval [0, 0.8]", {"guidance_interval": (0.0, 0.8)}),
    ("model default + guidance interval [0.2, 1]", {"guidance_interval": (0.2, 1.0)}),
    ("model default + cache 0.05", {"cache_threshold": 0.05}),
    ("model default + cache 0.1", {"cache_threshold": 0.1}),
    ("model default + cache 0.2", {"cache_threshold": 0.2}),
    ("ab2 24 + cache 0.1", {"solver": "ab2", "steps": 24, "cache_threshold": 0.1}),
]


def latents(pipe: FluxMusicPipeline, prompts: list[str], seed: int, **options) -> tuple[torch.Tensor, float, float]:
    """Final latents of the prompts (batched), sampling seconds, evaluations per clip."""
    req = pipe.request(prompts, seed=seed, **options)
    cond = pipe.conditioning([it.prompt for it in req.items])
    uncond = pipe.conditioning([it.negative_prompt for it in req.items])
    t = time.perf_counter()
    x, stats = pipe.sample_latents(req, cond, uncond)
    return x, time.perf_counter() - t, stats["evaluations"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--prompts", type=int, default=1, help="clips per setting (one batch), timed together")
    ap.add_argument("--reference-steps", type=int, default=50, help="Heun steps of the reference solution")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pipe = FluxMusicPipeline.from_pretrained(args.model)
    prompts = PROMPTS[: args.prompts]
    print(f"model {args.model}, defaults {pipe.request(prompts[0]).settings.describe()}; "
          f"torch threads {torch.get_num_threads()}")
    latents(pipe, prompts, args.seed, steps=2)  # warm-up
    ref, ref_s, ref_ev = latents(pipe, prompts, args.seed, solver="heun", steps=args.reference_steps)
    print(f"reference: Heun {args.reference_steps} ({ref_ev:g} evaluations) {ref_s / len(prompts):.2f} s per clip")

    print("\n| setting | evaluations per clip | sampling s per clip | latent distance to reference |")
    print("|---|---|---|---|")
    for label, options in SETTINGS:
        x, sec, ev = latents(pipe, prompts, args.seed, **options)
        dist = ((x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).mean().item()
        print(f"| {label} | {ev:.1f} | {sec / len(prompts):.2f} | {dist:.4f} |", flush=True)


if __name__ == "__main__":
    main()
