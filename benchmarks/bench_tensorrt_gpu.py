"""GPU benchmark: torch vs onnxruntime-CUDA vs TensorRT fp16/bf16 (with and without CUDA graphs).

    python benchmarks/bench_tensorrt_gpu.py [--model DIR] [--work DIR] [--steps 50] [--repeats 3]

Per variant, measured side by side in one process: end-to-end seconds for one 10.24 s clip (text encoders,
``steps`` CFG Euler steps, VAE decoder, vocoder) and the per-step latency (one batched CFG transformer call,
batch 2, 1024 music + text tokens), as medians, with ratios to torch fp32. Without ``--model`` it builds a
model directory of the ``small`` transformer (random weights) with the AudioLDM2-sized VAE and HiFi-GAN
(random weights) and small text encoders of the right widths (4096 / 768) -- speed does not depend on the
weights. The ONNX export and the engines are cached under ``--work``.

Needs a CUDA GPU and TensorRT; without them it prints why and exits 0. Untested here (no GPU on our
machines): the numbers in docs/export.md come from whoever runs it first.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

PROMPT = "a fast cheerful melody on a plucked string"
DURATION = 10.24


def prepare(model_dir: Path, work: Path) -> tuple[Path, Path]:
    """ONNX export (with the fp16 transformer variant) and fp16 + bf16 engines, reused when present."""
    from fluxmusic.export.onnx_export import export_onnx
    from fluxmusic.export.tensorrt_build import build_engines, gpu_target
    from fluxmusic.export.tensorrt_plan import RequestLimits, describe_onnx_dir, make_plan

    onnx_dir, engine_dir = work / "onnx", work / "engines"
    if not (onnx_dir / "manifest.json").is_file():
        export_onnx(model_dir, onnx_dir, fp16=True)
    version, sm, _ = gpu_target()
    desc = describe_onnx_dir(onnx_dir)
    for precision in ("fp16", "bf16"):
        plan = make_plan(desc, precision, RequestLimits(max_batch=1, durations=(DURATION,)), version, sm)
        todo = [b for b in plan.builds if not (engine_dir / b.engine.filename).is_file()]
        if todo:
            build_engines(dataclasses.replace(plan, builds=tuple(todo)), engine_dir)
    return onnx_dir, engine_dir


def cuda_time(fn, repeats: int) -> float:
    """Median wall seconds of ``fn`` with the GPU synchronised around each call."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_inputs(pipe):
    """One CFG transformer call at the real shapes: batch 2, 1024 music tokens, full text length."""
    be, geo = pipe.backend, pipe.geometry
    frames = geo.latent_frames(DURATION)
    gh, gw = geo.grid(frames)
    cfg = be.transformer_config
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, gh * gw, cfg.in_channels, device="cuda", generator=g)
    t = torch.full((2,), 0.5, device="cuda")
    txt = torch.randn(2, pipe.index.t5_max_length, cfg.context_in_dim, device="cuda", generator=g)
    y = torch.randn(2, cfg.vec_in_dim, device="cuda", generator=g)
    return x, t, txt, y, be.rope(pipe.index.t5_max_length, gh, gw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: build the small config, random weights)")
    ap.add_argument("--work", type=Path, default=Path("bench_tensorrt_work"), help="cache for ONNX and engines")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="end-to-end clips per variant")
    ap.add_argument("--step-repeats", type=int, default=50, help="transformer calls per variant")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: bench_tensorrt_gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 0
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("skipped: bench_tensorrt_gpu needs TensorRT >= 10 (pip install 'fluxmusic[tensorrt]')")
        return 0
    from fluxmusic.pipeline import FluxMusicPipeline

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or (args.work / "model")
    if not args.model and not model_dir.is_dir():
        print("building the small benchmark model directory (random weights) ...", file=sys.stderr)
        from fluxmusic.tiny import build_random_model_dir

        build_random_model_dir(model_dir, "small")
    onnx_dir, engine_dir = prepare(model_dir, args.work)
    variants = {
        "torch fp32": dict(backend="torch", dtype="fp32"),
        "torch bf16": dict(backend="torch", dtype="bf16"),
        "onnxruntime CUDA fp32": dict(backend="onnx", onnx_dir=onnx_dir, providers=["CUDAExecutionProvider"]),
        "tensorrt fp16": dict(backend="tensorrt", engine_dir=engine_dir, precision="fp16"),
        "tensorrt fp16 + graphs": dict(backend="tensorrt", engine_dir=engine_dir, precision="fp16", cuda_graphs=True),
        "tensorrt bf16": dict(backend="tensorrt", engine_dir=engine_dir, precision="bf16"),
        "tensorrt bf16 + graphs": dict(backend="tensorrt", engine_dir=engine_dir, precision="bf16", cuda_graphs=True),
    }
    gpu = torch.cuda.get_device_name(0)
    print(f"{gpu}; {args.steps} steps, {DURATION} s clip; medians ({args.repeats} clips, {args.step_repeats} steps)")
    print(f"{'variant':26s} {'s / clip':>9s} {'x torch':>8s} {'ms / step':>10s} {'x torch':>8s}")
    base = None
    for name, opts in variants.items():
        try:
            pipe = FluxMusicPipeline.from_pretrained(model_dir, device="cuda", **opts)
        except Exception as e:  # a missing provider or engine skips one row, not the run
            print(f"{name:26s} unavailable: {e}")
            continue

        def clip(p=pipe) -> None:
            p(PROMPT, duration=DURATION, steps=args.steps, seed=0)

        pipe(PROMPT, duration=DURATION, steps=2, seed=0)  # warm-up: lazy init, graph capture, autotuning
        e2e = cuda_time(clip, args.repeats)
        inputs = step_inputs(pipe)
        pipe.backend.velocity(*inputs)
        step = cuda_time(lambda p=pipe, i=inputs: p.backend.velocity(*i), args.step_repeats)
        base = base or (e2e, step)
        print(f"{name:26s} {e2e:9.3f} {base[0] / e2e:7.2f}x {step * 1e3:10.2f} {base[1] / step:7.2f}x")
        pipe = None  # free this variant's GPU memory before the next one loads
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
