"""The comb figure of one prompt over many seeds, with the default op set and with the op-by-op reference QK norm
+ RoPE in its place, in one process: how far the figure moves under a 1-ulp numerical change, against how far it
moves from seed to seed (docs/quality.md, "The comb figure's last clip is at the noise edge").

    OMP_NUM_THREADS=2 python benchmarks/comb_seeds.py --seeds 12 \\
        --prompt "A Bach chorale arranged for harpsichord; medium, 4/4, major key, mid register"
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from fluxmusic import ops
from fluxmusic.evaluation.signal_features import comb_figure
from fluxmusic.pipeline import FluxMusicPipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--model", help="model directory (default: the bundled default)")
    ap.add_argument("--limit", type=float, default=3.84, help="the real clips' largest comb figure")
    args = ap.parse_args()
    pipe = FluxMusicPipeline.from_pretrained(args.model)
    transformer = pipe.backend.transformer
    variants = {"default op set": transformer.ops,
                "reference QK norm + RoPE": dataclasses.replace(transformer.ops, qk_rmsnorm_rope=ops.qk_rmsnorm_rope)}
    figures: dict[str, list[float]] = {k: [] for k in variants}
    for seed in range(args.seeds):
        for name, opset in variants.items():
            transformer.ops = opset
            figures[name].append(comb_figure(pipe(args.prompt, seed=seed).audio[0], pipe.sample_rate))
    print(f"{args.prompt!r}, seeds 0-{args.seeds - 1}")
    for name, v in figures.items():
        a = np.array(v)
        print(f"{name}: mean {a.mean():.2f}, max {a.max():.2f}, above {args.limit}: {(a > args.limit).sum()}/{len(a)}; "
              f"{np.round(a, 2).tolist()}")


if __name__ == "__main__":
    main()
