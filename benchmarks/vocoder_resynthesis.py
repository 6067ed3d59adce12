"""Vocoder resynthesis of held-out real clips, next to Griffin-Lim on the same clips.

For each clip: real waveform -> the model's log-mel -> vocoder -> audio, and the same log-mel -> Griffin-Lim
(librosa: the mel filterbank inverted by non-negative least squares, then ``--gl-iters`` iterations). Reported
per system: log-mel L1 to the real clip's log-mel, multi-resolution STFT distance to the real waveform
(spectral convergence + log-magnitude L1, averaged over four resolutions, as the vocoder's training loss), and
the hop-rate comb figure (``fluxmusic.evaluation.signal_features.comb_figure``; the real clips' own figures
give the range a buzz-free decoder stays in). Prints a markdown table and writes JSON with per-clip values.

    python benchmarks/vocoder_resynthesis.py --vocoder fluxmusic/default_model/vocoder \\
        --manifest corpus/manifest.jsonl --split val --limit 16 --json resynthesis.json

``--mel-match 5/0.6 8`` adds, for a Vocos vocoder, the same weights with ``mel_match_iterations`` 5 and
``mel_match_momentum`` 0.6, and with 8 rounds and no momentum: every system runs on each clip in turn (one
process, interleaved), so their seconds are comparable on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fluxmusic.audio import MelConfig, audio_info, log_mel, mel_filterbank, read_audio
from fluxmusic.errors import FluxMusicError
from fluxmusic.evaluation.signal_features import comb_figure
from fluxmusic.training.vocoder_task import stft_loss


def vocoder_dir(path: str | Path) -> Path:
    """A vocoder directory, or a model directory holding ``vocoder/``."""
    p = Path(path)
    if (p / "vocoder" / "config.json").is_file():
        return p / "vocoder"
    if (p / "config.json").is_file():
        return p
    raise FluxMusicError(f"--vocoder {p}: neither a vocoder directory (config.json) nor a model directory "
                         "(vocoder/config.json)")


def mel_config_of(vocoder: torch.nn.Module) -> MelConfig:
    """The log-mel a vocoder takes: its sample rate, mel bins and hop (product of its upsampling rates)."""
    cfg = vocoder.config
    return MelConfig(sample_rate=int(cfg.sampling_rate), hop_length=int(np.prod(cfg.upsample_rates)),
                     n_mels=int(cfg.model_in_dim))


def select_clips(manifest: str | Path, split: str | None, limit: int) -> list:
    """``limit`` manifest entries of ``split`` (None: all), spread evenly over the split so they come from many
    works (a rendered corpus lists a work's clips together)."""
    from fluxmusic.data.manifest import load_manifest

    p = Path(manifest)
    if p.is_dir():
        p = p / "manifest.jsonl"
    if not p.is_file():
        raise FluxMusicError(f"--manifest {manifest}: no manifest file")
    entries = [e for e in load_manifest(p) if split is None or e.attributes.get("split") == split]
    if not entries:
        raise FluxMusicError(f'--split {split!r}: no entry of {p} has "split": "{split}" (use --split all)')
    idx = np.unique(np.round(np.linspace(0, len(entries) - 1, min(limit, len(entries)))).astype(int))
    return [entries[i] for i in idx]


def read_clip(entry, cfg: MelConfig, seconds: float) -> np.ndarray:
    """The entry's audio at the vocoder's rate, cut to ``seconds`` and to whole hops."""
    file_sr = audio_info(entry.path)[0]
    wave = read_audio(entry.path, cfg.sample_rate, start=int(round(entry.start * file_sr)),
                      frames=int(np.ceil(seconds * file_sr)))
    n = min(len(wave), int(round(seconds * cfg.sample_rate))) // cfg.hop_length * cfg.hop_length
    if n <= cfg.n_fft:
        raise FluxMusicError(f"{entry.path}: {len(wave)} samples is too short for resynthesis")
    return wave[:n]


def invert_mel(fb: np.ndarray, mag_mel: np.ndarray, iters: int = 50) -> np.ndarray:
    """Non-negative least squares ``fb @ X ~= mag_mel`` for the linear magnitudes X: the clipped pseudo-inverse,
    refined by multiplicative updates (Lee & Seung), which keep X >= 0 and never increase the residual. Faster than
    librosa's L-BFGS NNLS on a 10 s clip, and a closer fit."""
    fb, mag_mel = fb.astype(np.float32), mag_mel.astype(np.float32)
    x = np.maximum(np.linalg.pinv(fb) @ mag_mel, 0.0) + 1e-6 * float(mag_mel.max())
    ftm = fb.T @ mag_mel
    for _ in range(iters):
        x *= ftm / np.maximum(fb.T @ (fb @ x), 1e-12)  # (fb.T fb) x, in the cheaper order
    return x


def griffin_lim(mel: torch.Tensor, cfg: MelConfig, n_samples: int, iters: int, seed: int = 0) -> np.ndarray:
    """Log-mel [frames, n_mels] (natural log of magnitude mel) -> waveform by Griffin-Lim, aligned with the
    clip the mel came from."""
    import librosa

    mag_mel = np.exp(mel.numpy()).T  # [n_mels, frames]
    linear = invert_mel(mel_filterbank(cfg), mag_mel)  # [bins, frames], >= 0
    # ``log_mel`` frame t is centred on sample t * hop + (n_fft / 2 - pad); librosa's centred frames on t * hop.
    offset = cfg.n_fft // 2 - cfg.pad
    y = librosa.griffinlim(linear.astype(np.float32), n_iter=iters, hop_length=cfg.hop_length,
                           win_length=cfg.win_length, n_fft=cfg.n_fft, center=True, length=n_samples - offset,
                           random_state=seed)
    return np.concatenate([np.zeros(offset, np.float32), y.astype(np.float32)])


def distances(out: np.ndarray, ref: np.ndarray, ref_mel: torch.Tensor, cfg: MelConfig) -> dict:
    """Log-mel L1 and multi-resolution STFT distance of ``out`` to the real clip, and ``out``'s comb figure."""
    n = min(len(out), len(ref))
    o, r = torch.from_numpy(np.ascontiguousarray(out[:n])), torch.from_numpy(np.ascontiguousarray(ref[:n]))
    mel = log_mel(o, cfg)[0]
    frames = min(mel.shape[0], ref_mel.shape[0])
    sc, mag = stft_loss(o[None], r[None])
    return {"log_mel_l1": float((mel[:frames] - ref_mel[:frames]).abs().mean()),
            "stft_sc": float(sc), "stft_log_mag": float(mag), "mr_stft": float(sc + mag),
            "comb": comb_figure(out, cfg.sample_rate)}


SYSTEM_KEYS = ("log_mel_l1", "mr_stft", "stft_sc", "stft_log_mag", "comb", "seconds")


def summarise(rows: list[dict], real_comb_max: float) -> dict:
    out: dict = {k: float(np.nanmean([r[k] for r in rows])) for k in SYSTEM_KEYS}
    combs = np.array([r["comb"] for r in rows])
    out["comb_median"], out["comb_max"] = float(np.nanmedian(combs)), float(np.nanmax(combs))
    out["comb_within_real"] = float(np.mean(combs <= real_comb_max))
    return out


def markdown(result: dict) -> str:
    real = result["real"]
    lines = [f"| system | log-mel L1 | MR-STFT distance | comb median | comb max | clips with comb <= real max "
             f"({real['comb_max']:.2f}) | s / clip |", "|---|---|---|---|---|---|---|",
             f"| real clips (input) | 0 | 0 | {real['comb_median']:.2f} | {real['comb_max']:.2f} | - | - |"]
    for name, s in result["systems"].items():
        lines.append(f"| {name} | {s['log_mel_l1']:.3f} | {s['mr_stft']:.3f} | {s['comb_median']:.2f} | "
                     f"{s['comb_max']:.2f} | {s['comb_within_real']:.2f} | {s['seconds']:.2f} |")
    return "\n".join(lines)


def parse_mel_match(spec: str) -> tuple[int, float]:
    """``ROUNDS`` or ``ROUNDS/MOMENTUM`` -> (mel_match_iterations, mel_match_momentum)."""
    rounds, _, momentum = spec.partition("/")
    try:
        return int(rounds), float(momentum or 0.0)
    except ValueError:
        raise FluxMusicError(f"--mel-match {spec!r} must be ROUNDS or ROUNDS/MOMENTUM, e.g. 8 or 5/0.6") from None


def mel_match_variant(voc: torch.nn.Module, rounds: int, momentum: float) -> torch.nn.Module:
    """The same Vocos weights with another mel-match setting (the config validates the values)."""
    from fluxmusic.vocos import VocosConfig, VocosVocoder

    if not isinstance(voc, VocosVocoder):
        raise FluxMusicError(f"--mel-match needs a Vocos vocoder (model_type fluxmusic_vocos), got "
                             f"{voc.config.model_type!r}")
    config = VocosConfig(**{**voc.config.to_dict(), "mel_match_iterations": rounds, "mel_match_momentum": momentum})
    variant = VocosVocoder(config).eval()
    variant.load_state_dict(voc.state_dict())
    return variant


def run(vocoder: str | Path, manifest: str | Path, split: str | None, limit: int, seconds: float = 10.24,
        gl_iters: int | None = 32, progress: bool = True, mel_match: list[str] | None = None) -> dict:
    """Resynthesise ``limit`` clips with the vocoder (and its ``mel_match`` variants, ``ROUNDS[/MOMENTUM]``) and
    with Griffin-Lim (``gl_iters`` None: vocoders only); per-clip rows and summaries."""
    from fluxmusic.components import load_vocoder

    vdir = vocoder_dir(vocoder)
    voc = load_vocoder(vdir).eval()
    cfg = mel_config_of(voc)
    models = {f"vocoder ({voc.config.model_type})": voc}
    for spec in mel_match or []:
        rounds, momentum = parse_mel_match(spec)
        models[f"vocoder, mel_match {rounds} momentum {momentum:g}"] = mel_match_variant(voc, rounds, momentum)
    entries = select_clips(manifest, split, limit)
    gl_name = f"Griffin-Lim ({gl_iters} iterations)"
    names = (*models, gl_name) if gl_iters else tuple(models)
    with torch.no_grad():  # warm-up: tables built on first use are not part of any clip's seconds
        for model in models.values():
            model(torch.full((1, 50, cfg.n_mels), -5.0))
    per_clip: list[dict] = []
    for i, e in enumerate(entries):
        wave = read_clip(e, cfg, seconds)
        mel = log_mel(torch.from_numpy(wave), cfg)[0]  # [frames, n_mels]
        row: dict = {"path": str(e.path), "real_comb": comb_figure(wave, cfg.sample_rate)}
        for name, model in models.items():
            t = time.perf_counter()
            with torch.no_grad():
                y = model(mel[None])[0].float().numpy()
            row[name] = {**distances(y, wave, mel, cfg), "seconds": time.perf_counter() - t}
        if gl_iters:
            t = time.perf_counter()
            y = griffin_lim(mel, cfg, len(wave), gl_iters, seed=i)
            row[gl_name] = {**distances(y, wave, mel, cfg), "seconds": time.perf_counter() - t}
        per_clip.append(row)
        if progress:
            print(f"resynthesis: {i + 1}/{len(entries)} {Path(e.path).name}: "
                  + ", ".join(f"{n}: L1 {row[n]['log_mel_l1']:.3f} comb {row[n]['comb']:.1f}" for n in names),
                  file=sys.stderr, flush=True)
    real = np.array([r["real_comb"] for r in per_clip])
    real_max = float(np.nanmax(real))
    return {
        "vocoder": str(vdir), "manifest": str(manifest), "split": split, "clips": len(per_clip),
        "seconds_per_clip": seconds, "griffin_lim_iters": gl_iters, "mel": cfg.to_dict(),
        "real": {"comb_min": float(np.nanmin(real)), "comb_median": float(np.nanmedian(real)), "comb_max": real_max},
        "systems": {n: summarise([r[n] for r in per_clip], real_max) for n in names},
        "per_clip": per_clip,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocoder", required=True, help="vocoder directory, or a model directory holding vocoder/")
    ap.add_argument("--manifest", required=True, help="corpus manifest (or its directory)")
    ap.add_argument("--split", default="val", help='manifest split to use (default val; "all" for every entry)')
    ap.add_argument("--limit", type=int, default=16, help="clips, spread over the split (default 16)")
    ap.add_argument("--seconds", type=float, default=10.24, help="clip length in seconds (default 10.24)")
    ap.add_argument("--gl-iters", type=int, default=32, help="Griffin-Lim iterations (default 32)")
    ap.add_argument("--no-griffin-lim", action="store_true",
                    help="vocoder only (the clip selection is deterministic, so an earlier run's Griffin-Lim rows "
                         "on the same --manifest/--split/--limit are the same)")
    ap.add_argument("--mel-match", nargs="+", metavar="ROUNDS[/MOMENTUM]",
                    help="also run the same Vocos weights with these mel_match settings, interleaved per clip")
    ap.add_argument("--json", help="write the results (with per-clip values) to this JSON file")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        for name, v in (("--limit", args.limit), ("--gl-iters", args.gl_iters), ("--threads", args.threads)):
            if v is not None and v < 1:
                raise FluxMusicError(f"{name} {v} must be an integer >= 1")
        if not args.seconds > 0:
            raise FluxMusicError(f"--seconds {args.seconds} must be > 0")
        if args.json and not args.json.endswith(".json"):
            raise FluxMusicError(f"--json {args.json!r} must end in .json")
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run(args.vocoder, args.manifest, None if args.split == "all" else args.split, args.limit,
                     args.seconds, None if args.no_griffin_lim else args.gl_iters, progress=not args.quiet,
                     mel_match=args.mel_match)
    except FluxMusicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    if args.json:
        from fluxmusic.checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
