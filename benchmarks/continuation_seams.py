"""Continuation, infilling and long form measured on held-out clips (docs/continuation.md).

For each clip: the seam statistics of the real clip at the seam time (the baseline "inside a real clip"),
then continuation (keep 0:SEAM) with several seam options, infilling, and the naive join (the clip's beginning
followed by an independent generation, what concatenating clips gives). Reports seam continuity (log-mel step
and spectral flux across the seam over those within 1 s around it: 1 = as smooth as inside), the kept region's
SNR (spliced output, and the model's own decoding), and sampling seconds. Then one long-form song: its seams
and cost per minute of audio.

    python benchmarks/continuation_seams.py --manifest /work/run/corpus/manifest.jsonl --clips 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fluxmusic.audio import read_audio
from fluxmusic.continuation import seam_continuity
from fluxmusic.pipeline import FluxMusicPipeline

CONFIGS = [
    {"blend": 0.0, "resample": 0},
    {"blend": 0.16, "resample": 0},
    {"blend": 0.48, "resample": 0},
    {"blend": 0.16, "resample": 1},
]


def seam(wave: np.ndarray, t: float) -> dict:
    s = seam_continuity(wave, t)
    return {"logmel_ratio": round(s["logmel_ratio"], 3), "flux_ratio": round(s["flux_ratio"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--seam", type=float, default=6.0)
    ap.add_argument("--long", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = FluxMusicPipeline.from_pretrained()
    root = Path(args.manifest).parent
    rows = [json.loads(line) for line in Path(args.manifest).read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"][: args.clips]
    report: dict = {"clips": [], "settings": pipe.request("x").settings.describe()}
    for r in val:
        wave = read_audio(root / r["path"], pipe.sample_rate)
        prompt = r["caption"]
        entry = {"clip": r["path"], "real": seam(wave, args.seam), "runs": []}
        for cfg in CONFIGS:
            t0 = time.perf_counter()
            out = pipe(prompt, audio=wave, keep=f"0:{args.seam}", seed=0, **cfg)
            raw = pipe(prompt, audio=wave, keep=f"0:{args.seam}", seed=0, splice=False, **cfg)
            entry["runs"].append({"task": "continue", **cfg, "seam_spliced": seam(out.audio[0], args.seam),
                                  "seam_decoded": seam(raw.audio[0], args.seam),
                                  "kept_snr_db": round(out.kept_snr_db[0], 2),
                                  "decoded_kept_snr_db": round(out.decoded_kept_snr_db[0], 2),
                                  "evaluations": out.evaluations, "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(entry["runs"][-1]), flush=True)
            if args.json and cfg == CONFIGS[1]:
                from fluxmusic.audio import write_audio

                stem = Path(args.json).with_suffix("")
                write_audio(f"{stem}.{Path(r['path']).stem}.continued.wav", out.audio[0], pipe.sample_rate)
                write_audio(f"{stem}.{Path(r['path']).stem}.original.wav", wave, pipe.sample_rate)
        out = pipe(prompt, audio=wave, regenerate="4:6", seed=0)
        entry["runs"].append({"task": "infill 4:6", "seam_in": seam(out.audio[0], 4.0),
                              "seam_out": seam(out.audio[0], 6.0),
                              "kept_snr_db": round(out.kept_snr_db[0], 2),
                              "decoded_kept_snr_db": round(out.decoded_kept_snr_db[0], 2)})
        print(json.dumps(entry["runs"][-1]), flush=True)
        fresh = pipe(prompt, seed=0).audio[0]
        naive = np.concatenate([wave[: int(args.seam * pipe.sample_rate)], fresh])[: len(wave)]
        entry["runs"].append({"task": "naive join", "seam": seam(naive, args.seam)})
        print(json.dumps(entry["runs"][-1]), flush=True)
        report["clips"].append(entry)
    if args.long:
        prompt = val[0]["caption"]
        t0 = time.perf_counter()
        req = pipe.request(prompt, duration=args.long, seed=0)
        out = pipe.generate(req)
        wall = time.perf_counter() - t0
        geo = pipe.geometry
        spf = geo.seconds_per_latent_frame
        seams = [(w.start + w.context / 2) * spf for w in req.long_form.windows(geo)[1:]]
        report["long"] = {
            "duration": args.long, "windows": out.windows, "plan": req.long_form.describe(geo),
            "seams": [seam(out.audio[0], s) for s in seams],
            "sampling_s_per_minute": round(out.timings["sampling"] * 60 / args.long, 1),
            "wall_s_per_minute": round(wall * 60 / args.long, 1),
        }
        print(json.dumps(report["long"]), flush=True)
        one = pipe(prompt, seed=0)
        report["one_window_sampling_s_per_minute"] = round(one.timings["sampling"] * 60 / 10.24, 1)
        from fluxmusic.audio import write_audio

        if args.json:
            write_audio(Path(args.json).with_suffix(".long.wav"), out.audio[0], pipe.sample_rate)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
