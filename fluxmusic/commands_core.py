"""``fluxmusic convert``: official checkpoint -> config.json + model.safetensors."""

from __future__ import annotations

import argparse

from fluxmusic.config import CONFIGS, get_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official .pt checkpoint to config.json + model.safetensors")
    p.add_argument("checkpoint", help="official musicflow_*.pt, a state-dict .pt, or .safetensors")
    p.add_argument("out_dir")
    p.add_argument("--config", required=True, help=f"named config: {', '.join(CONFIGS)}")
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> int:
    from fluxmusic.transformer_io import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out_dir, get_config(args.config))
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0
