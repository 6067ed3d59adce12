"""Generate music from a Triton Inference Server serving the repository of `fluxmusic export triton`.

    python triton_models/client_example.py "a fast cheerful melody on a plucked string" -o out.wav --seed 0
    python triton_models/client_example.py "a slow piano" -o out.wav --stream   # repository made with --decoupled
    python triton_models/client_example.py "" --image photo.png --story story.txt -o out.wav --seed 0
    python triton_models/client_example.py "a slow piano" --duration 60 -o song.wav --stream   # long form, windows

Needs only ``tritonclient[grpc]`` and numpy. Untested against a live server here (no container runtime).
"""

from __future__ import annotations

import argparse
import queue
import sys
import wave
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "fluxmusic"
OUTPUTS = ("audio", "seed_used", "sample_rate", "cfg_evaluations")


def build_inputs(
    prompt: str,
    negative_prompt: str | None = None,
    duration: float | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    solver: str | None = None,
    shift: float | None = None,
    preset: str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    cache_threshold: float | None = None,
    audio: np.ndarray | None = None,
    audio_sample_rate: int | None = None,
    keep: str | None = None,
    regenerate: str | None = None,
    mode: str | None = None,
    guidance_schedule: str | None = None,
    blend: float | None = None,
    resample: int | None = None,
    splice: bool | None = None,
    overlap: float | None = None,
    crossfade: float | None = None,
    sections: list[str] | None = None,
    image: bytes | None = None,
    story: str | None = None,
    image_weight: float | None = None,
    story_weight: float | None = None,
    conditioning: str | None = None,
    bpm: float | None = None,
    register: str | None = None,
) -> list[grpcclient.InferInput]:
    """Request tensors of the ``fluxmusic`` model; an omitted setting takes the model's default (or the preset's).
    ``shift=1`` is no time shift; ``preset="official"`` is the official sampler. ``audio`` (mono float32 samples at
    ``audio_sample_rate``, default the model's) with ``keep`` / ``regenerate`` ("0:6", "4:6") or ``mode``
    continues or infills it (the repository needs the vae_encoder model). A ``duration`` beyond the model's window
    is long form (``overlap``, ``crossfade`` seconds; ``sections`` "START:END prompt" with prompt ""). ``image``
    (an image file's bytes) and ``story`` (text) condition through the repository's image / story models, mixed
    with the prompt (weight 1; may be "") by ``image_weight`` / ``story_weight``. ``conditioning`` (auto, trained,
    replace) picks how given audio conditions the solve; ``bpm`` and ``register`` (low, mid, high) set the beat grid
    and register hint of a model that takes them (absent: the prompt's)."""

    def text(v: str | None):
        return None if v is None else np.array([v.encode()], np.object_)

    def fp32(v: float | None):
        return None if v is None else np.array([v], np.float32)

    lo, hi = guidance_interval if guidance_interval is not None else (None, None)
    values = {
        "prompt": (np.array([prompt.encode()], dtype=np.object_), "BYTES"),
        "negative_prompt": (
            None if negative_prompt is None else np.array([negative_prompt.encode()], np.object_),
            "BYTES",
        ),
        "duration": (None if duration is None else np.array([duration], np.float32), "FP32"),
        "steps": (None if steps is None else np.array([steps], np.int32), "INT32"),
        "guidance": (None if guidance is None else np.array([guidance], np.float32), "FP32"),
        "seed": (None if seed is None else np.array([seed], np.int64), "INT64"),
        "solver": (text(solver), "BYTES"),
        "shift": (fp32(shift), "FP32"),
        "preset": (text(preset), "BYTES"),
        "guidance_interval_min": (fp32(lo), "FP32"),
        "guidance_interval_max": (fp32(hi), "FP32"),
        "cache_threshold": (fp32(cache_threshold), "FP32"),
        "audio": (None if audio is None else np.ascontiguousarray(np.asarray(audio, np.float32).reshape(-1)), "FP32"),
        "audio_sample_rate": (None if audio_sample_rate is None else np.array([audio_sample_rate], np.int32), "INT32"),
        "keep": (text(keep), "BYTES"),
        "regenerate": (text(regenerate), "BYTES"),
        "mode": (text(mode), "BYTES"),
        "guidance_schedule": (text(guidance_schedule), "BYTES"),
        "blend": (fp32(blend), "FP32"),
        "resample": (None if resample is None else np.array([resample], np.int32), "INT32"),
        "splice": (None if splice is None else np.array([splice], np.bool_), "BOOL"),
        "overlap": (fp32(overlap), "FP32"),
        "crossfade": (fp32(crossfade), "FP32"),
        "sections": (None if not sections else np.array([v.encode() for v in sections], np.object_), "BYTES"),
        "image": (None if image is None else np.array([bytes(image)], np.object_), "BYTES"),
        "story": (text(story), "BYTES"),
        "image_weight": (fp32(image_weight), "FP32"),
        "story_weight": (fp32(story_weight), "FP32"),
        "conditioning": (text(conditioning), "BYTES"),
        "bpm": (fp32(bpm), "FP32"),
        "register": (text(register), "BYTES"),
    }
    inputs = []
    for name, (array, datatype) in values.items():
        if array is not None:
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
    return inputs


def generate(client: grpcclient.InferenceServerClient, inputs: list) -> tuple[np.ndarray, int, int]:
    result = client.infer(MODEL, inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS])
    return result.as_numpy("audio"), int(result.as_numpy("seed_used")[0]), int(result.as_numpy("sample_rate")[0])


def generate_streaming(client: grpcclient.InferenceServerClient, inputs: list) -> tuple[np.ndarray, int, int]:
    """Decoupled model: progress responses (step, total_steps) arrive before the one with the audio; a long-form
    request also gets each finished window's audio (window, windows, start_sample) as soon as it is done."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, inputs)
        while True:
            result, error = responses.get()
            if error is not None:
                raise error
            audio = result.as_numpy("audio")
            if audio is not None and result.as_numpy("window") is not None:  # playback could start here
                k, n = int(result.as_numpy("window")[0]), int(result.as_numpy("windows")[0])
                start = int(result.as_numpy("start_sample")[0])
                print(f"window {k + 1}/{n}: {audio.size} samples from sample {start}", file=sys.stderr)
                continue
            if audio is not None:
                return audio, int(result.as_numpy("seed_used")[0]), int(result.as_numpy("sample_rate")[0])
            step, total = int(result.as_numpy("step")[0]), int(result.as_numpy("total_steps")[0])
            print(f"step {step}/{total}", file=sys.stderr)
    finally:
        client.stop_stream()


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("-o", "--output", required=True, help="output .wav file")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint")
    p.add_argument("--negative-prompt")
    p.add_argument("--duration", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="stream progress (repository generated with --decoupled)")
    p.add_argument("--image", help="condition on an image file (PNG, JPEG, ...)")
    p.add_argument("--story", help="condition on a story: a UTF-8 text file")
    p.add_argument("--image-weight", type=float)
    p.add_argument("--story-weight", type=float)
    p.add_argument("--conditioning", choices=("auto", "trained", "replace"),
                   help="how given audio conditions the solve (trained: the transformer's context input)")
    p.add_argument("--bpm", type=float, help="beat-grid tempo (a model with a beat grid; default: the prompt's)")
    p.add_argument("--register", choices=("low", "mid", "high"), help="register hint (default: the prompt's)")
    p.add_argument("--overlap", type=float, help="long form: seconds of context per window")
    p.add_argument("--crossfade", type=float, help="long form: seconds of crossfade at each seam")
    p.add_argument("--section", action="append", help="long form: 'START:END prompt' (repeat; prompt \"\")")
    args = p.parse_args(argv)

    image = Path(args.image).read_bytes() if args.image else None
    story = Path(args.story).read_text(encoding="utf-8") if args.story else None
    inputs = build_inputs(args.prompt, args.negative_prompt, args.duration, args.steps, args.guidance, args.seed,
                          overlap=args.overlap, crossfade=args.crossfade, sections=args.section, image=image,
                          story=story, image_weight=args.image_weight, story_weight=args.story_weight,
                          conditioning=args.conditioning, bpm=args.bpm, register=args.register)
    client = grpcclient.InferenceServerClient(args.url)
    try:
        audio, seed, sample_rate = (generate_streaming if args.stream else generate)(client, inputs)
    except grpcclient.InferenceServerException as e:  # e.g. INVALID_ARG naming the bad input
        print(f"error: {e.message()}", file=sys.stderr)
        return 2
    write_wav(args.output, audio, sample_rate)
    print(f"wrote {args.output}: {audio.size / sample_rate:.2f} s at {sample_rate} Hz, seed {seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
