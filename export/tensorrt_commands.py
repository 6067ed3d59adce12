"""``fluxmusic export tensorrt``: plan (``--dry-run``, no GPU needed) or build TensorRT engines."""

from __future__ import annotations

import argparse
import json

from fluxmusic.errors import FluxMusicError


def register(export_subparsers) -> None:
    p = export_subparsers.add_parser(
        "tensorrt",
        help="build TensorRT engines from an ONNX export (needs a CUDA GPU; --dry-run prints the plan anywhere)",
        description="Build one TensorRT engine per exported component, with optimisation profiles sized from the "
        "request limits. Engine names carry TensorRT version, precision and GPU (e.g. "
        "transformer.trt10.8.fp16.sm89.plan).",
    )
    p.add_argument("--onnx", metavar="DIR", help="ONNX export directory (fluxmusic export onnx)")
    p.add_argument("--out", metavar="DIR", help="engine directory to write")
    p.add_argument("--model", metavar="DIR", help="model directory (geometry; enough alone for --dry-run)")
    p.add_argument("--precision", default="fp16", help="fp32 | fp16 | bf16 | fp8 (default fp16)")
    p.add_argument(
        "--component-precision",
        action="append",
        default=[],
        metavar="C=P",
        help="override the policy for one component, e.g. vae_decoder=fp16 once validate shows parity",
    )
    p.add_argument("--components", nargs="+", metavar="NAME", help="build only these components")
    p.add_argument("--max-batch", type=int, default=1, help="most requests per call (the transformer gets 2x, CFG)")
    p.add_argument("--opt-batch", type=int, default=None, help="requests per call to tune for (default 1)")
    p.add_argument(
        "--durations",
        metavar="SECONDS",
        help="MIN,MAX (a range, one profile), a list of 3+ (one exact profile each) or one value; "
        "default: the model's max duration",
    )
    p.add_argument("--static", action="store_true", help="fixed shapes: batch = max batch, one profile per duration")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0..5 (default 3)")
    p.add_argument("--workspace-gb", type=float, default=8.0, help="builder workspace limit in GiB (default 8)")
    p.add_argument("--sm", help="plan for this GPU compute capability, e.g. 8.9 (default: this machine's GPU)")
    p.add_argument("--trt-version", help="plan for this TensorRT version (default: the installed one)")
    p.add_argument("--dry-run", action="store_true", help="print the build plan and exit (no GPU needed)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    p.set_defaults(func=run)


def _detected_target() -> tuple[str | None, tuple[int, int] | None]:
    """TensorRT version from package metadata and the GPU's compute capability, without importing TensorRT."""
    import torch
    from fluxmusic.export.tensorrt_plan import installed_tensorrt_version

    cc = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return installed_tensorrt_version(), cc


def make_plan_from_args(args: argparse.Namespace):
    from fluxmusic.export.tensorrt_plan import (
        RequestLimits,
        describe_model_dir,
        describe_onnx_dir,
        make_plan,
        parse_component_precisions,
        parse_durations,
    )

    if args.onnx:
        desc = describe_onnx_dir(args.onnx, args.model, args.components)
    elif args.model and args.dry_run:
        desc = describe_model_dir(args.model, args.components)
    else:
        raise FluxMusicError("--onnx DIR is required (or --model DIR with --dry-run)")
    version, cc = _detected_target()
    limits = RequestLimits(
        max_batch=args.max_batch,
        opt_batch=args.opt_batch if args.opt_batch is not None else 1,
        durations=parse_durations(args.durations, desc.index.geometry),
        static=args.static,
    )
    return make_plan(
        desc,
        args.precision,
        limits,
        args.trt_version or version,
        args.sm or cc,
        parse_component_precisions(args.component_precision),
        args.opt_level,
    )


def run(args: argparse.Namespace) -> int:
    if args.opt_batch is not None and args.opt_batch > args.max_batch:
        raise FluxMusicError(f"--opt-batch {args.opt_batch} is larger than --max-batch {args.max_batch}")
    if args.dry_run:
        plan = make_plan_from_args(args)
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format())
        return 0
    if not args.out:
        raise FluxMusicError("--out DIR is required to build engines")
    # fail on the missing GPU before reading anything, with the one message that says why
    from fluxmusic.export.tensorrt_build import build_engines, require_tensorrt

    require_tensorrt()
    if args.sm or args.trt_version:
        raise FluxMusicError("--sm and --trt-version only apply to --dry-run; a build targets this machine")
    plan = make_plan_from_args(args)
    print(plan.format())
    paths = build_engines(plan, args.out, workspace_gb=args.workspace_gb, verbose=args.verbose)
    print(f"wrote {len(paths)} engines to {args.out}")
    return 0
