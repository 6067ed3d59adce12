"""The same prompt and seed through each model directory: log-mel (top) and a 0-2 kHz linear spectrogram with 4 Hz
bins (bottom), where a hop-rate (100 Hz) comb shows as horizontal lines across the whole clip.

    python benchmarks/plot_comb.py docs/comb_before_after.png OLD_MODEL_DIR fluxmusic/default_model \
        --names "previous vocoder" "bundled vocoder (integrated phase + dither)"
"""
import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.signal import stft

from fluxmusic.audio import log_mel
from fluxmusic.evaluation.signal_features import comb_figure
from fluxmusic.pipeline import FluxMusicPipeline

torch.set_num_threads(1)

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("out")
ap.add_argument("models", nargs="+")
ap.add_argument("--names", nargs="+", help="a title per model (default: the folder names)")
args = ap.parse_args()
out, dirs = args.out, args.models
names = args.names or [d.rstrip("/").split("/")[-1] for d in dirs]
prompt = "Solo flute in the high register, slow and soft, a Baroque sonata movement in G major"
fig, axes = plt.subplots(2, len(dirs), figsize=(6 * len(dirs), 6))
axes = np.asarray(axes).reshape(2, len(dirs))
for j, d in enumerate(dirs):
    w = FluxMusicPipeline.from_pretrained(d)(prompt, seed=3).audio[0]
    m = log_mel(torch.from_numpy(w)[None])[0].T.numpy()
    axes[0, j].imshow(m, origin="lower", aspect="auto", vmin=-11.5, vmax=max(m.max(), -4))
    axes[0, j].set_title(f"{names[j]}: comb figure {comb_figure(w, 16000):.1f} (real music 1.6-3.8)", fontsize=9)
    f, t, z = stft(w, 16000, nperseg=4096, noverlap=3072)
    keep = f <= 2000
    axes[1, j].imshow(20 * np.log10(np.abs(z[keep]) + 1e-6), origin="lower", aspect="auto",
                      extent=[t[0], t[-1], 0, 2000], vmin=-100, vmax=-20)
    axes[1, j].set_ylabel("Hz")
fig.tight_layout()
fig.savefig(out, dpi=70)
