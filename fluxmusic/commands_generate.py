"""``fluxmusic generate`` and ``fluxmusic assemble``."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from fluxmusic.errors import FluxMusicError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def add_sampling_arguments(g: argparse.ArgumentParser) -> None:
    """The sampling options (``fluxmusic.sampling``); shared with ``fluxmusic client generate``/``loadtest``."""
    from fluxmusic.flow import SOLVERS
    from fluxmusic.sampling import PRESETS

    g.add_argument("--steps", type=int, help="solver steps (default: the model's)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale in [0, 100] (default: the model's)")
    g.add_argument("--solver", choices=SOLVERS, help="ODE solver: euler, heun (2 evaluations per step), ab2 or ab3 "
                   "(2nd/3rd-order multistep, 1 evaluation per step) (default: the model's)")
    g.add_argument("--shift", help="time-shift factor in [0.01, 100]; 1 or 'none' = no shift (default: the model's)")
    g.add_argument(
        "--negative-prompt",
        help='negative prompt (default: the model\'s, usually "" = the trained null condition, precomputed)',
    )
    g.add_argument("--preset", choices=sorted(PRESETS), help="a named set of sampling settings; explicit options win")
    g.add_argument(
        "--official",
        action="store_true",
        help='= --preset official: exactly the official sampler (50 uniform Euler steps, guidance 7, negative '
        'prompt "low quality, gentle", no time shift) on any model; explicit options win over it',
    )
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("T_MIN", "T_MAX"),
                   help="apply guidance only while t in [T_MIN, T_MAX] (0 <= T_MIN < T_MAX <= 1); outside it the "
                   "unconditional half is not computed (default: the model's, normally 0 1)")
    g.add_argument("--cache-threshold", type=float,
                   help="step caching in [0, 1]: reuse the last velocity while the first block's modulated input "
                   "changed (accumulated relative L1) less than this; 0 = off (default: the model's, normally 0)")
    g.add_argument("--guidance-schedule", metavar="NAME",
                   help="per-step guidance scale: constant, linear (g * 2 (1 - t)) or cosine (g * (1 + cos(pi t))); "
                   "the ramps rise from 0 at the noise end to 2 g at the data end, mean g (default: the model's, "
                   "normally constant)")
    g.add_argument("--bpm", type=float, help="tempo of the beat grid for a model with beat-grid conditioning (the "
                   "bundled default), in [20, 400]; default: the tempo the prompt names ('96 BPM', 'slow', "
                   "'allegro', ...), none if it names none")
    g.add_argument("--register", choices=("low", "mid", "high"),
                   help="the melody's register for a model trained with a register hint (register_channels; "
                   "the bundled default is); default: the register the prompt names ('in a high register'), "
                   "none if it names none")


def add_audio_arguments(g: argparse.ArgumentParser) -> None:
    """Continuation, infilling and long-form options (``fluxmusic.continuation``)."""
    from fluxmusic.continuation import DEFAULT_BLEND, DEFAULT_CROSSFADE, DEFAULT_OVERLAP, MODES

    a = g.add_argument_group("audio in and long form")
    a.add_argument("--audio", help="given audio (WAV, FLAC, OGG; resampled to the model's rate) to continue or infill")
    a.add_argument("--mode", choices=MODES, help="continue: keep the beginning (default: all the given audio) and "
                   "generate what follows; infill: keep both ends and regenerate --regenerate START:END")
    a.add_argument("--keep", help="kept spans of the given audio in seconds, e.g. 0:6 or 0:3,7:10.24 (snapped to "
                   "latent frames)")
    a.add_argument("--regenerate", help="spans to generate in seconds (the rest is kept), e.g. 6:10.24 or 4:6")
    a.add_argument("--blend", type=float, help=f"seconds of soft mask on the kept side of each seam, in [0, 2] "
                   f"(default {DEFAULT_BLEND:g})")
    a.add_argument("--resample", type=int, help="RePaint re-noise iterations per step at t > 0.3 (more evaluations; "
                   "default 0)")
    a.add_argument("--no-splice", action="store_true", help="keep the model's decoding of the kept region instead of "
                   "the given audio itself")
    a.add_argument("--conditioning", choices=("auto", "trained", "replace"),
                   help="how known audio conditions the solve: trained (the transformer's context input; models "
                        "fine-tuned for it), replace (training-free, any model) or auto (trained when the model "
                        "has it; default)")
    a.add_argument("--overlap", type=float, help=f"long form: seconds of the previous window kept as context "
                   f"(default {DEFAULT_OVERLAP:g})")
    a.add_argument("--crossfade", type=float, help=f"long form: crossfade seconds at each seam (default "
                   f"{DEFAULT_CROSSFADE:g})")


def add_media_arguments(g: argparse.ArgumentParser) -> None:
    """Image and story conditioning (``fluxmusic.adapters``; the model directory needs ``adapters/``)."""
    m = g.add_argument_group("image and story (mapped into the conditioning space by the model's adapters)")
    m.add_argument("--image", help="an image file (PNG, JPEG, ...) to make music from; combinable with a prompt")
    m.add_argument("--story", help="a UTF-8 text file (or - for stdin) with a story to make music from")
    m.add_argument("--image-weight", type=float, help="weight of the image against the prompt's 1 (default 1)")
    m.add_argument("--story-weight", type=float, help="weight of the story against the prompt's 1 (default 1)")


def media_kwargs(args: argparse.Namespace) -> dict:
    """The image / story options as ``build_request`` keywords (the story file read and checked)."""
    from fluxmusic.adapters import read_text_file

    story = getattr(args, "story", None)
    return {"image": getattr(args, "image", None), "story": read_text_file(story) if story is not None else None,
            "image_weight": getattr(args, "image_weight", None), "story_weight": getattr(args, "story_weight", None)}


def audio_kwargs(args: argparse.Namespace) -> dict:
    """The audio-in and long-form options of parsed arguments as ``build_request`` keywords (None = not given)."""
    return {
        "audio": getattr(args, "audio", None), "keep": getattr(args, "keep", None),
        "regenerate": getattr(args, "regenerate", None), "mode": getattr(args, "mode", None),
        "blend": getattr(args, "blend", None), "resample": getattr(args, "resample", None),
        "splice": False if getattr(args, "no_splice", False) else None,
        "overlap": getattr(args, "overlap", None), "crossfade": getattr(args, "crossfade", None),
        "conditioning": getattr(args, "conditioning", None),
    }


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling options of parsed arguments as ``build_request`` keywords (None = not given)."""
    preset = args.preset
    if getattr(args, "official", False):
        if preset not in (None, "official"):
            raise FluxMusicError(f"--official conflicts with --preset {preset}; give one of them")
        preset = "official"
    shift = args.shift
    if isinstance(shift, str) and shift.lower() != "none":
        with contextlib.suppress(ValueError):  # a non-number is left for the validation to name
            shift = float(shift)
    return {
        "steps": args.steps, "guidance": args.guidance, "solver": args.solver, "shift": shift,
        "negative_prompt": args.negative_prompt, "preset": preset,
        "guidance_interval": tuple(args.guidance_interval) if args.guidance_interval else None,
        "cache_threshold": args.cache_threshold,
        "guidance_schedule": getattr(args, "guidance_schedule", None), "bpm": getattr(args, "bpm", None),
        "register": getattr(args, "register", None),
    }


def register(sub: argparse._SubParsersAction) -> None:
    from fluxmusic.backend import BACKENDS, DTYPE_CHOICES

    g = sub.add_parser("generate", help="generate music from a text prompt")
    from fluxmusic.threads import add_threads_argument

    add_threads_argument(g)
    g.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    g.add_argument(
        "-o",
        "--output",
        required=True,
        help="output audio file (.wav, .flac, .ogg); several waveforms get _00, _01, ... suffixes",
    )
    g.add_argument("--prompts-file", help="a text file with one prompt per line, or prompt sections of one song: "
                   "every line 'START:END prompt' in seconds (an empty END = to the end), e.g. '0:30 a slow piano'")
    g.add_argument("--model", help="model directory (default: the bundled default model)")
    g.add_argument("--duration", type=float, help="seconds, from one latent frame to 300; beyond the model's window "
                   "(10.24 s) the song is made in windows of continuation (default: the window)")
    add_audio_arguments(g)
    add_media_arguments(g)
    g.add_argument("--seed", type=int, help="random seed; item i of a batch uses seed + i (default or -1: random)")
    add_sampling_arguments(g)
    g.add_argument("--num-waveforms", type=int, default=1, help="waveforms per prompt")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="transformer and encoder dtype (auto: bf16 where the device has it natively, else float32)")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast for the transformer (torch backend)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (torch backend): faster per step, tens of seconds to build")
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
    """Where each waveform goes; checked (a file can really be created there) before any work, so a bad
    path fails in milliseconds, not after a generation."""
    out = Path(output)
    if out.suffix.lower() not in AUDIO_SUFFIXES:
        raise FluxMusicError(
            f"output {str(output)[:100]!r} has extension {out.suffix[:20]!r}; allowed: {', '.join(AUDIO_SUFFIXES)}"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FluxMusicError(f"output directory {parent} does not exist")
    try:  # os.access is not enough (root, read-only mounts, ACLs): create and remove a file there
        with tempfile.NamedTemporaryFile(prefix=f".{out.name}.", suffix=".probe", dir=parent):
            pass
    except OSError as e:
        raise FluxMusicError(f"output directory {parent} is not writable ({e.strerror})") from e
    paths = [out] if count == 1 else [out.with_name(f"{out.stem}_{i:02d}{out.suffix}") for i in range(count)]
    for p in paths:
        if p.is_dir():
            raise FluxMusicError(f"output {p} is a directory; give a file name")
    return paths


def read_prompts_and_sections(args: argparse.Namespace) -> tuple[list[str], list | None]:
    """The prompts (one waveform each), or the prompt sections of one song when every line of the prompts
    file is ``START:END prompt`` (then the prompt list is empty)."""
    from fluxmusic.continuation import parse_prompt_sections

    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text()
        except OSError as e:
            raise FluxMusicError(f"prompts file {args.prompts_file!r} cannot be read: {e.strerror}") from e
        sections = parse_prompt_sections(text, f"prompts file {args.prompts_file}")
        if sections is not None:
            if prompts:
                raise FluxMusicError("give a PROMPT or a prompts file of timed sections, not both")
            return [], sections
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        if getattr(args, "image", None) is not None or getattr(args, "story", None) is not None:
            return [""], None  # the image / story alone
        raise FluxMusicError("no prompt given; pass a PROMPT or --prompts-file with non-empty lines (or --image / "
                             "--story)")
    return prompts, None


def _generate(args: argparse.Namespace) -> int:
    from fluxmusic.modeldir import read_index
    from fluxmusic.pipeline import default_model_dir
    from fluxmusic.sampling import build_request

    # Everything a user can get wrong is checked before the (slow) model load: the request against the
    # model's index (no weights read) and the output path.
    prompts, sections = read_prompts_and_sections(args)
    model_dir = Path(args.model) if args.model else default_model_dir()
    index = read_index(model_dir)
    media = media_kwargs(args)
    request = build_request(
        index.defaults, index.geometry, prompts or None, num_waveforms=args.num_waveforms, seed=args.seed,
        duration=args.duration, sections=sections, **sampling_kwargs(args), **audio_kwargs(args), **media,
    )
    if request.media is not None:
        from fluxmusic.adapters import check_media_dirs, has_media

        check_media_dirs(model_dir)
        if not has_media(model_dir):
            raise FluxMusicError(f"model directory {model_dir} has no image / story adapters (adapters/, "
                                 "image_encoder/, image_processor/); --image and --story need them (the bundled "
                                 "default has them)")
    paths = output_paths(args.output, len(request.items))
    options = {}
    if args.bf16:
        options["autocast_bf16"] = True
    if args.compile:
        if args.onnx_dir or args.engine_dir:
            raise FluxMusicError("--compile applies to the torch backend; it cannot combine with --onnx-dir or "
                                 "--engine-dir")
        options["compile"] = True
    if args.onnx_dir:
        options["onnx_dir"] = args.onnx_dir
    if args.engine_dir:
        options["engine_dir"] = args.engine_dir
    result = _run(args, model_dir, request, options)
    for path, wave, item in zip(paths, result.audio, request.items):
        from fluxmusic.audio import write_audio

        write_audio(path, wave, result.sample_rate)
        print(
            f"wrote {path} ({len(wave) / result.sample_rate:.2f} s, {result.sample_rate} Hz, seed {item.seed}): "
            f"{item.prompt}"
        )
    return 0


def _run(args: argparse.Namespace, model_dir: Path, request, options: dict):
    """Load the model (with a status line) and generate (with a progress bar that is closed before any
    error is printed, so the error gets its own line)."""
    import time

    from fluxmusic.pipeline import FluxMusicPipeline

    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"settings: {request.settings.describe()}")
    if request.audio is not None:
        say(f"audio in: {request.audio.describe()}")
    if request.media is not None:
        say(f"conditioning: {request.media.describe()}")
    windows = 1
    if request.long_form is not None:
        windows = len(request.long_form.windows(request_geometry(model_dir)))
        say(request.long_form.describe(request_geometry(model_dir)))
    say(f"loading model {model_dir} ({args.backend}, {args.device}) ...")
    t0 = time.perf_counter()
    pipe = FluxMusicPipeline.from_pretrained(
        model_dir, device=args.device, dtype=args.dtype, backend=args.backend, **options
    )
    say(f"loaded in {time.perf_counter() - t0:.1f} s")
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=request.settings.steps * windows, unit="step", file=sys.stderr, desc="sampling")

    def progress(step: int, total: int) -> None:
        if bar is not None:
            bar.update(step - bar.n)

    try:
        result = pipe.generate(request, progress)
    finally:
        if bar is not None:
            bar.close()
    t = result.timings
    cached = f", {result.cache_skipped:g} skipped by the step cache" if request.settings.cache_threshold else ""
    say(f"{result.evaluations:g} model evaluations per waveform{cached}; text {t['text_encode']:.2f} s, "
        f"sampling {t['sampling']:.2f} s, decode {t['decode']:.2f} s")
    if result.kept_snr_db is not None:
        say("kept region vs the given audio: " + ", ".join(
            f"waveform SNR {a:.1f} dB (the model's own decoding: waveform {b:.1f} dB, mel {c:.1f} dB)"
            for a, b, c in zip(result.kept_snr_db, result.decoded_kept_snr_db, result.decoded_kept_mel_snr_db)))
    return result


def request_geometry(model_dir: Path):
    from fluxmusic.modeldir import read_index

    return read_index(model_dir).geometry


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
