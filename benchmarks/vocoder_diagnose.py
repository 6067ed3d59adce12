"""Where a Vocos vocoder's resynthesis error comes from: its predicted STFT magnitude or its phases / the
overlap-add of inconsistent frames.

On held-out real clips (the same selection as ``vocoder_resynthesis.py``), log-mel L1 to the real clip's log-mel
of: the vocoder's audio; its magnitudes with the real clip's phases (its own n_fft STFT, the frames it predicts);
the real magnitudes with its phases; its audio after k Griffin-Lim rounds in its own STFT (magnitude kept, phase
re-estimated, started from its phases). And in its own n_fft frames (log of a mel filterbank on that grid): its
predicted magnitudes vs the real clip's, and the STFT of its audio vs the real clip's and vs its prediction.

    python benchmarks/vocoder_diagnose.py --vocoder fluxmusic/default_model/vocoder \\
        --manifest corpus/manifest.jsonl --limit 16 --json diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vocoder_resynthesis import mel_config_of, read_clip, select_clips, vocoder_dir  # noqa: E402

from fluxmusic.audio import MelConfig, log_mel, mel_filterbank  # noqa: E402
from fluxmusic.components import load_vocoder  # noqa: E402

GL_ROUNDS = (1, 4, 16)


def diagnose(voc, wave: np.ndarray, cfg: MelConfig) -> dict:
    n_fft, hop = voc.config.n_fft, voc.config.hop_length
    window = torch.hann_window(n_fft)
    fb = torch.from_numpy(mel_filterbank(MelConfig(sample_rate=cfg.sample_rate, n_fft=n_fft, win_length=n_fft,
                                                   hop_length=hop, n_mels=cfg.n_mels)))
    wt = torch.from_numpy(wave)
    ref = log_mel(wt, cfg)[0]

    def stft(x: torch.Tensor, frames: int) -> torch.Tensor:  # the vocoder's framing: frame t centred on t * hop
        return torch.stft(x, n_fft, hop, n_fft, window, center=True, return_complex=True)[:, :frames]

    def istft(mag: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        return voc.istft((mag * torch.cos(phase))[None], (mag * torch.sin(phase))[None])[0]

    def l1(y: torch.Tensor) -> float:
        m = log_mel(y, cfg)[0]
        n = min(len(m), len(ref))
        return float((m[:n] - ref[:n]).abs().mean())

    def own_mel(mag: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.clamp(fb @ mag, min=cfg.clamp_min))

    with torch.no_grad():
        mag, phase = (t[0] for t in voc.spectrum(ref[None]))
        frames = mag.shape[-1]
        real = stft(wt, frames)
        audio = istft(mag, phase)
        out = {"audio": l1(audio), "predicted_magnitude_real_phase": l1(istft(mag, real.angle())),
               "real_magnitude_predicted_phase": l1(istft(real.abs(), phase))}
        real_own, audio_own = own_mel(real.abs()), own_mel(stft(audio, frames).abs())
        out["own_frames_predicted_vs_real"] = float((own_mel(mag) - real_own).abs().mean())
        out["own_frames_audio_vs_real"] = float((audio_own - real_own).abs().mean())
        out["own_frames_audio_vs_predicted"] = float((audio_own - own_mel(mag)).abs().mean())
        z = mag * torch.exp(1j * phase)
        for k in range(1, max(GL_ROUNDS) + 1):
            y = voc.istft(z.real[None], z.imag[None])[0]
            z = mag * torch.exp(1j * stft(y, frames).angle())
            if k in GL_ROUNDS:
                out[f"griffin_lim_{k}_from_predicted_phase"] = l1(voc.istft(z.real[None], z.imag[None])[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocoder", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    vdir = vocoder_dir(args.vocoder)
    voc = load_vocoder(vdir).eval()
    if voc.config.model_type != "fluxmusic_vocos":
        print(f"error: --vocoder {vdir}: model_type {voc.config.model_type!r}; allowed: 'fluxmusic_vocos'",
              file=sys.stderr)
        return 2
    cfg = mel_config_of(voc)
    rows = []
    for e in select_clips(args.manifest, args.split, args.limit):
        rows.append({"path": str(e.path), **diagnose(voc, read_clip(e, cfg, 10.24), cfg)})
        print(Path(e.path).name, {k: round(v, 3) for k, v in rows[-1].items() if k != "path"}, file=sys.stderr)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "path"}
    print("| measure (log-mel L1) | mean |\n|---|---|")
    for k, v in mean.items():
        print(f"| {k} | {v:.3f} |")
    if args.json:
        from fluxmusic.checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps({"vocoder": str(vdir), "clips": len(rows), "mean": mean,
                                                 "per_clip": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
