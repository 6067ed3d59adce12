"""``fluxmusic export onnx``, ``fluxmusic export quantize`` and ``fluxmusic export validate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxmusic.errors import FluxMusicError


def register(sub: argparse._SubParsersAction) -> None:
    from fluxmusic.export.onnx_export import ALL_COMPONENTS, DEFAULT_OPSET, MAX_OPSET, MIN_OPSET

    o = sub.add_parser("onnx", help="export each component of a model directory to ONNX")
    o.add_argument("--model", help="model directory (default: the bundled default model)")
    o.add_argument("--out", required=True, help="output directory (ONNX files + manifest.json)")
    o.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET}; 23 gives native Attention/RMSNorm ops)",
    )
    o.add_argument(
        "--components",
        nargs="+",
        metavar="NAME",
        help=f"components to export (default: all but the step graph); allowed: {', '.join(ALL_COMPONENTS)}",
    )
    o.add_argument("--fp16", action="store_true", help="also write fp16 transformer graphs (<name>.fp16.onnx)")
    o.add_argument("--media", action="store_true", help="also export the image tower and the image / story adapters "
                   "(OUT/media/, docs/image-story.md); the model directory needs adapters/")
    o.add_argument("--step-graph", action="store_true", help="also write euler_step.onnx (one fused Euler CFG step)")
    o.add_argument("--encoder", action="store_true", help="also write vae_encoder.onnx (the VAE encoder: audio in "
                                                         "for continuation and infilling)")
    o.add_argument("--int8", action="store_true", help="also write transformer.int8.onnx (dynamic quantisation, CPU)")
    o.set_defaults(func=_export_onnx)

    q = sub.add_parser("quantize", help="int8 dynamic quantisation of an exported transformer (CPU)")
    q.add_argument("--onnx", required=True, help="ONNX export directory holding transformer.onnx")
    q.set_defaults(func=_quantize)

    v = sub.add_parser("validate", help="parity of exported graphs against PyTorch fp32; exit 1 when a limit is missed")
    v.add_argument("--model", help="model directory (default: the bundled default model)")
    v.add_argument("--onnx", help="ONNX export directory (every variant in it is checked, or --variants)")
    v.add_argument("--engines", help="TensorRT engine directory (the tensorrt backend)")
    v.add_argument("--variants", nargs="+", help="ONNX variants to check (default: all exported): fp32 fp16 int8")
    v.add_argument("--json", help="also write the report as JSON to this path")
    v.add_argument("--prompt", help="prompt of the end-to-end case")
    v.add_argument("--seed", type=int, default=0, help="seed of the end-to-end case (default 0)")
    v.add_argument("--steps", type=int, help="solver steps of the end-to-end case (default: the model's)")
    v.add_argument("--duration", type=float, help="seconds of the end-to-end case (default: the maximum)")
    v.add_argument("--max-abs", type=float, help="fp32 transformer max-abs limit (default 1e-4)")
    v.add_argument("--min-cosine", type=float, help="fp32 cosine limit (default 0.9999)")
    v.add_argument("--min-snr", type=float, help="fp32 end-to-end SNR limit in dB (default 40)")
    v.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="compare even if the export's source hashes differ from the model directory's",
    )
    v.set_defaults(func=_validate)


def _model_dir(arg: str | None) -> Path:
    from fluxmusic.pipeline import default_model_dir

    return Path(arg) if arg else default_model_dir()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _export_onnx(args: argparse.Namespace) -> int:
    from fluxmusic.export.onnx_export import export_onnx

    manifest = export_onnx(
        _model_dir(args.model), args.out, args.components, args.opset, args.fp16, args.step_graph, args.int8,
        encoder=args.encoder,
    )
    names = [f"{c} ({', '.join(e['variants'])})" for c, e in manifest["components"].items()]
    print(f"wrote {args.out}: {'; '.join(names)}")
    if getattr(args, "media", False):
        from fluxmusic.export.media_onnx import MEDIA_DIR, export_media

        media = export_media(_model_dir(args.model), args.out, min(args.opset, 18))
        print(f"wrote {Path(args.out) / MEDIA_DIR}: " + ", ".join(
            f"{n} (max-abs vs torch {g['max_abs_vs_torch']:.1e})" for n, g in media["graphs"].items()))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from fluxmusic.export.quantize import quantize_transformer

    print(f"wrote {quantize_transformer(args.onnx)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    from fluxmusic.export.onnx_export import check_manifest_matches, read_manifest
    from fluxmusic.export.validate import DEFAULT_THRESHOLDS, PROMPT, validate

    from fluxmusic.backend import make_backend
    from fluxmusic.modeldir import read_index

    if not args.onnx and not args.engines:
        raise FluxMusicError("nothing to validate: give --onnx DIR (and/or --engines DIR)")
    model_dir = _model_dir(args.model)
    index = read_index(model_dir)
    candidates, variants = {}, {}
    if args.onnx:
        manifest = read_manifest(args.onnx)
        if not args.allow_mismatch:
            _say("checking source hashes (model directory against the export manifest)")
            check_manifest_matches(model_dir, manifest, manifest["components"], weights=True)
        # A variant is the transformer's precision (the other components are fp32 in every variant).
        exported = set(manifest["components"].get("transformer", {}).get("variants", {})) or {"fp32"}
        wanted = args.variants or sorted(exported, key=["fp32", "fp16", "int8"].index)
        for v in wanted:
            if v not in ("fp32", "fp16", "int8"):
                raise FluxMusicError(f"variant {v!r} is not one of: fp32, fp16, int8")
            if v not in exported:
                raise FluxMusicError(f"{args.onnx} has no {v} graphs; exported: {', '.join(sorted(exported))}")
            label = f"onnx {v}"
            candidates[label] = make_backend(
                "onnx", model_dir, index, "cpu", torch.float32, onnx_dir=args.onnx, variant=v
            )
            variants[label] = v
    if args.engines:
        candidates["tensorrt"] = make_backend(
            "tensorrt", model_dir, index, "cuda", torch.float32, engine_dir=args.engines
        )
    fp32 = DEFAULT_THRESHOLDS["fp32"]
    over = {}
    if args.min_cosine is not None:
        over["min_cosine"] = args.min_cosine
    if args.min_snr is not None:
        over["min_snr_db"] = args.min_snr
    if args.max_abs is not None:
        over["max_abs"] = {"transformer": args.max_abs, "euler_step": args.max_abs}
    thresholds = {"fp32": dataclasses.replace(fp32, **over)}
    report = validate(
        model_dir,
        candidates,
        variants,
        thresholds,
        prompt=args.prompt or PROMPT,
        seed=args.seed,
        steps=args.steps,
        duration=args.duration,
        progress=_say,
    )
    print(report.table())
    if args.json:
        from fluxmusic.checkpoint import atomic_write_text

        atomic_write_text(args.json, report.to_json())
    failed = [f"{r.variant} {r.component} ({r.inputs})" for r in report.rows if not r.ok]
    if failed:
        print(f"FAILED: {len(failed)} check(s) missed their limits: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(report.rows)} checks passed")
    return 0
