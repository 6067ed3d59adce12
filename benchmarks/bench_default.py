"""Time a 10.24 s generation with the bundled default model at its default settings, on the CPU.

Reports the median wall time of ``--repeats`` generations (after one warm-up) and a per-component split
(text encoders, the CFG flow solve, VAE decode, vocoder), for each ``--threads`` value side by side.

    python benchmarks/bench_default.py --threads 1 2 --dtypes fp32 auto --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument("--dtypes", nargs="+", default=["fp32", "auto"],
                   help="dtypes compared side by side (auto: bf16 where the CPU has it natively)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt", default="a fast cheerful melody on a plucked string")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    pipes = {dt: FluxMusicPipeline.from_pretrained(args.model, dtype=dt) for dt in args.dtypes}
    d = next(iter(pipes.values())).defaults
    print(f"model {args.model}: defaults steps={d.get('steps')} guidance={d.get('guidance')} solver={d.get('solver')}"
          f" | 10.24 s of audio | median of {args.repeats} after a warm-up, variants interleaved")
    variants = [(th, dt) for th in args.threads for dt in pipes]
    runs: dict[tuple[int, str], list[dict[str, float]]] = {v: [] for v in variants}
    for rep in range(args.repeats + 1):  # round 0 warms every variant up
        for th, dt in variants:
            torch.set_num_threads(th)
            r = time_once(pipes[dt], args.prompt, rep)
            if rep:
                runs[(th, dt)].append(r)
    results = {}
    for (th, dt), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        label = f"{dt} ({pipes[dt].backend.dtype})".replace("torch.", "")
        results[f"threads {th} {label}"] = med
        parts = "  ".join(f"{k} {v:.2f}" for k, v in med.items() if k != "total")
        print(f"threads {th} {label}: total {med['total']:.2f} s  ({parts})  real-time factor "
              f"{10.24 / med['total']:.1f}x", flush=True)
    if len(pipes) > 1:  # the same request through each dtype: how far the audio moved
        waves = {dt: pipe(args.prompt, seed=0).audio[0] for dt, pipe in pipes.items()}
        ref = waves[args.dtypes[0]]
        from fluxmusic.audio import log_mel

        for dt in args.dtypes[1:]:
            snr = 10 * math.log10(float((ref ** 2).sum()) / max(float(((ref - waves[dt]) ** 2).sum()), 1e-30))
            # An integrated-phase vocoder turns tiny mel differences into a slow phase drift, which the waveform
            # SNR counts as error; the log-mel distance is what is heard
            mel_l1 = float((log_mel(torch.from_numpy(ref)) - log_mel(torch.from_numpy(waves[dt]))).abs().mean())
            results[f"snr_db {dt} vs {args.dtypes[0]}"] = snr
            results[f"log_mel_l1 {dt} vs {args.dtypes[0]}"] = mel_l1
            print(f"{dt} vs {args.dtypes[0]} (seed 0): waveform SNR {snr:.1f} dB, log-mel L1 {mel_l1:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
