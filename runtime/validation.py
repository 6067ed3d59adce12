"""Request validation: every field of a GenerateRequest checked against the server's limits.

A bad field raises :class:`FluxMusicError` whose message names the field, the value and the allowed range;
the service answers it with INVALID_ARGUMENT and keeps serving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fluxmusic.runtime.audio_codec import ENCODINGS, HEADER_BYTES, MAX_BYTES_PER_SAMPLE

from fluxmusic import sampling
from fluxmusic.errors import FluxMusicError
from fluxmusic.sampling import GenerationRequest, build_request, invalid

#: proto AudioEncoding value -> codec name (UNSPECIFIED serves WAV).
ENCODING_BY_VALUE = {0: "wav", 1: "wav", 2: "flac", 3: "pcm_f32le"}
assert set(ENCODING_BY_VALUE.values()) <= set(ENCODINGS)
_D = sampling.DEFAULT_LIMITS


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the sampling limits every front end applies (``fluxmusic.sampling``),
    of which a server may lower ``max_steps`` and ``max_waveforms``, and the model's duration and rate."""

    max_duration: float
    sample_rate: int
    max_steps: int = _D.max_steps
    min_guidance: float = _D.min_guidance
    max_guidance: float = _D.max_guidance
    min_shift: float = _D.min_shift
    max_shift: float = _D.max_shift
    max_waveforms: int = _D.max_waveforms
    max_prompt_chars: int = _D.max_prompt_chars
    max_cache_threshold: float = _D.max_cache_threshold
    solvers: tuple[str, ...] = field(default=_D.solvers)
    guidance_schedules: tuple[str, ...] = field(default=_D.guidance_schedules)
    max_long_duration: float = _D.max_long_duration
    max_audio_seconds: float = _D.max_audio_seconds
    max_resample: int = _D.max_resample
    #: encoded given audio per request (16 MiB: 300 s of 16 kHz 16-bit mono, or 90 s of 44.1 kHz 16-bit stereo)
    max_audio_bytes: int = 16 * 2**20
    #: image / story conditioning: encoded image bytes, decoded pixels, story characters, weights
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = _D.max_image_pixels
    max_story_chars: int = _D.max_story_chars
    max_media_weight: float = _D.max_media_weight

    @property
    def sampling(self) -> sampling.Limits:
        names = sampling.Limits.__dataclass_fields__
        return sampling.Limits(**{k: getattr(self, k) for k in names})

    @property
    def max_response_bytes(self) -> int:
        """The largest GenerateResponse: max waveforms of max duration in the widest encoding, plus slack
        for headers, seeds and timings. The server's send limit and the client's receive limit use it."""
        longest = max(self.max_duration, self.max_long_duration)  # long form: up to max_long_duration
        samples = math.ceil(longest * self.sample_rate) + 1
        return self.max_waveforms * (samples * MAX_BYTES_PER_SAMPLE + HEADER_BYTES) + 64 * 1024

    @property
    def max_request_bytes(self) -> int:
        # two prompts of up to 4 UTF-8 bytes per char, the given audio, and prompt sections (one per 2 s of song)
        sections = math.ceil(self.max_long_duration / 2) * (4 * self.max_prompt_chars + 32)
        media = self.max_image_bytes + 4 * self.max_story_chars
        return 2 * 4 * self.max_prompt_chars + self.max_audio_bytes + sections + media + 64 * 1024


@dataclass
class RequestSpec:
    """A validated request (its items and shared settings) and the audio encoding of its answer."""

    request: GenerationRequest
    encoding: str

    @property
    def items(self) -> tuple:
        return self.request.items

    @property
    def settings(self) -> sampling.SamplingSettings:
        return self.request.settings

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one batched solve."""
        return self.request.batch_key


def _opt(req, name: str):
    return getattr(req, name) if req.HasField(name) else None


def parse_request(req, limits: Limits, pipe) -> RequestSpec:
    """A ``fluxmusic.v1.GenerateRequest`` -> its spec, through the one resolution and validation
    (:func:`fluxmusic.sampling.build_request`). Only the wire's own conventions are handled here: an unset
    optional field and an empty string are "not given", ``num_waveforms`` 0 is 1."""
    if req.encoding not in ENCODING_BY_VALUE:
        raise invalid("encoding", req.encoding, "AUDIO_ENCODING_WAV (1), AUDIO_ENCODING_FLAC (2), "
                      "AUDIO_ENCODING_PCM_F32LE (3) or unspecified (0, WAV)")
    interval = None
    lo, hi = _opt(req, "guidance_interval_min"), _opt(req, "guidance_interval_max")
    if lo is not None or hi is not None:
        interval = (sampling.FULL_INTERVAL[0] if lo is None else lo, sampling.FULL_INTERVAL[1] if hi is None else hi)
    if len(req.audio) > limits.max_audio_bytes:
        raise invalid("audio", f"{len(req.audio)} bytes", f"at most {limits.max_audio_bytes} bytes of encoded audio")
    if len(req.image) > limits.max_image_bytes:
        raise invalid("image", f"{len(req.image)} bytes", f"at most {limits.max_image_bytes} bytes of encoded image")
    sections = None
    if req.sections:
        from fluxmusic.continuation import parse_section_strings

        sections = parse_section_strings(list(req.sections))
    request = build_request(
        pipe.defaults, pipe.geometry, req.prompt or (None if sections else req.prompt),
        num_waveforms=req.num_waveforms or 1,
        seed=_opt(req, "seed"),
        duration=_opt(req, "duration"),
        guidance=_opt(req, "guidance"),
        negative_prompt=req.negative_prompt or None,
        preset=req.preset or None,
        steps=_opt(req, "steps"),
        solver=req.solver or None,
        shift=_opt(req, "shift"),
        guidance_interval=interval,
        cache_threshold=_opt(req, "cache_threshold"),
        guidance_schedule=req.guidance_schedule or None,
        conditioning=req.conditioning or None,
        limits=limits.sampling,
        audio=bytes(req.audio) if req.audio else None,
        keep=req.keep or None,
        regenerate=req.regenerate or None,
        mode=req.mode or None,
        blend=_opt(req, "blend"),
        resample=_opt(req, "resample"),
        splice=_opt(req, "splice"),
        overlap=_opt(req, "overlap"),
        crossfade=_opt(req, "crossfade"),
        sections=sections,
        image=bytes(req.image) if req.image else None,
        story=req.story or None,
        image_weight=_opt(req, "image_weight"),
        story_weight=_opt(req, "story_weight"),
        bpm=_opt(req, "bpm"),
        register=req.register or None,
    )
    pipe.check_controls(request)  # an explicit bpm / register the model cannot take: INVALID_ARGUMENT now
    if request.media is not None:
        # a model without adapters: INVALID_ARGUMENT now, not an internal error later
        if not hasattr(pipe, "media_encoder"):
            raise FluxMusicError("this server's backend cannot condition on an image or a story")
        pipe.media_encoder()
    return RequestSpec(request, ENCODING_BY_VALUE[req.encoding])


__all__ = ["ENCODING_BY_VALUE", "FluxMusicError", "Limits", "RequestSpec", "parse_request"]
