"""Regenerate the committed protobuf/gRPC Python code from ``proto/fluxmusic/v1/fluxmusic.proto``.

``python -m fluxmusic.runtime.codegen`` rewrites the files in place; ``tests/test_serving.py`` regenerates
into a temporary directory and checks the committed files are identical.

protoc names the generated module after the proto's path (``fluxmusic/v1/fluxmusic.proto`` ->
``fluxmusic.v1.fluxmusic_pb2``), which is also the file name registered in the descriptor pool and shown
by server reflection, so we keep that path. But inside our distribution the module lives at
``fluxmusic.runtime.proto.fluxmusic.v1``, and ``fluxmusic.v1`` would resolve into our core package, so the
one absolute import protoc writes into ``*_pb2_grpc.py`` is rewritten to the real package path.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from fluxmusic.tempfiles import publish

PROTO_ROOT = Path(__file__).resolve().parent / "proto"
PROTO_FILE = "fluxmusic/v1/fluxmusic.proto"
PACKAGE = "fluxmusic.runtime.proto"
GENERATED = ("fluxmusic/v1/fluxmusic_pb2.py", "fluxmusic/v1/fluxmusic_pb2_grpc.py")


def generate(out_dir: str | Path) -> list[Path]:
    """Run grpcio-tools' bundled protoc into ``out_dir``; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
    grpc_file = out_dir / GENERATED[1]
    text = grpc_file.read_text()
    text = text.replace("from fluxmusic.v1 import", f"from {PACKAGE}.fluxmusic.v1 import")
    grpc_file.write_text(text)
    return [out_dir / g for g in GENERATED]


def regenerate_in_place() -> list[Path]:
    """Generate into a temporary directory, then atomically replace the committed files."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in generate(tmp):
            dst = PROTO_ROOT / src.relative_to(tmp)
            fd, part = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(src.read_bytes())
            publish(part)
            os.replace(part, dst)
            written.append(dst)
    return written


if __name__ == "__main__":
    for p in regenerate_in_place():
        print(f"wrote {p}", file=sys.stderr)
