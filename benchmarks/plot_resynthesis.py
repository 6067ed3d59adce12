"""One held-out clip resynthesised from its real log-mel by Griffin-Lim and by each vocoder: log-mel (top), the
absolute log-mel error against the real clip (middle), and a 0-2 kHz linear spectrogram with 4 Hz bins (bottom),
where a hop-rate (100 Hz) comb shows as horizontal lines across the whole clip.

    python benchmarks/plot_resynthesis.py docs/resynthesis_mels.png --manifest RUN/corpus/manifest.jsonl \\
        --clip 15 --vocoders fluxmusic/default_model/vocoder /work/vocC/vocoder --names bundled "mel_match 12"
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.signal import stft

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vocoder_resynthesis import griffin_lim, mel_config_of, read_clip, select_clips, vocoder_dir  # noqa: E402

from fluxmusic.audio import log_mel  # noqa: E402
from fluxmusic.components import load_vocoder  # noqa: E402
from fluxmusic.evaluation.signal_features import comb_figure  # noqa: E402

torch.set_num_threads(1)
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("--manifest", required=True)
ap.add_argument("--split", default="val")
ap.add_argument("--limit", type=int, default=16, help="the benchmark's clip selection (default 16)")
ap.add_argument("--clip", type=int, default=0, help="index into that selection")
ap.add_argument("--vocoders", nargs="+", required=True)
ap.add_argument("--names", nargs="+", help="a title per vocoder (default: the folder names)")
ap.add_argument("--gl-iters", type=int, default=32)
args = ap.parse_args()
names = args.names or [v.rstrip("/").split("/")[-1] for v in args.vocoders]
vocoders = [load_vocoder(vocoder_dir(v)).eval() for v in args.vocoders]
cfg = mel_config_of(vocoders[0])
entry = select_clips(args.manifest, args.split, args.limit)[args.clip]
wave = read_clip(entry, cfg, 10.24)
ref = log_mel(torch.from_numpy(wave), cfg)[0]
outs = {"real clip": wave, f"Griffin-Lim ({args.gl_iters} it.)": griffin_lim(ref, cfg, len(wave), args.gl_iters)}
with torch.no_grad():
    outs.update({n: v(ref[None])[0].numpy() for n, v in zip(names, vocoders)})
fig, axes = plt.subplots(3, len(outs), figsize=(4.5 * len(outs), 8))
for j, (name, w) in enumerate(outs.items()):
    m = log_mel(torch.from_numpy(w), cfg)[0]
    l1 = float((m - ref).abs().mean())
    axes[0, j].imshow(m.T.numpy(), origin="lower", aspect="auto", vmin=-11.5, vmax=max(float(ref.max()), -4))
    axes[0, j].set_title(f"{name}\nlog-mel L1 {l1:.3f}, comb {comb_figure(w, cfg.sample_rate):.2f}", fontsize=9)
    axes[1, j].imshow((m - ref).abs().T.numpy(), origin="lower", aspect="auto", vmin=0, vmax=2, cmap="magma")
    axes[1, j].set_title("|log-mel error| (0-2)", fontsize=8)
    f, t, z = stft(w, cfg.sample_rate, nperseg=4096, noverlap=3072)
    keep = f <= 2000
    axes[2, j].imshow(20 * np.log10(np.abs(z[keep]) + 1e-6), origin="lower", aspect="auto",
                      extent=[t[0], t[-1], 0, 2000], vmin=-100, vmax=-20)
    axes[2, j].set_ylabel("Hz")
fig.suptitle(f"{Path(entry.path).name} (held out): {entry.caption}", fontsize=9)
fig.tight_layout()
fig.savefig(args.out, dpi=70)
print(args.out)
