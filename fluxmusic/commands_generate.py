"""``fluxmusic generate`` and ``fluxmusic assemble``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fluxmusic.errors import FluxMusicError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def register(sub: argparse._SubParsersAction) -> None:
    from fluxmusic.backend import BACKENDS, DTYPES
    from fluxmusic.flow import SOLVERS

    g = sub.add_parser("generate", help="generate music from a text prompt")
    g.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    g.add_argument(
        "-o",
        "--output",
        required=True,
        help="output audio file (.wav, .flac, .ogg); several waveforms get _00, _01, ... suffixes",
    )
    g.add_argument("--prompts-file", help="a text file with one prompt per line")
    g.add_argument("--model", help="model directory (default: the bundled default model)")
    g.add_argument("--steps", type=int, help="solver steps (default: the model's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--duration", type=float, help="seconds, in (0, 10.24] (default: the maximum)")
    g.add_argument("--seed", type=int, help="random seed; item i of a batch uses seed + i (default: random)")
    g.add_argument(
        "--negative-prompt",
        default="",
        help='negative prompt (default "" as trained, served from precomputed embeddings)',
    )
    g.add_argument(
        "--official",
        action="store_true",
        help='the official sampler settings: negative prompt "low quality, gentle", guidance 7, 50 Euler steps',
    )
    g.add_argument("--solver", choices=SOLVERS, help="ODE solver (default: the model's)")
    g.add_argument("--shift", type=float, help="time-shift schedule factor (> 0); default: the model's")
    g.add_argument("--num-waveforms", type=int, default=1, help="waveforms per prompt")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="transformer and encoder dtype")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the transformer (torch backend)")
    g.add_argument("--backend", default="torch", choices=sorted(BACKENDS))
    g.add_argument("--onnx-dir", help="exported ONNX directory (onnx backend)")
    g.add_argument("--engine-dir", help="TensorRT engine directory (tensorrt backend)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)

    a = sub.add_parser("assemble", help="build a model directory from upstream components")
    a.add_argument("--out", required=True, help="new model directory")
    a.add_argument(
        "--transformer",
        required=True,
        help="converted transformer dir, or an official .pt / safetensors file (then give --config)",
    )
    a.add_argument("--config", help="named transformer config for a checkpoint file (small, base, ...)")
    a.add_argument("--t5", required=True, help="T5 encoder dir (e.g. SD3 text_encoder_3)")
    a.add_argument("--t5-tokenizer", required=True, help="T5 tokenizer dir (e.g. SD3 tokenizer_3)")
    a.add_argument("--clap", required=True, help="CLAP dir (full ClapModel, e.g. laion/larger_clap_music)")
    a.add_argument("--clap-tokenizer", help="CLAP tokenizer dir (default: the --clap dir)")
    a.add_argument("--vae", required=True, help="AudioLDM2 vae/ dir")
    a.add_argument("--vocoder", required=True, help="AudioLDM2 vocoder/ dir")
    a.set_defaults(func=_assemble)


def output_paths(output: str, count: int) -> list[Path]:
    """Where each waveform goes; checked before any work so a bad path fails fast."""
    out = Path(output)
    if out.suffix.lower() not in AUDIO_SUFFIXES:
        raise FluxMusicError(f"output {output!r} has extension {out.suffix!r}; allowed: {', '.join(AUDIO_SUFFIXES)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise FluxMusicError(f"output directory {parent} does not exist or is not writable")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:02d}{out.suffix}") for i in range(count)]


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except OSError as e:
            raise FluxMusicError(f"prompts file {args.prompts_file!r} cannot be read: {e.strerror}") from e
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise FluxMusicError("no prompt given; pass a PROMPT or --prompts-file with non-empty lines")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from fluxmusic.audio import write_audio
    from fluxmusic.pipeline import OFFICIAL_NEGATIVE_PROMPT, FluxMusicPipeline

    prompts = read_prompts(args)
    if args.official:
        args.negative_prompt = OFFICIAL_NEGATIVE_PROMPT
        args.guidance = 7.0 if args.guidance is None else args.guidance
        args.steps = 50 if args.steps is None else args.steps
        args.solver = args.solver or "euler"
    paths = output_paths(args.output, len(prompts) * max(args.num_waveforms, 1))
    options = {}
    if args.bf16:
        options["autocast_bf16"] = True
    if args.onnx_dir:
        options["onnx_dir"] = args.onnx_dir
    if args.engine_dir:
        options["engine_dir"] = args.engine_dir
    pipe = FluxMusicPipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, backend=args.backend, **options
    )
    items = pipe.make_items(prompts, args.negative_prompt, args.duration, args.guidance, args.seed, args.num_waveforms)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="step", file=sys.stderr, desc="sampling")

    def progress(step: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(step - bar.n)

    result = pipe.generate_items(items, args.steps, args.solver, args.shift, progress)
    if bar is not None:
        bar.close()
    for path, wave, item in zip(paths, result.audio, items):
        write_audio(path, wave, result.sample_rate)
        print(
            f"wrote {path} ({len(wave) / result.sample_rate:.2f} s, {result.sample_rate} Hz, seed {item.seed}): "
            f"{item.prompt}"
        )
    return 0


def _assemble(args: argparse.Namespace) -> int:
    from fluxmusic.config import get_config
    from fluxmusic.modeldir import assemble

    out = assemble(
        args.out,
        args.transformer,
        args.t5,
        args.t5_tokenizer,
        args.clap,
        args.clap_tokenizer or args.clap,
        args.vae,
        args.vocoder,
        transformer_config=get_config(args.config) if args.config else None,
    )
    print(f"wrote model directory {out}")
    return 0
