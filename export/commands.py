"""``fluxmusic export``: a command group; each deployment format adds its sub-commands through a module.

To add one (``export tensorrt``, ``export triton``), write a module with ``register(export_subparsers)`` and
add its name to :data:`SUBCOMMAND_MODULES`. Each listed module must exist.
"""

from __future__ import annotations

import argparse
import importlib

#: Modules that define ``register(export_subparsers)``, each adding one or more ``export`` sub-commands.
SUBCOMMAND_MODULES = (
    "fluxmusic.export.onnx_commands",
    "fluxmusic.export.tensorrt_commands",
    "fluxmusic.export.triton_commands",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export engines (ONNX, ...) and check their parity with PyTorch")
    export_sub = p.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(export_sub)
