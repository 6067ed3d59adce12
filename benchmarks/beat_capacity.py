"""Can the transformer keep a beat at all? Overfit it on a few training clips and listen-free check their beats.

Fine-tunes a plain transformer (default: the recipe run's ``parts/transformer``) on the first ``--clips`` training
items of the embedding cache, constant lr, for ``--minutes``; then generates those clips' own captions with the
starting and the overfit transformer (each inside a copy of ``--model`` with its transformer swapped) and prints
the median rhythm clarity of both next to the real clips'. If the overfit model plays beats where the general
one does not, the architecture and latents can carry a beat and the general model is short of training::

    python benchmarks/beat_capacity.py --cache RUN/cache --manifest RUN/corpus/manifest.jsonl \\
        --transformer RUN/parts/transformer --clips 32 --minutes 25 --work /tmp/beat \\
        --json docs/quality/beat_capacity.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from fluxmusic.config import FluxMusicConfig
from fluxmusic.evaluation.evaluate import generate
from fluxmusic.evaluation.signal_features import rhythm_clarity
from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir
from fluxmusic.training.loop import train
from fluxmusic.training.recipe import RECIPES
from fluxmusic.training.transformer_task import TransformerTask, cache_splits
from fluxmusic.transformer_io import load_transformer


class OverfitTask(TransformerTask):
    """The plain transformer task, started from trained weights instead of a fresh init."""

    def __init__(self, base: Path, *args, **kwargs) -> None:
        super().__init__(FluxMusicConfig.load(base / "config.json"), *args, **kwargs)
        self.base = base

    def build_model(self) -> torch.nn.Module:
        return load_transformer(self.base).train()


def with_transformer(model: Path, transformer: Path, out: Path) -> Path:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model, out)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(transformer / name, out / "transformer" / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, type=Path, help="the recipe's embedding cache")
    ap.add_argument("--manifest", required=True, type=Path, help="its corpus manifest (the real clips)")
    ap.add_argument("--transformer", required=True, type=Path, help="a plain (no context input) transformer")
    ap.add_argument("--model", type=Path, default=default_model_dir(), help="model directory for the rest")
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/beat_capacity"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_ds, _ = cache_splits(args.cache)
    few = train_ds.subset(list(range(args.clips)))
    task = OverfitTask(args.transformer, few, train_ds.null_txt, train_ds.null_y, val=few)
    stage = dataclasses.replace(RECIPES["default"].transformer_stage, steps=1_000_000, lr=3e-4, warmup_steps=20,
                                schedule="constant", ema_decay=0.99)
    shutil.rmtree(args.work / "run", ignore_errors=True)
    result = train(task, stage.train_config(1.0, 0, 100), args.work / "run", export_dir=args.work / "run" / "export",
                   stream=sys.stderr, time_limit_s=60.0 * args.minutes)

    # Cache order is the manifest's training rows in order (precompute writes train, then val).
    rows = [json.loads(line) for line in args.manifest.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] != "val"][: args.clips]
    captions = [r["caption"] for r in rows]
    real = [rhythm_clarity(sf.read(args.manifest.parent / r["path"], dtype="float32")[0]) for r in rows]
    out = {"clips": args.clips, "steps": result.step, "minutes": args.minutes,
           "real_clarity_median": float(np.nanmedian(real))}
    for name, tr in (("starting", args.transformer), ("overfit", args.work / "run" / "export")):
        pipe = FluxMusicPipeline.from_pretrained(with_transformer(args.model, tr, args.work / name))
        d = pipe.defaults
        waves = generate(pipe, captions, 0, d["steps"], d["solver"], d.get("shift"), d["guidance"], 4, name, False)
        out[f"{name}_clarity_median"] = float(np.nanmedian([rhythm_clarity(w) for w in waves]))
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
