"""Does the model follow the text? Listen-free evidence from prompt pairs that differ in one attribute.

For each pair (slow vs fast, mid vs high register, organ vs harp, choir vs mallets, soft vs loud) it generates the
same seeds for both prompts and measures an attribute of the audio: onset rate, spectral centroid, RMS level and
the CLAP score difference between the two prompts. The same measurement on held-out corpus clips (``--corpus``, a
rendered corpus manifest: real scores played by FluidSynth) with the same attributes shows what direction and size
to expect. ``--plot`` saves generated log-mel spectrograms next to held-out corpus clips with the same attributes.

    python benchmarks/attribute_probe.py --corpus /work/run/corpus/manifest.jsonl --seeds 4 \
        --json docs/attribute_probe.json --plot docs/mels.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fluxmusic.evaluation.embedders import ClapEmbedder, model_dir_embedder
from fluxmusic.evaluation.signal_features import onset_rate, spectral_centroid
from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir

#: (attribute, metric, (prompt A, corpus attributes A), (prompt B, corpus attributes B)); B should measure higher.
PAIRS = [
    ("tempo", "onset_rate", ("A slow piano piece, calm and slow", {"tempo": "slow"}),
     ("A fast piano piece, lively and fast", {"tempo": "fast"})),
    ("register", "centroid", ("A flute tune in the mid register", {"register": "mid"}),
     ("A flute tune in the high register", {"register": "high"})),
    ("instrument", "clap_b_minus_a", ("A Bach chorale on church organ", {"instrument": "organ"}),
     ("An Irish folk tune on harp", {"instrument": "harp"})),
    ("instrument", "centroid", ("A slow choir piece, renaissance mass", {"instrument": "choir"}),
     ("A lively tune on marimba", {"instrument": "mallets"})),
    ("dynamics", "rms", ("A soft, quiet piano piece", {"dynamics": "soft"}),
     ("A loud, bold piano piece", {"dynamics": "loud"})),
]
#: Prompts and corpus attributes of the mel plot (generated | held-out corpus clip with those attributes).
PLOT = [
    ("A slow Bach chorale on church organ", {"instrument": "organ", "collection": "bach"}),
    ("A fast Irish folk tune on solo violin", {"instrument": "violin", "tempo": "fast"}),
    ("A gentle renaissance mass for choir", {"instrument": "choir"}),
    ("A lively jig on the harp", {"instrument": "harp"}),
    ("A calm piano piece at a slow tempo", {"instrument": "piano", "tempo": "slow"}),
]


def measure(metric: str, waves: list[np.ndarray], scorer: ClapEmbedder, sr: int, texts: tuple[str, str]) -> list[float]:
    """The pair's metric per clip; ``clap_b_minus_a``: CLAP cosine to prompt B minus cosine to prompt A."""
    if metric == "onset_rate":
        return [onset_rate(w, sr) for w in waves]
    if metric == "centroid":
        return [spectral_centroid(w, sr) for w in waves]
    if metric == "rms":
        return [float(np.sqrt(np.mean(np.square(w, dtype=np.float64)))) for w in waves]
    s = scorer.embed_audio(waves, sr) @ scorer.embed_text(list(texts)).T  # cosine similarities
    return (s[:, 1] - s[:, 0]).tolist()


class Corpus:
    """Held-out clips of a rendered corpus manifest, looked up by attributes."""

    def __init__(self, manifest: str | Path, split: str = "val") -> None:
        from fluxmusic.data.manifest import load_manifest

        self.entries = [e for e in load_manifest(manifest) if e.attributes.get("split") == split]

    def waves(self, attrs: dict, n: int) -> list[np.ndarray]:
        from fluxmusic.audio import read_audio

        hits = [e for e in self.entries if all(e.attributes.get(k) == v for k, v in attrs.items())]
        if not hits:
            hits = [e for e in self.entries if all(e.attributes.get(k) == v for k, v in list(attrs.items())[:1])]
        return [read_audio(e.path, 16000)[: int(10.24 * 16000)] for e in hits[:n]]


def probe(pipe: FluxMusicPipeline, scorer: ClapEmbedder, seeds: list[int], gen_kw: dict, corpus: Corpus) -> list[dict]:
    rows = []
    for attribute, metric, (pa, aa), (pb, ab) in PAIRS:
        row = {"attribute": attribute, "metric": metric, "prompt_a": pa, "prompt_b": pb}
        per_seed = {}
        for key, prompt in (("a", pa), ("b", pb)):
            out = pipe([prompt] * len(seeds), seed=list(seeds), **gen_kw)
            per_seed[key] = measure(metric, out.audio, scorer, out.sample_rate, (pa, pb))
            row[f"generated_{key}"] = float(np.mean(per_seed[key]))
        # Paired by seed (same noise for both prompts): how often B measures higher than A.
        row["seeds_b_higher"] = int(sum(b > a for a, b in zip(per_seed["a"], per_seed["b"])))
        for key, attrs in (("a", aa), ("b", ab)):
            real = corpus.waves(attrs, max(len(seeds), 8))
            row[f"corpus_{key}"] = float(np.mean(measure(metric, real, scorer, 16000, (pa, pb))))
        row["follows"] = row["generated_b"] > row["generated_a"]
        rows.append(row)
        print(f"{attribute:<10} {metric:<22} generated {row['generated_a']:8.3f} -> {row['generated_b']:8.3f}   "
              f"corpus {row['corpus_a']:8.3f} -> {row['corpus_b']:8.3f}   "
              f"B higher for {row['seeds_b_higher']}/{len(seeds)} seeds   {'OK' if row['follows'] else 'WRONG'}",
              flush=True)
    return rows


def plot_mels(pipe: FluxMusicPipeline, path: Path, gen_kw: dict, corpus: Corpus, seed: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fluxmusic.audio import log_mel

    fig, axes = plt.subplots(len(PLOT), 2, figsize=(12, 2.4 * len(PLOT)), squeeze=False)
    for r, (prompt, attrs) in enumerate(PLOT):
        gen = pipe(prompt, seed=seed, **gen_kw).audio[0]
        real = corpus.waves(attrs, 1)[0]
        pair = ((gen, f"generated: {prompt}"), (real, "held-out corpus clip, same attributes"))
        for c, (wave, title) in enumerate(pair):
            mel = log_mel(torch.from_numpy(np.asarray(wave, np.float32)))[0].numpy().T
            axes[r][c].imshow(mel, origin="lower", aspect="auto", vmin=-11.5, vmax=2, cmap="magma")
            axes[r][c].set_title(title, fontsize=8)
            axes[r][c].set_xlabel("frame (10 ms)", fontsize=7)
            axes[r][c].set_ylabel("mel bin", fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--corpus", required=True, help="a rendered corpus manifest (fluxmusic data render)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (the same for both prompts of a pair)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="save generated vs real log-mels to this PNG")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = FluxMusicPipeline.from_pretrained(args.model)
    scorer = model_dir_embedder(args.model)  # the model's own small CLAP (audio tower kept by the recipe)
    gen_kw = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None}
    corpus = Corpus(args.corpus)
    rows = probe(pipe, scorer, list(range(args.seeds)), gen_kw, corpus)
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "settings": gen_kw or pipe.defaults,
                                               "pairs": rows}, indent=2) + "\n")
    if args.plot:
        plot_mels(pipe, Path(args.plot), gen_kw, corpus)
        print(f"wrote {args.plot}")
    print(f"{sum(r['follows'] for r in rows)}/{len(rows)} pairs move the way the prompt says "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
