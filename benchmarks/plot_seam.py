"""Log-mel of a continued clip next to the original, with the seam marked (docs/continuation_mel.png).

    python benchmarks/plot_seam.py original.wav continued.wav --seam 6 -o docs/continuation_mel.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from fluxmusic.audio import log_mel, read_audio  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("audio", nargs="+", help="WAV files, one panel each (first: the original)")
    ap.add_argument("--seam", type=float, nargs="+", default=[6.0])
    ap.add_argument("--titles", nargs="+")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    fig, axes = plt.subplots(len(args.audio), 1, figsize=(10, 2.4 * len(args.audio)), squeeze=False)
    for i, path in enumerate(args.audio):
        mel = log_mel(torch.from_numpy(read_audio(path, 16000)))[0].numpy().T
        ax = axes[i][0]
        ax.imshow(mel, origin="lower", aspect="auto", extent=(0, mel.shape[1] / 100, 0, mel.shape[0]), cmap="magma",
                  vmin=-11.5, vmax=mel.max())
        for s in args.seam:
            ax.axvline(s, color="cyan", lw=1, ls="--")
        ax.set_title(args.titles[i] if args.titles and i < len(args.titles) else path, fontsize=9)
        ax.set_ylabel("mel bin")
    axes[-1][0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(args.output, dpi=60)


if __name__ == "__main__":
    main()
