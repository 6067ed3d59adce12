"""``fluxmusic data ...``: corpus tools (``data synth``: the procedural music corpus)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="datasets: make a synthetic music corpus")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = data_sub.add_parser("synth", help="render a procedural music corpus with captions and a manifest")
    s.add_argument("--out", required=True, help="output directory (clips/ and manifest.jsonl)")
    s.add_argument("--hours", type=float, required=True, help="hours of audio to make")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--clip-seconds", type=float, default=10.24)
    s.add_argument("--format", default="wav", help="wav or flac (16-bit)")
    s.add_argument("--workers", type=int, default=1, help="processes; the output does not depend on it")
    s.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from fluxmusic.data.synth import make_corpus
    from fluxmusic.errors import FluxMusicError

    if args.workers < 1:
        raise FluxMusicError(f"--workers must be >= 1, got {args.workers}")
    manifest = make_corpus(args.out, args.hours, seed=args.seed, clip_seconds=args.clip_seconds,
                           fmt=args.format, workers=args.workers)
    n = sum(1 for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip())
    print(f"wrote {n} clips and {manifest}")
    return 0
