"""Time a 10.24 s generation with the bundled default model at its default settings, on the CPU.

Reports the median wall time of ``--repeats`` generations (after one warm-up) and a per-component split
(text encoders, the CFG flow solve, VAE decode, vocoder), for each ``--threads`` value side by side.

    python benchmarks/bench_default.py --threads 1 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir


def time_once(pipe: FluxMusicPipeline, prompt: str, seed: int) -> dict[str, float]:
    """One generation with timers around the backend's component calls."""
    be = pipe.backend
    spent = {"vae_decode": 0.0, "vocoder": 0.0}
    originals = {k: getattr(be, k if k != "vocoder" else "vocode") for k in spent}

    def timed(name, fn):
        def run(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            spent[name] += time.perf_counter() - t
            return out
        return run

    be.vae_decode, be.vocode = timed("vae_decode", originals["vae_decode"]), timed("vocoder", originals["vocoder"])
    pipe._cache.clear()  # include the text encoders, as a fresh prompt would
    try:
        t0 = time.perf_counter()
        t = time.perf_counter()
        pipe.conditioning([prompt])
        spent["text"] = time.perf_counter() - t
        pipe(prompt, seed=seed)
        total = time.perf_counter() - t0
    finally:
        del be.vae_decode, be.vocode
    spent["flow"] = total - sum(spent.values())
    spent["total"] = total
    return spent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt", default="a fast cheerful melody on a plucked string")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    pipe = FluxMusicPipeline.from_pretrained(args.model)
    d = pipe.defaults
    print(f"model {args.model}: defaults steps={d.get('steps')} guidance={d.get('guidance')} solver={d.get('solver')}"
          f" | 10.24 s of audio | median of {args.repeats} after a warm-up")
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        time_once(pipe, args.prompt, 0)  # warm-up
        runs = [time_once(pipe, args.prompt, i + 1) for i in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[threads] = med
        parts = "  ".join(f"{k} {v:.2f}" for k, v in med.items() if k != "total")
        print(f"threads {threads}: total {med['total']:.2f} s  ({parts})  real-time factor {10.24 / med['total']:.1f}x",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
