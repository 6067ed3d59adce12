"""Request validation: every field of a GenerateRequest checked against the server's limits.

A bad field raises :class:`FluxMusicError` whose message names the field, the value and the allowed range;
the service answers it with INVALID_ARGUMENT and keeps serving.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from fluxmusic.runtime.audio_codec import ENCODINGS, HEADER_BYTES, MAX_BYTES_PER_SAMPLE

from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import SOLVERS
from fluxmusic.pipeline import MAX_SEED, FluxMusicPipeline, GenerationItem

#: proto AudioEncoding value -> codec name (UNSPECIFIED serves WAV).
ENCODING_BY_VALUE = {0: "wav", 1: "wav", 2: "flac", 3: "pcm_f32le"}
assert set(ENCODING_BY_VALUE.values()) <= set(ENCODINGS)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. ``max_duration`` comes from the model; the rest are server options."""

    max_duration: float
    sample_rate: int
    max_steps: int = 1000
    min_guidance: float = 0.0
    max_guidance: float = 100.0
    max_shift: float = 100.0
    max_waveforms: int = 8
    max_prompt_chars: int = 2000
    solvers: tuple[str, ...] = field(default=SOLVERS)

    @property
    def max_response_bytes(self) -> int:
        """The largest GenerateResponse: max waveforms of max duration in the widest encoding, plus slack
        for headers, seeds and timings. The server's send limit and the client's receive limit use it."""
        samples = math.ceil(self.max_duration * self.sample_rate) + 1
        return self.max_waveforms * (samples * MAX_BYTES_PER_SAMPLE + HEADER_BYTES) + 64 * 1024

    @property
    def max_request_bytes(self) -> int:
        return 2 * 4 * self.max_prompt_chars + 64 * 1024  # two prompts of up to 4 UTF-8 bytes per char


@dataclass
class RequestSpec:
    """A validated request: its items (one per waveform) and the settings its batch must share."""

    items: list[GenerationItem]
    steps: int
    solver: str
    shift: float | None
    encoding: str
    latent_frames: int

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one batched solve."""
        return (self.steps, self.solver, self.shift, self.latent_frames)


def _invalid(name: str, value: object, allowed: str) -> FluxMusicError:
    return FluxMusicError(f"{name} {value!r} is invalid; allowed: {allowed}")


def _check_text(name: str, value: str, limits: Limits, required: bool) -> str:
    if required and not value.strip():
        raise _invalid(name, value, f"a non-empty string of at most {limits.max_prompt_chars} characters")
    if len(value) > limits.max_prompt_chars:
        raise _invalid(name, value[:40] + "...", f"at most {limits.max_prompt_chars} characters, got {len(value)}")
    return value


def _check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise _invalid(name, value, f"{'(' if lo_open else '['}{lo}, {hi}]")
    return value


def parse_request(req, limits: Limits, pipe: FluxMusicPipeline) -> RequestSpec:
    """Check every field of a ``fluxmusic.v1.GenerateRequest`` and expand it into generation items."""
    defaults = pipe.defaults
    prompt = _check_text("prompt", req.prompt, limits, required=True)
    negative = _check_text("negative_prompt", req.negative_prompt, limits, required=False)
    duration = limits.max_duration
    if req.HasField("duration"):
        # The upper bound gets the same 1e-9 slack as LatentGeometry.check_duration (10.24 is not exact).
        if not (math.isfinite(req.duration) and 0 < req.duration <= limits.max_duration + 1e-9):
            raise _invalid("duration", req.duration, f"(0, {limits.max_duration}] seconds")
        duration = min(req.duration, limits.max_duration)
    steps = int(defaults.get("steps", 50))
    if req.HasField("steps"):
        steps = int(_check_range("steps", req.steps, 1, limits.max_steps))
    guidance = float(defaults.get("guidance", 7.0))
    if req.HasField("guidance"):
        guidance = _check_range("guidance", req.guidance, limits.min_guidance, limits.max_guidance)
    solver = req.solver or defaults.get("solver", "euler")
    if solver not in limits.solvers:
        raise _invalid("solver", solver, ", ".join(limits.solvers))
    shift = defaults.get("shift")
    if req.HasField("shift"):
        shift = _check_range("shift", req.shift, 0.0, limits.max_shift, lo_open=True)
    n = req.num_waveforms or 1
    if not 1 <= n <= limits.max_waveforms:
        raise _invalid("num_waveforms", n, f"[1, {limits.max_waveforms}] (0 means 1)")
    max_seed = MAX_SEED - (n - 1)  # waveform i uses seed + i, which must stay a valid seed
    if not req.HasField("seed") or req.seed == -1:
        seed = secrets.randbelow(max_seed + 1)
    elif not 0 <= req.seed <= max_seed:
        raise _invalid("seed", req.seed, f"-1 (random) or [0, {max_seed}] for {n} waveform(s)")
    else:
        seed = req.seed
    if req.encoding not in ENCODING_BY_VALUE:
        raise _invalid("encoding", req.encoding, "AUDIO_ENCODING_WAV (1), AUDIO_ENCODING_FLAC (2), "
                       "AUDIO_ENCODING_PCM_F32LE (3) or unspecified (0, WAV)")
    items = pipe.make_items(prompt, negative, duration, guidance, seed, n)
    frames = pipe.geometry.latent_frames(duration)
    return RequestSpec(items, steps, solver, shift, ENCODING_BY_VALUE[req.encoding], frames)
