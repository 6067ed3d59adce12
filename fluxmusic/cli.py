"""The ``fluxmusic`` command: each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from fluxmusic.errors import FluxMusicError
from fluxmusic.threads import choose_wait_policy, configure_threads

# Before any subcommand imports torch: OpenMP reads its wait policy when the library loads.
choose_wait_policy()

#: Modules that define ``register(subparsers)``; each adds one subcommand (or a group of them).
COMMAND_MODULES = (
    "fluxmusic.commands_core",
    "fluxmusic.data.commands",
    "fluxmusic.commands_generate",
    "fluxmusic.export.commands",
    "fluxmusic.runtime.bench",
    "fluxmusic.training.commands",
    "fluxmusic.runtime.serving_commands",
    "fluxmusic.evaluation.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxmusic", description="FluxMusic text-to-music runtime")
    parser.add_argument(
        "--allow-external-links", action="store_true",
        help="load model directories whose symlinks point outside them (refused by default)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "allow_external_links", False):
        import os

        from fluxmusic.modelcheck import ALLOW_LINKS_ENV

        os.environ[ALLOW_LINKS_ENV] = "1"  # read by every model-directory load (fluxmusic.modelcheck)
    try:
        # Commands with a torch --threads option (fluxmusic.threads.add_threads_argument) pass it; every other
        # command gets the automatic count (available cores minus load, or OMP_NUM_THREADS).
        configure_threads(args.threads if getattr(args, "torch_threads_option", False) else None)
        return int(args.func(args) or 0)
    except FluxMusicError as e:
        print(f"fluxmusic {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
