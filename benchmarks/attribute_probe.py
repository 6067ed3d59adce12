"""Does the model follow the text? Listen-free evidence from prompt pairs that differ in one attribute.

For each pair (slow vs fast without and with drums, low vs high register, synth pad vs plucked string) it
generates the same seeds for both prompts and measures an attribute of the audio: onset rate, spectral
centroid, and the small CLAP score difference between the two prompts. The same measurement on real corpus
clips rendered with the same attribute change (``synth_clip``) shows what direction and size to expect.
``--plot`` saves generated log-mel spectrograms next to real corpus clips.

With ``--manifest`` (a rendered corpus, ``fluxmusic/data/render.py``) the pairs and plot prompts are in the
rendered corpus's words (instrument families, tempo words, register) and the real side is that corpus's clips
with the same attributes (validation split first), measured the same way; note density is a fourth metric.

    python benchmarks/attribute_probe.py --seeds 4 --json docs/attribute_probe.json --plot docs/mels.png
    python benchmarks/attribute_probe.py --manifest RUN/corpus/manifest.jsonl --seeds 4 \
        --json docs/attribute_probe_render.json --plot docs/mels_render.png
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

from fluxmusic.data.synth import synth_clip
from fluxmusic.errors import FluxMusicError
from fluxmusic.evaluation.embedders import ClapEmbedder, model_dir_embedder
from fluxmusic.evaluation.signal_features import note_density, onset_rate, spectral_centroid
from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir

#: (attribute, metric, (prompt A, corpus attributes A), (prompt B, corpus attributes B)); B should measure higher.
PAIRS = [
    ("tempo", "onset_rate", ("A slow piano melody without drums", {"tempo": "slow", "instrument": "piano"}),
     ("A fast piano melody without drums", {"tempo": "fast", "instrument": "piano"})),
    ("tempo+drums", "onset_rate",
     ("A slow piano melody with drums", {"tempo": "slow", "instrument": "piano", "drums": True}),
     ("A fast piano melody with drums", {"tempo": "fast", "instrument": "piano", "drums": True})),
    ("register", "centroid", ("An organ tune in a low register, no drums", {"register": "low", "instrument": "organ"}),
     ("An organ tune in a high register, no drums", {"register": "high", "instrument": "organ"})),
    ("instrument", "clap_b_minus_a",
     ("A calm synth pad piece without drums", {"instrument": "synth pad"}),
     ("A calm plucked string piece without drums", {"instrument": "plucked string"})),
    ("instrument", "centroid",
     ("A calm synth pad piece without drums", {"instrument": "synth pad"}),
     ("A calm plucked string piece without drums", {"instrument": "plucked string"})),
]
#: The same for the rendered corpus (attributes are its manifest fields).
RENDER_PAIRS = [
    ("tempo", "onset_rate", ("A slow piece on solo piano", {"instrument": "piano", "tempo": "slow"}),
     ("A fast piece on solo piano", {"instrument": "piano", "tempo": "fast"})),
    ("tempo", "note_density", ("A slow Bach chorale on church organ", {"instrument": "organ", "tempo": "slow"}),
     ("A fast Irish folk tune on church organ", {"instrument": "organ", "tempo": "fast"})),
    ("register", "centroid", ("A folk tune on flute in a mid register", {"instrument": "flute", "register": "mid"}),
     ("A folk tune on flute in a high register", {"instrument": "flute", "register": "high"})),
    ("instrument", "clap_b_minus_a", ("A calm piece played on church organ", {"instrument": "organ"}),
     ("A calm piece played on concert harp", {"instrument": "harp"})),
    ("instrument", "centroid", ("A four-part chorale sung by a choir", {"instrument": "choir"}),
     ("A four-part chorale on baroque harpsichord", {"instrument": "harpsichord"})),
]
#: Prompts and corpus attributes of the mel plot (generated | real).
PLOT = [
    ("A fast plucked string melody in a high register with drums",
     {"tempo": "fast", "instrument": "plucked string", "register": "high", "drums": True}),
    ("A slow warm synth pad in a low register without drums",
     {"tempo": "slow", "instrument": "synth pad", "register": "low", "drums": False}),
    ("An upbeat square lead tune with bass and drums",
     {"tempo": "fast", "instrument": "square lead", "bass": True, "drums": True}),
]


RENDER_PLOT = [
    ("A slow Bach chorale on church organ", {"collection": "bach", "instrument": "organ", "tempo": "slow"}),
    ("A fast Irish folk tune played on violin", {"instrument": "violin", "tempo": "fast"}),
    ("An Irish folk tune on acoustic guitar at a moderate tempo", {"instrument": "guitar", "tempo": "medium"}),
    ("A Palestrina mass movement sung by a choir", {"collection": "palestrina", "instrument": "choir"}),
]


class ManifestClips:
    """Real clips of a rendered corpus by attributes: validation-split clips first, then the others."""

    def __init__(self, manifest: str | Path) -> None:
        from fluxmusic.data.manifest import load_manifest

        p = Path(manifest)
        entries = load_manifest(p / "manifest.jsonl" if p.is_dir() else p)
        self.entries = sorted(entries, key=lambda e: e.attributes.get("split") != "val")

    def waves(self, attrs: dict, n: int) -> list[np.ndarray]:
        from fluxmusic.audio import read_audio

        hits = [e for e in self.entries if all(e.attributes.get(k) == v for k, v in attrs.items())][:n]
        if not hits:
            raise FluxMusicError(f"no manifest clip has {attrs}")
        return [read_audio(e.path, 16000)[: int(10.24 * 16000)] for e in hits]


def measure(metric: str, waves: list[np.ndarray], scorer: ClapEmbedder, sr: int, texts: tuple[str, str]) -> list[float]:
    """The pair's metric per clip; ``clap_b_minus_a``: CLAP cosine to prompt B minus cosine to prompt A."""
    if metric == "onset_rate":
        return [onset_rate(w, sr) for w in waves]
    if metric == "centroid":
        return [spectral_centroid(w, sr) for w in waves]
    if metric == "note_density":
        return [note_density(w, sr) for w in waves]
    s = scorer.embed_audio(waves, sr) @ scorer.embed_text(list(texts)).T  # cosine similarities
    return (s[:, 1] - s[:, 0]).tolist()


def corpus_waves(attrs: dict, seeds: list[int]) -> list[np.ndarray]:
    """Real corpus clips with the given attributes (no drums/bass/chords unless asked: the prompts say so)."""
    base = {"drums": False, "bass": False, "chords": False}
    return [synth_clip(10_000 + s, {**base, **attrs})[0] for s in seeds]


def probe(pipe: FluxMusicPipeline, scorer: ClapEmbedder, seeds: list[int], gen_kw: dict,
          clips: ManifestClips | None = None) -> list[dict]:
    rows = []
    for attribute, metric, (pa, aa), (pb, ab) in (RENDER_PAIRS if clips else PAIRS):
        row = {"attribute": attribute, "metric": metric, "prompt_a": pa, "prompt_b": pb}
        per_seed = {}
        for key, prompt in (("a", pa), ("b", pb)):
            out = pipe([prompt] * len(seeds), seed=list(seeds), **gen_kw)
            per_seed[key] = measure(metric, out.audio, scorer, out.sample_rate, (pa, pb))
            row[f"generated_{key}"] = float(np.mean(per_seed[key]))
        # Paired by seed (same noise for both prompts): how often B measures higher than A.
        row["seeds_b_higher"] = int(sum(b > a for a, b in zip(per_seed["a"], per_seed["b"])))
        for key, attrs in (("a", aa), ("b", ab)):
            real = clips.waves(attrs, len(seeds)) if clips else corpus_waves(attrs, seeds)
            row[f"corpus_{key}"] = float(np.mean(measure(metric, real, scorer, 16000, (pa, pb))))
        row["follows"] = row["generated_b"] > row["generated_a"]
        rows.append(row)
        print(f"{attribute:<10} {metric:<22} generated {row['generated_a']:8.3f} -> {row['generated_b']:8.3f}   "
              f"corpus {row['corpus_a']:8.3f} -> {row['corpus_b']:8.3f}   "
              f"B higher for {row['seeds_b_higher']}/{len(seeds)} seeds   {'OK' if row['follows'] else 'WRONG'}",
              flush=True)
    return rows


def plot_mels(pipe: FluxMusicPipeline, path: Path, gen_kw: dict, seed: int = 0,
              clips: ManifestClips | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fluxmusic.audio import log_mel

    plot = RENDER_PLOT if clips else PLOT
    fig, axes = plt.subplots(len(plot), 2, figsize=(12, 2.4 * len(plot)), squeeze=False)
    for r, (prompt, attrs) in enumerate(plot):
        gen = pipe(prompt, seed=seed, **gen_kw).audio[0]
        if clips:
            real = clips.waves(attrs, 1)[0]
        else:
            real = synth_clip(20_000 + r, {"bass": False, "chords": False, "drums": False, **attrs})[0]
        for c, (wave, title) in enumerate(((gen, f"generated: {prompt}"), (real, "real corpus clip, same attributes"))):
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
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (the same for both prompts of a pair)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="save generated vs real log-mels to this PNG")
    p.add_argument("--manifest", default=None, help="a rendered corpus manifest: its words and its real clips")
    args = p.parse_args(argv)
    clips = ManifestClips(args.manifest) if args.manifest else None
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = FluxMusicPipeline.from_pretrained(args.model)
    scorer = model_dir_embedder(args.model)  # the model's own small CLAP (audio tower kept by the recipe)
    gen_kw = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None}
    rows = probe(pipe, scorer, list(range(args.seeds)), gen_kw, clips)
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "settings": gen_kw or pipe.defaults,
                                               "pairs": rows}, indent=2) + "\n")
    if args.plot:
        plot_mels(pipe, Path(args.plot), gen_kw, clips=clips)
        print(f"wrote {args.plot}")
    print(f"{sum(r['follows'] for r in rows)}/{len(rows)} pairs move the way the prompt says "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
