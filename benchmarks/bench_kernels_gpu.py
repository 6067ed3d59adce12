"""GPU benchmark of the Triton kernels (fluxmusic.kernels) against the eager torch chains they replace.

    python benchmarks/bench_kernels_gpu.py [--config small] [--batch 2] [--out DIR] [--skip-model]

Kept for its command line; the measurements are steps of benchmarks/gpu_check.py (one code path):
``peaks`` (measured copy bandwidth and bf16 matmul rate), ``kernels.speed`` (each fused op vs its eager chain at
the model's batch and at a large batch, achieved bandwidth as a fraction of the measured copy peak), ``rope``
(the fused QK-RMSNorm+RoPE kernel as a fraction of SDPA at the same shapes) and ``transformer`` (the whole
forward at real shapes, 1024 music + 256 text tokens, bf16: eager, kernels, CUDA graphs). See docs/gpu.md.

Without a CUDA GPU it prints one line and exits 3 (gpu_check's convention).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small", help="transformer config for shapes and the model forward")
    p.add_argument("--dtype", default="bf16", choices=["bf16"], help="bf16 (the deployment dtype) only")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="where gpu_check.md/.json go (default: a temp dir)")
    p.add_argument("--skip-model", action="store_true", help="only the per-op benchmarks")
    args = p.parse_args(argv)
    steps = "peaks,kernels.speed,rope" + ("" if args.skip_model else ",transformer")
    with tempfile.TemporaryDirectory(prefix="bench_kernels_gpu-") as tmp:
        out = args.out or Path(tmp)
        return _gpu_check().main(["--out", str(out), "--only", steps, "--config", args.config,
                                  "--batch", str(args.batch)])


if __name__ == "__main__":
    sys.exit(main())
