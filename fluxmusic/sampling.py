"""Sampling settings (DESIGN.md 6b): one object, resolved once, validated once, expanded once.

Every front end (``fluxmusic generate``, :class:`fluxmusic.pipeline.FluxMusicPipeline`, the gRPC service and
the Triton BLS model) turns its wire format into keyword arguments and calls :func:`build_request`, which

1. resolves :class:`SamplingSettings` from, lowest precedence first: the built-in fallbacks, the model's
   defaults (``model_index.json`` ``defaults``), a named preset, and the caller's explicit values;
2. validates every value with one set of rules (:class:`Limits`), raising one :class:`FluxMusicError` that
   names the field, echoes the value (at most ``ECHO_CHARS`` characters) and says what is allowed;
3. expands prompts x waveforms into :class:`GenerationItem` s with their seeds, guidance and duration.

The pipeline's ``generate`` then takes the :class:`GenerationRequest` as it is: nothing is defaulted or
checked again downstream.

Precedence is the same for every field, the preset included: a value the caller gives explicitly wins over
the preset (``--official --steps 20`` is 20 Euler steps, and the CLI prints the settings it ran with). An
absent value is ``None`` in Python; "no time shift" is ``shift=1.0`` (or ``"none"``), which resolves to
``shift=None`` (the uniform schedule), so "the model's default" and "no shift" are distinct everywhere.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from fluxmusic.beat import BPM_RANGE, prompt_bpm
from fluxmusic.continuation import (
    AudioContext,
    AudioInput,
    LongForm,
    Section,
    max_output_duration,
    resolve_audio,
    resolve_long_form,
)
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import GUIDANCE_SCHEDULES, SHIFT_RANGE, SOLVERS, function_evaluations
from fluxmusic.register import REGISTER_MIDI, register_from_prompt

MAX_SEED = 2**63 - 1
#: The seed that asks for a random one (as does leaving the seed out), on every front end.
RANDOM_SEED = -1
#: Echoed values in errors are cut to this many characters (a 12 KB value would overflow gRPC metadata).
ECHO_CHARS = 100
OFFICIAL_NEGATIVE_PROMPT = "low quality, gentle"
FULL_INTERVAL = (0.0, 1.0)

#: The official FluxMusic sampler (sample.py): 50 uniform Euler steps, guidance 7, negative prompt
#: "low quality, gentle", no time shift, guidance at every step, no caching. As a preset it replaces every
#: field, so it is the same sampler on any model whatever that model's defaults are.
OFFICIAL = {
    "steps": 50,
    "guidance": 7.0,
    "solver": "euler",
    "shift": None,
    "negative_prompt": OFFICIAL_NEGATIVE_PROMPT,
    "guidance_interval": FULL_INTERVAL,
    "cache_threshold": 0.0,
    "guidance_schedule": "constant",
}
PRESETS: dict[str, dict] = {"official": OFFICIAL}

#: Used where neither the model nor a preset nor the caller says (what a model directory without
#: ``defaults`` gets): the official sampler, except the negative prompt "" (the null condition as trained).
FALLBACK = {**OFFICIAL, "negative_prompt": ""}
FIELDS = tuple(FALLBACK)


@dataclass(frozen=True)
class Limits:
    """What a request may ask for. The same defaults apply on every front end; a server may lower
    ``max_steps`` and ``max_waveforms`` by option (``fluxmusic serve --max-steps/--max-waveforms``)."""

    max_steps: int = 1000
    min_guidance: float = 0.0
    max_guidance: float = 100.0
    min_shift: float = SHIFT_RANGE[0]
    max_shift: float = SHIFT_RANGE[1]
    max_waveforms: int = 8
    max_prompt_chars: int = 2000
    max_cache_threshold: float = 1.0
    solvers: tuple[str, ...] = field(default=SOLVERS)
    guidance_schedules: tuple[str, ...] = field(default=GUIDANCE_SCHEDULES)
    #: long form (windowed continuation): the longest output, and the longest given audio, in seconds
    max_long_duration: float = 300.0
    max_audio_seconds: float = 300.0
    max_resample: int = 10
    #: image / story conditioning (``fluxmusic.adapters``): decoded pixels, encoded bytes, story characters
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 32 * 2**20
    max_story_chars: int = 20000
    max_media_weight: float = 100.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample, resolved and validated. ``shift`` None is the uniform (unshifted) schedule.

    ``guidance`` and ``negative_prompt`` are the request's; the per-waveform values live in the items (a batch
    of several requests shares everything else: :meth:`batch_key`).
    """

    steps: int
    guidance: float
    solver: str
    shift: float | None
    negative_prompt: str
    guidance_interval: tuple[float, float] = FULL_INTERVAL
    cache_threshold: float = 0.0
    guidance_schedule: str = "constant"
    preset: str | None = None

    @property
    def evaluations(self) -> int:
        """Model evaluations per clip before step caching (each one batched cond + uncond inside the interval)."""
        return function_evaluations(self.steps, self.solver)

    @property
    def batch_key(self) -> tuple:
        """Requests whose settings have equal keys can share one batched solve."""
        return (self.steps, self.solver, self.shift, self.guidance_interval, self.cache_threshold,
                self.guidance_schedule)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["guidance_interval"] = list(self.guidance_interval)
        return d

    def describe(self) -> str:
        """One line for logs and the CLI."""
        parts = [f"{self.steps} {self.solver} steps", f"guidance {self.guidance:g}",
                 "no shift" if self.shift is None else f"shift {self.shift:g}",
                 f"negative prompt {self.negative_prompt!r}"]
        if self.guidance_interval != FULL_INTERVAL:
            parts.append(f"guidance interval t in [{self.guidance_interval[0]:g}, {self.guidance_interval[1]:g}]")
        if self.cache_threshold:
            parts.append(f"step cache {self.cache_threshold:g}")
        if self.guidance_schedule != "constant":
            parts.append(f"{self.guidance_schedule} guidance schedule")
        return ", ".join(parts) + (f" (preset {self.preset})" if self.preset else "")


@dataclass(frozen=True)
class GenerationItem:
    """One waveform to make: its prompt, negative prompt, guidance, seed, duration and the tempo of its beat grid
    (``bpm``: given, or read from the prompt; None = no beat given; used by models with beat-grid conditioning) and
    the melody's register (``register``: "low", "mid" or "high", given or read from the prompt; models with a
    register hint)."""

    prompt: str
    negative_prompt: str
    guidance: float
    seed: int
    duration: float
    bpm: float | None = None
    register: str | None = None


#: How known latent frames condition a solve (continuation, infilling, long form): "trained" = the model's context
#: input (models with ``context_channels``) plus the replacement, "replace" = training-free only, "auto" = trained
#: when the model has it.
CONDITIONING = ("auto", "trained", "replace")


@dataclass(frozen=True)
class MediaContext:
    """Image and / or story conditioning of a request (issue 18), decoded and checked: the pipeline maps them into
    the conditioning space with the model's adapters and mixes them with the text prompt, weighted (the prompt
    weighs 1; an empty prompt 0)."""

    image: object = None  # RGB uint8 [H, W, 3] (numpy), or None
    story: str | None = None
    image_weight: float = 1.0
    story_weight: float = 1.0

    def describe(self) -> str:
        parts = []
        if self.image is not None:
            parts.append(f"image {self.image.shape[1]} x {self.image.shape[0]} (weight {self.image_weight:g})")
        if self.story is not None:
            parts.append(f"story of {len(self.story)} characters (weight {self.story_weight:g})")
        return ", ".join(parts)


@dataclass(frozen=True)
class GenerationRequest:
    """A resolved, validated request: its waveforms and the settings they share.

    ``audio`` (continuation / infilling) and ``long_form`` (windowed generation beyond the model's window) are
    resolved by :func:`fluxmusic.continuation.resolve_audio` / :func:`~fluxmusic.continuation.resolve_long_form`
    from :func:`build_request`; for long form ``latent_frames`` is one window's.
    """

    items: tuple[GenerationItem, ...]
    settings: SamplingSettings
    latent_frames: int
    audio: AudioContext | None = None
    long_form: LongForm | None = None
    media: MediaContext | None = None
    #: how known latent frames condition the solve: "auto" (trained when the model takes a context input,
    #: else replace), "trained" or "replace" (training-free, RePaint-style); see docs/continuation.md
    conditioning: str = "auto"
    #: controls set explicitly ("bpm", "register"): the model must take them (one read from a prompt need not)
    controls: tuple[str, ...] = ()

    @property
    def batch_key(self) -> tuple:
        extra = ()
        if self.audio is not None or self.long_form is not None or self.media is not None:
            extra = (id(self),)  # their own given audio / window plan / image: never batched with another request
        return (*self.settings.batch_key, self.latent_frames, *extra)

    def merged(self, others: Sequence[GenerationRequest]) -> GenerationRequest:
        """This request and ``others`` (same batch key) as one batch, items in order."""
        items = list(self.items)
        for o in others:
            if o.batch_key != self.batch_key:
                raise FluxMusicError(f"cannot batch settings {o.batch_key} with {self.batch_key}")
            items += o.items
        controls = tuple(sorted(set(self.controls).union(*(o.controls for o in others))))
        return GenerationRequest(tuple(items), self.settings, self.latent_frames, self.audio, self.long_form,
                                 self.media, self.conditioning, controls)


# ------------------------------------------------------------------------------------------------ checks
def echo(value: object) -> str:
    """``repr(value)``, cut to :data:`ECHO_CHARS` characters."""
    r = repr(value)
    return r if len(r) <= ECHO_CHARS else r[: ECHO_CHARS - 3] + "..."


def invalid(name: str, value: object, allowed: str) -> FluxMusicError:
    return FluxMusicError(f"{name} {echo(value)} is invalid; allowed: {allowed}")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_number(name: str, v: object, lo: float, hi: float) -> float:
    if not (_is_number(v) and math.isfinite(v) and lo <= v <= hi):
        raise invalid(name, v, f"a number in [{lo:g}, {hi:g}]")
    return float(v)


def check_text(name: str, v: object, limits: Limits, required: bool) -> str:
    if not isinstance(v, str):
        raise invalid(name, v, "a string")
    if required and not v.strip():
        raise invalid(name, v, f"a non-empty string of at most {limits.max_prompt_chars} characters")
    if len(v) > limits.max_prompt_chars:
        raise invalid(name, v, f"at most {limits.max_prompt_chars} characters (got {len(v)})")
    return v


def _check_field(name: str, v: object, limits: Limits, label: str = "") -> object:
    """One settings field, checked (and normalised: shift 1 / "none" -> None)."""
    what = f"{label}{name}"
    if name == "steps":
        if not (_is_int(v) and 1 <= v <= limits.max_steps):
            raise invalid(what, v, f"an integer in [1, {limits.max_steps}]")
        return int(v)
    if name == "guidance":
        return check_number(what, v, limits.min_guidance, limits.max_guidance)
    if name == "solver":
        if v not in limits.solvers:
            raise invalid(what, v, ", ".join(limits.solvers))
        return v
    if name == "shift":
        if v is None or (isinstance(v, str) and v.lower() == "none"):
            return None
        s = check_number(what, v, limits.min_shift, limits.max_shift)
        return None if s == 1.0 else s  # t' = t exactly: the uniform schedule, computed the official way
    if name == "negative_prompt":
        return check_text(what, v, limits, required=False)
    if name == "guidance_interval":
        ok = isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(e) and math.isfinite(e) for e in v)
        if not ok or not 0.0 <= v[0] < v[1] <= 1.0:
            raise invalid(what, v, "two times (t_min, t_max) with 0 <= t_min < t_max <= 1")
        return (float(v[0]), float(v[1]))
    if name == "cache_threshold":
        return check_number(what, v, 0.0, limits.max_cache_threshold)
    if name == "guidance_schedule":
        if v not in limits.guidance_schedules:
            raise invalid(what, v, ", ".join(limits.guidance_schedules))
        return v
    raise FluxMusicError(f"unknown sampling setting {name!r}; known: {', '.join(FIELDS)}")


# ------------------------------------------------------------------------------------------------ resolution
def resolve_settings(
    defaults: Mapping | None = None,
    preset: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    **overrides: object,
) -> SamplingSettings:
    """Fallbacks < the model's ``defaults`` < ``preset`` < the caller's ``overrides`` (None = not given).

    For the caller, "no time shift" is ``shift=1.0`` or ``"none"``; in the model's defaults ``"shift": null``
    is no shift too. Unknown keys in the model's defaults are ignored (newer model directories may carry
    more); unknown overrides are an error.
    """
    if preset is not None and preset not in PRESETS:
        raise invalid("preset", preset, ", ".join(PRESETS) + " (or none)")
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise FluxMusicError(f"unknown sampling setting(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    values = dict(FALLBACK)
    for k, v in (defaults or {}).items():
        if k in FIELDS:
            values[k] = _check_field(k, v, limits, "the model's default ")
    if preset is not None:
        values.update(PRESETS[preset])
    for k, v in overrides.items():
        if v is not None:
            values[k] = v
    checked = {k: _check_field(k, v, limits) for k, v in values.items()}
    return SamplingSettings(**checked, preset=preset)


def check_duration(duration: object, geometry, max_duration: float | None = None) -> float:
    """Seconds in [one latent frame, the model's maximum (or ``max_duration``: long form)]; None is the
    model's maximum."""
    if duration is None:
        return float(geometry.max_duration)
    lo, hi = geometry.seconds_per_latent_frame, max_duration or geometry.max_duration
    # 1e-9 slack on both ends: 10.24 and 0.08 are not exact in binary.
    if not (_is_number(duration) and math.isfinite(duration) and lo - 1e-9 <= duration <= hi + 1e-9):
        what = "the model's maximum" if max_duration is None else f"{hi:g} s (long form: windowed continuation)"
        raise invalid("duration", duration, f"seconds in [{lo:g}, {hi:g}] (one latent frame to {what})")
    return min(max(float(duration), lo), float(hi))


def resolve_seeds(seed: object, n: int) -> list[int]:
    """Seeds of ``n`` waveforms. None or -1: random; S: S, S+1, ...; a list: one per waveform (-1 = random)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise invalid("seed", seed, f"one seed per waveform ({n})")
        return [resolve_seeds(s, 1)[0] for s in seed]
    max_base = MAX_SEED - (n - 1)  # waveform i uses seed + i, which must stay a valid seed
    if seed is None or (_is_int(seed) and seed == RANDOM_SEED):
        base = secrets.randbelow(max_base + 1)
    elif _is_int(seed) and 0 <= seed <= max_base:
        base = int(seed)
    else:
        raise invalid("seed", seed, f"-1 (random) or an integer in [0, {max_base}] for {n} waveform(s)")
    return [base + i for i in range(n)]


def build_request(
    defaults: Mapping | None,
    geometry,
    prompt: str | Sequence[str],
    *,
    num_waveforms: int = 1,
    seed: int | Sequence[int] | None = None,
    duration: float | None = None,
    guidance: float | Sequence[float] | None = None,
    negative_prompt: str | None = None,
    preset: str | None = None,
    steps: int | None = None,
    solver: str | None = None,
    shift: float | str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    cache_threshold: float | None = None,
    guidance_schedule: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    audio: AudioInput | None = None,
    keep: object = None,
    regenerate: object = None,
    mode: str | None = None,
    blend: float | None = None,
    resample: int | None = None,
    splice: bool | None = None,
    overlap: float | None = None,
    crossfade: float | None = None,
    sections: Sequence[Section] | None = None,
    image: object = None,
    story: str | None = None,
    image_weight: float | None = None,
    story_weight: float | None = None,
    conditioning: str | None = None,
    bpm: float | None = None,
    register: str | None = None,
) -> GenerationRequest:
    """Resolve, validate and expand one request (see the module doc). ``geometry`` is the model's
    :class:`fluxmusic.latent.LatentGeometry`; ``guidance`` may be one value per waveform.

    Audio in and long form (:mod:`fluxmusic.continuation`): ``audio`` (a path, encoded bytes, a waveform at the
    model's rate or ``(waveform, rate)``) with ``keep`` / ``regenerate`` (seconds ``"0:6"``, ``(0, 6)`` or a
    list of them) or ``mode`` ("continue", "infill"), ``blend`` (seconds of soft mask inside the kept side of
    each seam), ``resample`` (re-noise iterations per step), ``splice`` (put the given audio itself in the kept
    region); a ``duration`` beyond the model's window is generated in windows of ``overlap`` seconds of context
    joined by ``crossfade`` seconds, with ``sections`` [(start, end, prompt)] changing the prompt over time.

    Image and story (:mod:`fluxmusic.adapters`; the model needs ``adapters/``): ``image`` (a path, encoded bytes,
    a PIL image or an RGB array) and ``story`` (a long text) condition every waveform, mixed with the prompt in
    the conditioning space with weights ``image_weight`` / ``story_weight`` (default 1; the prompt weighs 1); the
    prompt may then be empty.
    ``conditioning`` ("auto", "trained", "replace") picks how the known frames condition the solve.
    ``bpm`` sets the tempo of the beat grid of a model with beat-grid conditioning (:mod:`fluxmusic.beat`); unset,
    each prompt's own tempo ("96 BPM", "slow", "allegro", ...) is used, and none where it names none. ``register``
    ("low", "mid", "high") likewise sets the register hint of a model that takes one (:mod:`fluxmusic.register`);
    unset, the register the prompt names ("in a high register").
    """
    media = resolve_media(image, story, image_weight, story_weight, limits)
    if media is not None and prompt in (None, ""):
        prompt = ""  # the image / story alone conditions
    if sections:
        if prompt not in (None, "", [], ()):
            raise FluxMusicError("give the prompt or prompt sections, not both (the sections give the prompts)")
        first = sections[0] if isinstance(sections, (list, tuple)) else None
        if not (isinstance(first, (list, tuple)) and len(first) == 3):
            raise invalid("sections", sections, "a list of (start, end, prompt) triples in seconds")
        prompt = sections[0][2]
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts:
        raise invalid("prompt", prompt, "a non-empty string or a non-empty list of them")
    for i, p in enumerate(prompts):
        check_text("prompt" if len(prompts) == 1 else f"prompt {i}", p, limits, required=media is None)
    if not (_is_int(num_waveforms) and 1 <= num_waveforms <= limits.max_waveforms):
        raise invalid("num_waveforms", num_waveforms, f"an integer in [1, {limits.max_waveforms}]")
    per_item_guidance = isinstance(guidance, (list, tuple))
    settings = resolve_settings(
        defaults, preset, limits, steps=steps, guidance=None if per_item_guidance else guidance, solver=solver,
        shift=shift, negative_prompt=negative_prompt, guidance_interval=guidance_interval,
        cache_threshold=cache_threshold, guidance_schedule=guidance_schedule,
    )
    expanded = [p for p in prompts for _ in range(num_waveforms)]
    n = len(expanded)
    if per_item_guidance:
        if len(guidance) != n:
            raise invalid("guidance", guidance, f"one number or one per waveform ({n})")
        gs = [check_number("guidance", g, limits.min_guidance, limits.max_guidance) for g in guidance]
    else:
        gs = [settings.guidance] * n
    seconds = check_duration(duration, geometry, max_output_duration(geometry, limits))
    seeds = resolve_seeds(seed, n)
    given_bpm = None if bpm is None else check_number("bpm", bpm, *BPM_RANGE)
    if register is not None and register not in REGISTER_MIDI:
        raise invalid("register", register, ", ".join(REGISTER_MIDI) + " (or unset: the prompt's)")
    items = tuple(
        GenerationItem(p, settings.negative_prompt, g, s, seconds, prompt_bpm(p) if given_bpm is None else given_bpm,
                       register or register_from_prompt(p))
        for p, g, s in zip(expanded, gs, seeds)
    )
    context = resolve_audio(
        geometry, seconds, audio, keep=keep, regenerate=regenerate, mode=mode, blend=blend, resample=resample,
        splice=splice, limits=limits,
    )
    long_form = resolve_long_form(
        geometry, seconds, context, overlap=overlap, crossfade=crossfade, sections=sections, prompts=prompts,
        limits=limits,
    )
    frames = geometry.max_latent_frames if long_form is not None else geometry.latent_frames(seconds)
    if conditioning is not None:
        if conditioning not in CONDITIONING:
            raise invalid("conditioning", conditioning, ", ".join(CONDITIONING))
        if context is None and long_form is None:
            raise FluxMusicError("conditioning applies to given audio (audio=, --audio) or long form only")
    controls = tuple(name for name, v in (("bpm", bpm), ("register", register)) if v is not None)
    return GenerationRequest(items, settings, frames, context, long_form, media, conditioning or "auto", controls)


def resolve_media(image: object, story: object, image_weight: object, story_weight: object,
                  limits: Limits = DEFAULT_LIMITS) -> MediaContext | None:
    """Decode and check the image (pixel and byte limits, before decoding the pixels) and the story."""
    from fluxmusic.adapters import check_story, decode_image

    if image is None and story is None:
        for name, w in (("image_weight", image_weight), ("story_weight", story_weight)):
            if w is not None:
                raise invalid(name, w, "only together with an image / a story")
        return None
    if image is None and image_weight is not None:
        raise invalid("image_weight", image_weight, "only together with an image")
    if story is None and story_weight is not None:
        raise invalid("story_weight", story_weight, "only together with a story")
    weights = [check_number(n, 1.0 if w is None else w, 0.0, limits.max_media_weight)
               for n, w in (("image_weight", image_weight), ("story_weight", story_weight))]
    pixels = decode_image(image, limits.max_image_pixels, limits.max_image_bytes) if image is not None else None
    text = check_story(story, limits.max_story_chars) if story is not None else None
    return MediaContext(pixels, text, weights[0], weights[1])
