"""Music from held-out images and stories (issue 18): retrieval, attribute accuracy and CLAP score.

For the rendered corpus's held-out clips (manifest split ``val``, split by work), with a model directory that has
the adapters (default: the bundled model):

1. **retrieval**: the adapter's pooled vector, mapped into CLAP's joint space by the CLAP text projection, picks
   the paired clip's CLAP audio embedding among all N held-out clips (top-1 / top-5; chance 1/N, 5/N), for
   images, stories, shuffled images and, for reference, the clip's own caption through the text encoder;
2. **generation**: music from the image, the story, the attribute caption (text), and a shuffled image (another
   clip's), same seeds; attribute accuracy (tempo, register: signal estimators; instrument family: zero-shot CLAP)
   against the clip's attributes, and the CLAP score of the audio against the attribute caption.

    python benchmarks/image_story_eval.py --clips 24 --out runs/image_story_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fluxmusic.adapters import decode_image
from fluxmusic.data.manifest import load_manifest
from fluxmusic.data.media import make_story, pair_seed, render_image
from fluxmusic.evaluation.attributes import RENDER
from fluxmusic.evaluation.embedders import model_dir_embedder
from fluxmusic.evaluation.evaluate import attribute_accuracy, score_audio, vocabulary_prototypes
from fluxmusic.evaluation.generation import decode_full
from fluxmusic.evaluation.metrics import cosine_rows, derangement
from fluxmusic.flow import Conditioning
from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir

ATTRS = ("instrument", "tempo", "register", "mode", "dynamics")
CONDITIONS = ("text", "image", "story", "shuffled")
LABELS = {"text": "text (attribute caption)", "image": "image", "story": "story", "shuffled": "shuffled image"}


def attribute_caption(row: dict) -> str:
    """The clip's attributes as one caption in the corpus vocabulary (the text condition of the comparison)."""
    inst = RENDER.vocabularies["instrument"][row["instrument"]][0]
    return f"{row['tempo']} {row['mode']} {row['dynamics']} music played on {inst} in the {row['register']} register"


def retrieval(query: np.ndarray, keys: np.ndarray) -> dict[str, float]:
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    sim = q @ k.T
    rank = (sim > np.diag(sim)[:, None]).sum(1)
    return {"top1": float((rank == 0).mean()), "top5": float((rank < 5).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory with adapters (default: the bundled one)")
    p.add_argument("--manifest", default="/work/run/corpus/manifest.jsonl")
    p.add_argument("--clips", type=int, default=24, help="held-out clips to generate from (retrieval uses all)")
    p.add_argument("--seed", type=int, default=0, help="the adapter data seed (images, stories)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON results (updated in place: runs of other --parts are kept)")
    p.add_argument("--parts", nargs="+", default=["retrieval", *CONDITIONS],
                   choices=["retrieval", *CONDITIONS], help="what to measure (default: everything)")
    args = p.parse_args(argv)

    model_dir = Path(args.model) if args.model else default_model_dir()
    pipe = FluxMusicPipeline.from_pretrained(model_dir)
    entries = load_manifest(args.manifest)
    rows = [{**e.attributes, "caption": e.caption, "path": e.path} for e in entries]
    val = [k for k, r in enumerate(rows) if r.get("split") == "val"]
    images = {k: render_image(rows[k], pair_seed(args.seed, k, 0)) for k in val}
    stories = {k: make_story(rows[k], pair_seed(args.seed, k, 1000)) for k in val}
    embedder = model_dir_embedder(model_dir)
    sr = pipe.sample_rate

    # ---- retrieval over all held-out clips, in CLAP's joint space
    from fluxmusic.audio import read_audio

    waves_ref = [read_audio(rows[k]["path"], sr)[: int(10.24 * sr)] for k in val]
    audio_emb = embedder.embed_audio(waves_ref, sr)
    proj = embedder.model.text_projection

    def joint(y: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return proj(y).numpy().astype(np.float64)

    results: dict = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).is_file() else {}
    if "retrieval" in args.parts:
        enc = pipe.media_encoder()
        img_y = torch.cat([enc.encode_image(images[k]).y for k in val])
        story_y = torch.cat([enc.encode_story(stories[k], pipe.encoders).y for k in val])
        cap_y = pipe.encode_text([rows[k]["caption"] for k in val]).y
        shuffle = derangement(len(val), 1)
        results.update({"clips_retrieval": len(val), "chance_top1": 1 / len(val), "chance_top5": 5 / len(val)})
        results["retrieval"] = {
            "image": retrieval(joint(img_y), audio_emb), "story": retrieval(joint(story_y), audio_emb),
            "shuffled image": retrieval(joint(img_y[shuffle]), audio_emb),
            "caption (text encoder)": retrieval(joint(cap_y), audio_emb),
        }
        print(json.dumps(results["retrieval"], indent=1), file=sys.stderr)

    # ---- generation from a subset (every k-th held-out clip, so many works are covered)
    pick = [val[i] for i in np.linspace(0, len(val) - 1, args.clips).round().astype(int)]
    n = len(pick)
    seeds = list(range(n))
    captions = [attribute_caption(rows[k]) for k in pick]
    conds = {}
    if "text" in args.parts:
        conds["text"] = [pipe.conditioning([c]) for c in captions]
    if {"image", "story", "shuffled"} & set(args.parts):
        enc = pipe.media_encoder()
        image_conds = [enc.encode_image(images[k]) for k in pick]
        if "image" in args.parts:
            conds["image"] = image_conds
        if "story" in args.parts:
            conds["story"] = [enc.encode_story(stories[k], pipe.encoders) for k in pick]
        if "shuffled" in args.parts:
            conds["shuffled"] = [image_conds[j] for j in derangement(n, 2)]
    stated = [{a: rows[k][a] for a in ATTRS} for k in pick]
    protos = vocabulary_prototypes(embedder, RENDER)
    caption_emb = embedder.embed_text(captions)
    instruments = list(RENDER.vocabularies["instrument"])
    steps = args.steps or pipe.defaults.get("steps", 16)
    req = pipe.request(["x"] * n, seed=seeds, steps=steps)
    uncond = pipe.conditioning([""] * n)
    gen = results.setdefault("generation", {})
    gen.update({"clips": n, "steps": steps, "solver": req.settings.solver})
    if "text" in args.parts:
        ref = score_audio([waves_ref[val.index(k)] for k in pick], sr, embedder, protos, "reference", False, RENDER)
        gen["real clips (estimator ceiling)"] = {**attribute_accuracy(ref, stated, instruments),
                                                 "clap_score": float(cosine_rows(caption_emb, ref.emb).mean())}
    for key, cs in conds.items():
        name = LABELS[key]
        t0 = time.perf_counter()
        cond = Conditioning(torch.cat([c.txt for c in cs]), torch.cat([c.y for c in cs]))
        lat, _ = pipe.sample_latents(req, cond, uncond)
        waves = decode_full(pipe, lat)
        s = score_audio(waves, sr, embedder, protos, name, False, RENDER)
        acc = attribute_accuracy(s, stated, instruments)
        gen[name] = {**acc, "clap_score": float(cosine_rows(caption_emb, s.emb).mean()),
                     "seconds": time.perf_counter() - t0}
        print(name, json.dumps(gen[name]), file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        if key == "image":
            _save_examples(waves[:2], sr, [images[k] for k in pick[:2]], args.out)
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def _save_examples(waves: list[np.ndarray], sr: int, images: list[np.ndarray], out: str | None) -> None:
    """A look at what was made: the image beside the mel spectrogram of its music (PNG next to --out)."""
    if not out:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fluxmusic.audio import MelConfig, log_mel

    fig, axes = plt.subplots(len(waves), 2, figsize=(10, 2.4 * len(waves)), gridspec_kw={"width_ratios": [1, 4]})
    for i, (w, img) in enumerate(zip(waves, images)):
        axes[i, 0].imshow(decode_image(img))
        axes[i, 0].axis("off")
        mel = log_mel(torch.from_numpy(w)[None], MelConfig(sample_rate=sr))[0].numpy()
        axes[i, 1].imshow(mel.T, origin="lower", aspect="auto")
        axes[i, 1].set_title("music from the image")
    fig.tight_layout()
    fig.savefig(Path(out).with_suffix(".png"))


if __name__ == "__main__":
    raise SystemExit(main())
