"""``fluxmusic data ...``: corpus tools (``data render``: real scores played by FluidSynth; ``data synth``: the
procedural music corpus)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="datasets: render real scores or make a synthetic music corpus")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    s = data_sub.add_parser("synth", help="render a procedural music corpus with captions and a manifest")
    s.add_argument("--out", required=True, help="output directory (clips/ and manifest.jsonl)")
    s.add_argument("--hours", type=float, required=True, help="hours of audio to make")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--clip-seconds", type=float, default=10.24)
    s.add_argument("--format", default="wav", help="wav or flac (16-bit)")
    s.add_argument("--workers", type=int, default=1, help="processes; the output does not depend on it")
    s.set_defaults(func=_synth)
    r = data_sub.add_parser("render", help="render music21's bundled scores with FluidSynth (a GM SoundFont) into "
                            "captioned 10.24 s clips and a manifest; held-out works are split by work")
    r.add_argument("--out", required=True, help="output directory (clips/, manifest.jsonl, render_summary.json)")
    r.add_argument("--works", type=int, default=1200, help="corpus files to render, in a seeded order (default 1200)")
    r.add_argument("--collections", default=None,
                   help="comma-separated music21 collections (e.g. bach,palestrina,ryansMammoth; default: all)")
    r.add_argument("--clips-per-work", type=int, default=2, help="non-overlapping clips cut from each work")
    r.add_argument("--renderings", type=int, default=1,
                   help="renderings per work, each with its own instrument, tempo and transposition (augmentation)")
    r.add_argument("--val-fraction", type=float, default=0.05, help="fraction of WORKS held out (split by work)")
    r.add_argument("--soundfont", default=None, help="GM SoundFont .sf2 (default: the system's FluidR3_GM)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--workers", type=int, default=1, help="processes; the output does not depend on it")
    r.set_defaults(func=_render)


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


def _render(args: argparse.Namespace) -> int:
    from fluxmusic.data.render import render_corpus
    from fluxmusic.errors import FluxMusicError

    if args.workers < 1:
        raise FluxMusicError(f"--workers must be >= 1, got {args.workers}")
    collections = tuple(c.strip() for c in args.collections.split(",") if c.strip()) if args.collections else None
    manifest = render_corpus(args.out, max_works=args.works, collections=collections, renderings=args.renderings,
                             clips_per_work=args.clips_per_work, seed=args.seed, val_fraction=args.val_fraction,
                             soundfont=args.soundfont, workers=args.workers)
    n = sum(1 for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip())
    print(f"wrote {n} clips and {manifest}")
    return 0
