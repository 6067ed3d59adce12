"""``fluxmusic export triton``: generate a Triton Inference Server model repository, or check one."""

from __future__ import annotations

import argparse

from fluxmusic.errors import FluxMusicError


def register(export_sub: argparse._SubParsersAction) -> None:
    from fluxmusic.export.triton_config import INSTANCE_KINDS
    from fluxmusic.export.triton_repo import RepoOptions

    d = RepoOptions()
    p = export_sub.add_parser(
        "triton",
        help="generate (or --check) a Triton Inference Server model repository",
        description="One Triton model per exported component (onnxruntime_onnx, or tensorrt_plan with --engines) "
        "plus the Python-backend BLS model 'fluxmusic' that runs a whole generation per request.",
    )
    p.add_argument("--model", metavar="DIR", help="the model directory the components were exported from")
    p.add_argument("--onnx", metavar="DIR", help="`fluxmusic export onnx` output (<component>.onnx)")
    p.add_argument("--engines", metavar="DIR", help="TensorRT engines to serve instead of the ONNX graphs")
    p.add_argument("--engine-precision", help="pick engines of this precision when several are present")
    p.add_argument("--out", metavar="REPO", help="repository directory to create (must not exist)")
    p.add_argument("--check", metavar="REPO", help="only validate an existing repository")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="per batchable component model")
    p.add_argument("--instances", type=int, default=d.instance_count, help="instances per component model")
    p.add_argument("--instance-kind", choices=INSTANCE_KINDS, help="default: KIND_GPU for engines, else KIND_AUTO")
    p.add_argument("--bls-instances", type=int, default=d.bls_instance_count, help="concurrent generations")
    p.add_argument("--max-queue-delay-us", type=int, default=d.max_queue_delay_us, help="dynamic batching delay")
    p.add_argument("--decoupled", action="store_true",
                   help="stream per-step progress responses and long-form windows (decoupled)")
    p.add_argument("--media", action=argparse.BooleanOptionalAction, default=None,
                   help="the image / story models (image tower + adapters, ONNX from --onnx DIR/media/ or exported "
                   "now); default: when the model directory has adapters/")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fluxmusic.export.triton_check import check_repository
    from fluxmusic.export.triton_repo import RepoOptions, build_repository

    if args.check:
        if args.out or args.model or args.onnx:
            raise FluxMusicError("--check REPO validates an existing repository; do not combine it with --out")
        for line in check_repository(args.check):
            print(f"ok  {line}")
        print(f"{args.check}: all checks passed")
        return 0
    missing = [f"--{k}" for k in ("model", "onnx", "out") if not getattr(args, k)]
    if missing:
        raise FluxMusicError(f"missing {', '.join(missing)} (or use --check REPO)")
    options = RepoOptions(
        max_batch_size=args.max_batch_size,
        instance_count=args.instances,
        instance_kind=args.instance_kind,
        bls_instance_count=args.bls_instances,
        decoupled=args.decoupled,
        max_queue_delay_us=args.max_queue_delay_us,
        media=args.media,
    )
    repo = build_repository(args.model, args.onnx, args.out, args.engines, options, args.engine_precision)
    print(f"wrote Triton repository {repo} (checked: configs parse, tensors agree with the graphs and the BLS model)")
    return 0
