"""Vocoder variants against the hop-rate comb, trained time-boxed on the CPU or a lent GPU.

The lent GPU machine has no FluidSynth and takes at most 64 MiB of files, so ``pack`` cuts one ``--seconds``
segment from each training clip of a rendered corpus (offset drawn per clip from ``--seed``) and writes them
as one FLAC file plus ``segments.json``. ``train`` (on the GPU machine) rebuilds aligned (log-mel, waveform)
crops from it and runs the vocoder task of the shared loop for a wall-clock budget, checkpointing often;
``train --manifest`` reads the whole rendered corpus instead (its train split, on this machine). ``export``
writes the EMA generator of a checkpoint as a model directory (``save_pretrained``).

Variants (``--variant``) name the loss / discriminator choices compared against the hop-rate comb:
``pa_comb`` phase-advance Vocos from scratch, MPD + spectrogram discriminators, STFT losses with the long
(2048/4096) windows x15; ``pa_comb_p160`` the same plus a period-160 (hop) discriminator; ``pa_p160`` the
period-160 discriminator with the standard STFT losses x1; ``int_comb_p160`` as ``pa_comb_p160`` with
integrated phase (the head predicts per-frame phase increments, ``VocosConfig.phase_integrate``).

    python benchmarks/vocoder_variants.py pack --manifest RUN/corpus/manifest.jsonl --out .gpu_data/vocoder
    python benchmarks/vocoder_variants.py train --manifest RUN/corpus/manifest.jsonl --variant pa_comb_p160 \
        --minutes 100 --run DIR --batch 8
    python benchmarks/vocoder_variants.py train --data .gpu_data/vocoder --variant pa_comb --minutes 4 --run DIR
    python benchmarks/vocoder_variants.py export --run DIR --out DIR/vocoder
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxmusic.audio import MelConfig, log_mel  # noqa: E402
from fluxmusic.training.recipe import RECIPES  # noqa: E402
from fluxmusic.training.vocoder_task import COMB_RESOLUTIONS, STFT_RESOLUTIONS, VocoderConfig  # noqa: E402

#: mel frames dropped at each end of a segment: their STFT windows reach past the segment (reflect padding)
EDGE_FRAMES = 3

VARIANTS: dict[str, dict] = {
    "pa_comb": {"periods": (2, 3, 5, 7, 11), "stft_weight": 15.0, "resolutions": COMB_RESOLUTIONS},
    "pa_comb_p160": {"periods": (2, 3, 5, 7, 11, 160), "stft_weight": 15.0, "resolutions": COMB_RESOLUTIONS},
    "pa_p160": {"periods": (2, 3, 5, 7, 11, 160), "stft_weight": 1.0, "resolutions": STFT_RESOLUTIONS},
    # fine-tunes of the bundled vocoder (its phase-2 run: periods 2-11, phase advance) with quiet-bin phase dither
    "dither20": {"periods": (2, 3, 5, 7, 11), "stft_weight": 15.0, "resolutions": COMB_RESOLUTIONS, "dither": -20.0},
    "int_dither20": {"periods": (2, 3, 5, 7, 11), "stft_weight": 15.0, "resolutions": COMB_RESOLUTIONS,
                     "dither": -20.0, "integrate": True},
    "int_comb_p160": {"periods": (2, 3, 5, 7, 11, 160), "stft_weight": 15.0, "resolutions": COMB_RESOLUTIONS,
                      "integrate": True},
}


def variant_config(variant: str) -> VocoderConfig:
    v = VARIANTS[variant]
    return dataclasses.replace(RECIPES["default"].vocoder, vocos_phase_advance=True, disc_periods=v["periods"],
                               vocos_phase_integrate=v.get("integrate", False),
                               vocos_phase_dither_db=v.get("dither"))


def pack(manifest: Path, out: Path, seconds: float, seed: int) -> None:
    import soundfile as sf

    from fluxmusic.data.manifest import load_manifest

    cfg = MelConfig()
    seg = int(round(seconds * cfg.sample_rate))
    entries = [e for e in load_manifest(manifest) if e.attributes.get("split", "train") == "train"]
    rng = np.random.default_rng(seed)
    parts = []
    for e in entries:
        w, sr = sf.read(e.path, dtype="int16")
        assert sr == cfg.sample_rate, (e.path, sr)
        start = int(rng.integers(0, max(1, len(w) - seg)))
        piece = np.zeros(seg, np.int16)
        piece[: len(w[start: start + seg])] = w[start: start + seg]
        parts.append(piece)
    out.mkdir(parents=True, exist_ok=True)
    sf.write(out / "segments.flac", np.concatenate(parts), cfg.sample_rate, format="FLAC")
    (out / "segments.json").write_text(json.dumps({"count": len(parts), "samples": seg, "seed": seed,
                                                   "manifest": str(manifest)}))
    print(f"packed {len(parts)} segments of {seconds} s: {(out / 'segments.flac').stat().st_size / 1e6:.1f} MB")


def load_bank(data: Path, device: str):
    import soundfile as sf

    from fluxmusic.training.audio_data import ClipBank

    meta = json.loads((data / "segments.json").read_text())
    w, _ = sf.read(data / "segments.flac", dtype="float32")
    waves = torch.from_numpy(w).view(meta["count"], meta["samples"])
    cfg = MelConfig()
    mels = torch.cat([log_mel(waves[i: i + 256].to(device), cfg).cpu() for i in range(0, len(waves), 256)])
    e, hop = EDGE_FRAMES, cfg.hop_length
    frames = meta["samples"] // hop
    mels, waves = mels[:, e: frames - e], waves[:, e * hop: (frames - e) * hop]
    n = len(waves)
    return ClipBank(waves, mels.contiguous(), [""] * n, [{}] * n, cfg)


def train(data: Path | None, manifest: Path | None, variant: str, minutes: float, run: Path, batch: int,
          crop: int, lr: float, init: Path | None = None) -> None:
    from fluxmusic.training.audio_data import WaveMelCropDataset
    from fluxmusic.training.config import TrainConfig
    from fluxmusic.training.loop import train as run_loop
    from fluxmusic.training.vocoder_task import VocoderTask

    v = VARIANTS[variant]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the STFT losses and iSTFT want full fp32
    if manifest is not None:
        from fluxmusic.training.audio_data import load_clip_bank

        bank = load_clip_bank(manifest, split="train")
    else:
        bank = load_bank(data, device)
    config = variant_config(variant)
    task = VocoderTask(WaveMelCropDataset(bank, crop, 0), None, config, bank.mel_config, init_checkpoint=init,
                       stft_weight=v["stft_weight"], stft_resolutions=v["resolutions"])
    cfg = TrainConfig(steps=1_000_000, batch_size=batch, lr=lr, ema_decay=0.999, ema_every=1, warmup_steps=50,
                      grad_clip=0.0, log_every=50, ckpt_every=250, seed=0, device=device)
    print(f"{variant}: {len(bank)} segments, crops of {crop} frames, batch {batch}, {minutes} min", flush=True)
    # The loop has no wall-clock limit: a timer ends the process after the budget; checkpoints every 250 steps
    # bound what is lost (export reads the last one).
    timer = threading.Timer(minutes * 60, lambda: (print("time budget reached", flush=True), _exit()))
    timer.daemon = True
    timer.start()
    run_loop(task, cfg, run, resume=True)


def _exit() -> None:
    import os

    os._exit(0)


def export(run: Path, out: Path, variant: str) -> None:
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    gen = variant_config(variant).build()
    gen.load_state_dict({k[len("generator."):]: t for k, t in ckpt["ema"].items() if k.startswith("generator.")})
    gen.save_pretrained(out)
    (out / "trained.json").write_text(json.dumps({"variant": variant, "step": int(ckpt["step"])}))
    print(f"exported {variant} step {ckpt['step']} -> {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--manifest", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--seconds", type=float, default=1.0)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("train")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a packed folder (pack)")
    src.add_argument("--manifest", type=Path, help="a rendered corpus's manifest (its train split)")
    b.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    b.add_argument("--minutes", type=float, required=True)
    b.add_argument("--run", type=Path, required=True)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--crop", type=int, default=80, help="mel frames per crop")
    b.add_argument("--lr", type=float, default=5e-4)
    b.add_argument("--init", type=Path, help="start from this run's checkpoint (its EMA weights; a phase-advance "
                   "run into an integrated-phase variant gains zero increment rows: step 0 is that model)")
    c = sub.add_parser("export")
    c.add_argument("--run", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    args = p.parse_args()
    t0 = time.time()
    if args.cmd == "pack":
        pack(args.manifest, args.out, args.seconds, args.seed)
    elif args.cmd == "train":
        train(args.data, args.manifest, args.variant, args.minutes, args.run, args.batch, args.crop, args.lr, args.init)
    else:
        export(args.run, args.out, args.variant)
    print(f"{args.cmd}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
