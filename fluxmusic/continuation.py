"""Audio in (continuation, infilling) and long form (windowed continuation): resolution, validation, masks,
window plans, seams and their measurements.

Training-free, for any rectified-flow checkpoint: the given audio is VAE-encoded (posterior mean times the
scaling factor) to the latent grid, and at every solver step the known latent frames are set to the flow's
path for that audio, z_t = (1 - t) x0 + t eps, with the same eps as the initial noise (RePaint-style; see
:class:`fluxmusic.flow.KnownRegion`). Long form generates window after window, each window keeping the tail of
the previous one as its known context, and joins the decoded windows with a crossfade inside the overlap.

:func:`resolve_audio` and :func:`resolve_long_form` are called by :func:`fluxmusic.sampling.build_request`
(the one validation every front end goes through); the pipeline runs what they return.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fluxmusic.errors import FluxMusicError

MODES = ("continue", "infill")
#: Defaults, measured on the bundled default (docs/continuation.md): a soft mask over the last 0.16 s of the
#: kept side of a seam, no re-noise iterations, the given audio spliced into the kept region with a 0.1 s fade.
DEFAULT_BLEND = 0.16
DEFAULT_RESAMPLE = 0
SPLICE_FADE = 0.1
MAX_BLEND = 2.0
#: Long form: seconds of the previous window kept as context, and the crossfade at each seam (inside it).
DEFAULT_OVERLAP = 5.12
DEFAULT_CROSSFADE = 0.5
#: Re-noise iterations (``resample``) run only at steps with t above this: structure forms at high noise,
#: and late re-noising only blurs detail that the known region already fixes.
RESAMPLE_T_MIN = 0.3

#: The audio a request may carry: a file path, encoded bytes (WAV/FLAC/OGG), a waveform at the model's rate,
#: or (waveform, sample rate).
AudioInput = str | os.PathLike | bytes | np.ndarray | tuple


class Section(NamedTuple):
    """A span of a long-form song and its prompt (seconds)."""

    start: float
    end: float
    prompt: str


@dataclass(frozen=True, eq=False)
class AudioContext:
    """Given audio, resolved: mono float32 at the model's rate, the kept spans (seconds, snapped to latent
    frames) and how seams are made. ``mode`` is "continue", "infill" or "custom" (other kept spans)."""

    wave: np.ndarray
    keep: tuple[tuple[float, float], ...]
    mode: str
    blend: float = DEFAULT_BLEND
    resample: int = DEFAULT_RESAMPLE
    splice: bool = True

    def describe(self) -> str:
        spans = ", ".join(f"{a:g}:{b:g}" for a, b in self.keep)
        return (f"{self.mode}: keep {spans} s, blend {self.blend:g} s, resample {self.resample}, "
                f"splice {'on' if self.splice else 'off'}")

    def frame_mask(self, geometry, frames: int) -> np.ndarray:
        """Soft mask over ``frames`` latent frames: 1 = known (kept), 0 = generated; within ``blend`` seconds of
        a seam the kept side ramps down towards it, trading fidelity there for a smoother join."""
        spf = geometry.seconds_per_latent_frame
        spans = [(round(a / spf), round(b / spf)) for a, b in self.keep]
        return soft_mask(frames, spans, round(self.blend / spf))

    def sample_weights(self, geometry, samples: int) -> np.ndarray:
        """Per-sample weight of the given audio when spliced into the output: 1 inside the kept spans, a linear
        fade over ``max(blend, SPLICE_FADE)`` seconds on the kept side of each seam, 0 elsewhere."""
        sr = geometry.sample_rate
        spans = [(round(a * sr), round(b * sr)) for a, b in self.keep]
        return soft_mask(samples, spans, round(max(self.blend, SPLICE_FADE) * sr))


def soft_mask(n: int, spans: Sequence[tuple[int, int]], ramp: int) -> np.ndarray:
    """1 on ``spans`` of [0, n) (0 elsewhere), ramping linearly down over ``ramp`` elements inside each span at
    every edge that borders a generated part (the ends of [0, n) border nothing: no ramp there)."""
    m = np.zeros(n, dtype=np.float32)
    for a, b in spans:
        a, b = max(0, a), min(n, b)
        if b <= a:
            continue
        seg = np.ones(b - a, dtype=np.float32)
        r = min(ramp, b - a)
        if r > 0:
            up = (np.arange(r, dtype=np.float32) + 1) / (r + 1)
            if a > 0:
                seg[:r] = np.minimum(seg[:r], up)
            if b < n:
                seg[-r:] = np.minimum(seg[-r:], up[::-1])
        m[a:b] = np.maximum(m[a:b], seg)
    return m


@dataclass(frozen=True)
class Window:
    """One window of a long-form solve: its first latent frame, length, known (context) frames and seed index."""

    index: int
    start: int
    frames: int
    context: int


@dataclass(frozen=True)
class LongForm:
    """Windowed continuation beyond the model's window: output seconds, window and overlap in latent frames,
    the crossfade in seconds and the prompt sections (empty: every window uses the item's prompt)."""

    duration: float
    window: int
    overlap: int
    crossfade: float
    sections: tuple[Section, ...] = ()

    def windows(self, geometry) -> list[Window]:
        total = geometry.latent_frames(self.duration)
        hop = self.window - self.overlap
        out, start = [Window(0, 0, min(self.window, total), 0)], 0
        while start + self.window < total:
            start += hop
            frames = min(self.window, geometry.patch * math.ceil((total - start) / geometry.patch))
            out.append(Window(len(out), start, frames, self.overlap))
        return out

    def prompt_at(self, seconds: float) -> str | None:
        """The section prompt at ``seconds`` (None without sections)."""
        for s in self.sections:
            if s.start - 1e-9 <= seconds < s.end:
                return s.prompt
        return self.sections[-1].prompt if self.sections else None

    def describe(self, geometry) -> str:
        spf = geometry.seconds_per_latent_frame
        n = len(self.windows(geometry))
        return (f"long form {self.duration:g} s: {n} window(s) of {self.window * spf:g} s, overlap "
                f"{self.overlap * spf:g} s, crossfade {self.crossfade:g} s, {len(self.sections) or 1} prompt "
                "section(s)")


def window_seed(seed: int, index: int) -> int:
    """The seed of window ``index`` of an item with ``seed``: window 0 uses the seed itself (one window is a
    plain generation); later ones a hash of (seed, index), so windows do not repeat one noise."""
    if index == 0:
        return seed
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


# ------------------------------------------------------------------------------------------------ parsing
_NUM = r"\s*(-?\d+(?:\.\d*)?|-?\.\d+)?\s*"
_SPAN = re.compile(rf"^{_NUM}:{_NUM}$")


def parse_spans(name: str, value: object, end_default: float) -> list[tuple[float, float]]:
    """``"0:6"``, ``"0:3,7:"`` (an empty end = ``end_default``, an empty start = 0), ``(0, 6)`` or a list of
    either -> [(start, end)] in seconds, unvalidated beyond their form."""
    from fluxmusic.sampling import invalid

    allowed = "spans START:END in seconds, e.g. '0:6', '6:' (to the end) or '0:3,7:10', or (start, end) pairs"
    items: list = []
    if isinstance(value, str):
        items = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, numbers.Real) for v in value):
        items = [tuple(value)]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    if not items:
        raise invalid(name, value, allowed)
    spans = []
    for it in items:
        if isinstance(it, str):
            m = _SPAN.match(it)
            if not m:
                raise invalid(name, value, allowed)
            a = float(m.group(1)) if m.group(1) else 0.0
            b = float(m.group(2)) if m.group(2) else float(end_default)
        elif (isinstance(it, (list, tuple)) and len(it) == 2
              and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in it)):
            a, b = float(it[0]), float(it[1])
        else:
            raise invalid(name, value, allowed)
        if not (math.isfinite(a) and math.isfinite(b)):
            raise invalid(name, value, allowed)
        spans.append((a, b))
    return spans


def parse_prompt_sections(text: str, source: str = "prompts file") -> list[Section] | None:
    """Lines ``START:END prompt`` (seconds; an empty END = to the end of the song) -> sections, or None when no
    line carries times (a plain prompts file: one prompt per line). Mixing the two is an error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    timed = [re.match(r"^(\d+(?:\.\d*)?)?\s*:\s*(\d+(?:\.\d*)?)?\s+(.+)$", ln) for ln in lines]
    if not any(timed):
        return None
    if not all(timed):
        bad = lines[[m is None for m in timed].index(True)]
        raise FluxMusicError(f"{source}: line {bad[:80]!r} has no START:END time while others do; give every "
                             "line as 'START:END prompt' (seconds, e.g. '0:30 a slow piano', '30: drums join')")
    return [Section(float(m.group(1) or 0.0), float(m.group(2)) if m.group(2) else math.inf, m.group(3).strip())
            for m in timed]


def parse_section_strings(lines: Sequence[str], name: str = "sections") -> list[Section]:
    """One ``"START:END prompt"`` string per section (the wire form of gRPC and Triton requests) -> sections;
    a string without times, or one that splits into several lines, is one error naming ``name``."""
    from fluxmusic.sampling import invalid

    sections = parse_prompt_sections("\n".join(lines), name)
    if sections is None or len(sections) != len(lines):
        raise invalid(name, list(lines)[:3], "'START:END prompt' strings in seconds")
    return sections


# ------------------------------------------------------------------------------------------------ audio
def decode_audio(audio: AudioInput, sample_rate: int, name: str = "audio") -> np.ndarray:
    """Any accepted audio input -> mono float32 at ``sample_rate`` (resampled), or one clear error."""
    from fluxmusic.audio import read_audio, resample
    from fluxmusic.sampling import invalid

    if isinstance(audio, (str, os.PathLike)):
        wave = read_audio(Path(audio), sample_rate)
    elif isinstance(audio, (bytes, bytearray, memoryview)):
        import soundfile as sf

        if not len(audio):
            raise FluxMusicError(f"{name} is empty (0 bytes); allowed: a WAV, FLAC or OGG file's bytes")
        try:
            data, sr = sf.read(io.BytesIO(bytes(audio)), dtype="float32", always_2d=True)
        except Exception as e:  # libsndfile's own error types
            raise FluxMusicError(f"{name} ({len(audio)} bytes) cannot be decoded: {e}; allowed: WAV, FLAC, OGG "
                                 "and other formats libsndfile reads") from e
        wave = resample(data.mean(axis=1, dtype=np.float32), int(sr), sample_rate)
    elif isinstance(audio, tuple) and len(audio) == 2 and isinstance(audio[1], numbers.Integral):
        arr = np.asarray(audio[0], dtype=np.float32)
        if arr.ndim == 2:
            arr = arr.mean(axis=0 if arr.shape[0] < arr.shape[1] else 1)
        if not 1000 <= int(audio[1]) <= 384000:
            raise invalid(f"{name} sample rate", audio[1], "an integer in [1000, 384000] Hz")
        wave = resample(arr, int(audio[1]), sample_rate)
    elif isinstance(audio, np.ndarray) or hasattr(audio, "numpy"):
        arr = np.asarray(audio.numpy() if hasattr(audio, "numpy") else audio, dtype=np.float32)
        wave = arr.reshape(-1) if arr.ndim == 2 and 1 in arr.shape else arr
    else:
        raise invalid(name, type(audio).__name__, "a file path, encoded audio bytes, a waveform at the model's "
                      "rate, or (waveform, sample rate)")
    if wave.ndim != 1 or wave.size == 0:
        raise FluxMusicError(f"{name} must be a non-empty mono waveform, got shape {tuple(wave.shape)}")
    if not np.isfinite(wave).all():
        raise FluxMusicError(f"{name} contains NaN or inf samples")
    return np.ascontiguousarray(wave, dtype=np.float32)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def resolve_audio(
    geometry,
    duration: float,
    audio: AudioInput | None,
    *,
    keep: object = None,
    regenerate: object = None,
    mode: str | None = None,
    blend: float | None = None,
    resample: int | None = None,
    splice: bool | None = None,
    limits=None,
) -> AudioContext | None:
    """Decode and check the given audio and its mask (see :func:`fluxmusic.sampling.build_request`).

    Kept spans are snapped to latent frames. ``mode`` "continue" keeps one span from 0 (by default the whole
    audio, up to the output); "infill" keeps audio on both sides of the regenerated span(s). Without ``mode``
    the spans decide ("continue" when none are given). Errors: audio missing or not decodable, too long, spans
    outside the audio or the output, empty spans, nothing kept or nothing left to generate.
    """
    from fluxmusic.sampling import DEFAULT_LIMITS, check_number, invalid

    limits = limits or DEFAULT_LIMITS
    if audio is None:
        given = {k: v for k, v in dict(keep=keep, regenerate=regenerate, mode=mode, blend=blend,
                                       resample=resample, splice=splice).items() if v is not None}
        if given:
            raise FluxMusicError(f"{', '.join(given)} need(s) given audio (audio=, --audio); none was given")
        return None
    if mode is not None and mode not in MODES:
        raise invalid("mode", mode, ", ".join(MODES))
    if keep is not None and regenerate is not None:
        raise FluxMusicError("give keep or regenerate, not both (each implies the other)")
    sr = geometry.sample_rate
    wave = decode_audio(audio, sr)
    seconds = len(wave) / sr
    if seconds > limits.max_audio_seconds + 1e-9:
        raise invalid("audio", f"{seconds:.2f} s", f"at most {limits.max_audio_seconds:g} s of audio")
    spf = geometry.seconds_per_latent_frame
    window = min(duration, geometry.max_duration)  # the kept spans lie in the first window
    out_frames = geometry.latent_frames(window)  # rounded up to the patch grid
    dur_frames = math.ceil(round(window / spf, 6))  # the frames the output really has (before that padding)
    audio_frames = math.floor(seconds / spf + 1e-6)  # whole latent frames of given audio
    if audio_frames < 1:
        raise invalid("audio", f"{seconds:.3f} s", f"at least one latent frame ({spf:g} s)")
    avail = min(seconds, window)

    def frames_of(name: str, spans: list[tuple[float, float]], value: object) -> list[tuple[int, int]]:
        out = []
        for a, b in spans:
            if not 0 <= a < b:
                raise invalid(name, value, "spans START:END with 0 <= START < END (seconds)")
            fa, fb = round(a / spf), round(b / spf)
            if fb <= fa:
                raise invalid(name, value, f"spans of at least one latent frame ({spf:g} s) after snapping to "
                              "the latent grid (this one is empty)")
            out.append((fa, fb))
        return _merge(out)

    if keep is not None:
        spans = frames_of("keep", parse_spans("keep", keep, avail), keep)
        for _, fb in spans:
            if fb > audio_frames or fb * spf > window + 1e-6:
                raise invalid("keep", keep, f"spans inside the given audio and the first window: [0, "
                              f"{min(audio_frames * spf, window):g}] s (the audio is {seconds:.2f} s)")
    elif regenerate is not None:
        regen = frames_of("regenerate", parse_spans("regenerate", regenerate, window), regenerate)
        if regen[-1][1] > out_frames:
            raise invalid("regenerate", regenerate, f"spans inside the output's first window [0, {window:g}] s")
        spans, cur = [], 0
        for fa, fb in regen:
            if fa > cur:
                spans.append((cur, fa))
            cur = fb
        if cur < dur_frames:
            spans.append((cur, dur_frames))
        for fa, fb in spans:
            if fb > audio_frames:
                raise invalid("regenerate", regenerate, f"spans that leave only given audio kept: it keeps "
                              f"{fa * spf:g}:{fb * spf:g} s but the audio is {seconds:.2f} s; regenerate up to the "
                              "end (e.g. 'START:') or give longer audio")
    elif mode == "infill":
        raise FluxMusicError("mode infill needs the span to regenerate: regenerate 'START:END' (--regenerate) or "
                             "the kept spans (--keep)")
    else:
        spans = [(0, min(audio_frames, out_frames))]
    if not spans:
        raise FluxMusicError("nothing of the given audio is kept; give keep spans inside the audio")
    kept = sum(b - a for a, b in spans)
    if kept >= dur_frames and duration <= geometry.max_duration + 1e-9:
        raise FluxMusicError(f"nothing to generate: the kept audio covers the whole {duration:g} s output; keep "
                             "less (--keep) or ask for a longer --duration")
    if duration > geometry.max_duration + 1e-9 and spans[-1][1] >= dur_frames:
        raise FluxMusicError(f"the kept audio fills the whole first window ({window:g} s); keep less so the "
                             "first window generates something")
    is_continue = len(spans) == 1 and spans[0][0] == 0
    is_infill = len(spans) >= 2  # merged spans: a regenerated gap with kept audio on both sides
    if mode == "continue" and not is_continue:
        raise invalid("keep" if keep is not None else "regenerate", keep if keep is not None else regenerate,
                      "for mode continue: one kept span from 0 (e.g. keep '0:6' or regenerate '6:')")
    if mode == "infill" and not is_infill:
        raise invalid("keep" if keep is not None else "regenerate", keep if keep is not None else regenerate,
                      "for mode infill: kept audio before and after the regenerated span (e.g. regenerate '4:6')")
    if mode == "infill" and duration > geometry.max_duration + 1e-9:
        raise FluxMusicError("mode infill works within one window; give a duration up to "
                             f"{geometry.max_duration:g} s")
    resolved_mode = mode or ("continue" if is_continue else "infill" if is_infill else "custom")
    blend_s = DEFAULT_BLEND if blend is None else check_number("blend", blend, 0.0, MAX_BLEND)
    if resample is None:
        resample = DEFAULT_RESAMPLE
    elif not (isinstance(resample, numbers.Integral) and not isinstance(resample, bool)
              and 0 <= resample <= limits.max_resample):
        raise invalid("resample", resample, f"an integer in [0, {limits.max_resample}]")
    if splice is not None and not isinstance(splice, bool):
        raise invalid("splice", splice, "true or false")
    keep_s = tuple((a * spf, b * spf) for a, b in spans)
    return AudioContext(wave[: geometry.num_samples(min(seconds, window))].copy(), keep_s, resolved_mode,
                        blend_s, int(resample), True if splice is None else splice)


def max_output_duration(geometry, limits) -> float:
    """The longest output a request may ask for (long form beyond the model's window)."""
    return max(float(geometry.max_duration), float(limits.max_long_duration))


def resolve_long_form(
    geometry,
    duration: float,
    context: AudioContext | None,
    *,
    overlap: float | None = None,
    crossfade: float | None = None,
    sections: Sequence | None = None,
    prompts: Sequence[str] = (),
    limits=None,
) -> LongForm | None:
    """The window plan of a request longer than the model's window (or with prompt ``sections``), else None."""
    from fluxmusic.sampling import DEFAULT_LIMITS, check_number, check_text, invalid

    limits = limits or DEFAULT_LIMITS
    long = duration > geometry.max_duration + 1e-9
    if not long and not sections:
        for name, v in (("overlap", overlap), ("crossfade", crossfade)):
            if v is not None:
                raise FluxMusicError(f"{name} applies to long form only (a duration above {geometry.max_duration:g}"
                                     " s or prompt sections)")
        return None
    spf = geometry.seconds_per_latent_frame
    window = geometry.max_latent_frames
    lo, hi = 2 * geometry.patch * spf, geometry.max_duration / 2
    ov = DEFAULT_OVERLAP if overlap is None else check_number("overlap", overlap, lo, hi)
    ov_frames = max(geometry.patch, geometry.patch * round(ov / spf / geometry.patch))
    xf = DEFAULT_CROSSFADE if crossfade is None else check_number("crossfade", crossfade, 0.0, ov_frames * spf)
    xf = min(xf, ov_frames * spf)
    secs: tuple[Section, ...] = ()
    if sections:
        if len(prompts) > 1:
            raise FluxMusicError("prompt sections give one song's prompts; give one prompt (or none) with them")
        out = []
        for i, s in enumerate(sections):
            if not (isinstance(s, (list, tuple)) and len(s) == 3):
                raise invalid("sections", s, "(start, end, prompt) triples")
            a = check_number(f"section {i} start", s[0], 0.0, math.inf) if not math.isinf(s[0]) else math.inf
            b = math.inf if isinstance(s[1], float) and math.isinf(s[1]) else check_number(
                f"section {i} end", s[1], 0.0, math.inf)
            p = check_text(f"section {i} prompt", s[2], limits, required=True)
            out.append(Section(a, b, p))
        if out[0].start != 0:
            raise invalid("section 0 start", out[0].start, "0 (sections cover the song from its start)")
        for i, s in enumerate(out):
            if not s.start < s.end:
                raise invalid(f"section {i}", f"{s.start:g}:{s.end:g}", "START < END")
            if i and abs(s.start - out[i - 1].end) > 1e-6:
                raise invalid(f"section {i} start", s.start, f"{out[i - 1].end:g} (the previous section's end; no "
                              "gaps or overlaps)")
        if out[-1].end < duration - 1e-6:
            raise invalid(f"section {len(out) - 1} end", out[-1].end, f">= the duration {duration:g} s (or empty: "
                          "to the end)")
        secs = tuple(out)
    if context is not None and context.mode == "infill" and long:
        raise FluxMusicError("mode infill works within one window; give a duration up to "
                             f"{geometry.max_duration:g} s")
    return LongForm(float(duration), window, int(ov_frames), float(xf), secs)


# ------------------------------------------------------------------------------------------------ measures
def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Waveform SNR of ``estimate`` against ``reference`` in dB (inf when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(estimate, dtype=np.float64)
    p_err = float(np.sum(err**2))
    return math.inf if p_err == 0 else 10 * math.log10(max(float(np.sum(ref**2)), 1e-30) / p_err)


def kept_snr(context: AudioContext, geometry, output: np.ndarray, exclude_fade: bool = False) -> float:
    """SNR (dB) of ``output`` against the given audio over the kept spans (optionally leaving out the blend /
    splice fade next to each seam)."""
    n = min(len(output), len(context.wave))
    w = context.sample_weights(geometry, len(output))[:n]
    sel = w >= 1.0 if exclude_fade else w > 0
    if exclude_fade:
        spf = geometry.seconds_per_latent_frame
        m = context.frame_mask(geometry, math.ceil(n / (geometry.sample_rate * spf)))
        sel &= np.repeat(m >= 1.0, round(geometry.sample_rate * spf))[:n]
    return snr_db(context.wave[:n][sel], output[:n][sel])


def kept_mel_snr(context: AudioContext, geometry, output: np.ndarray) -> float:
    """SNR (dB) of the mel magnitudes of ``output`` against the given audio over the kept mel frames outside
    the seam fades: the fidelity of a decoding whose phase is free (a mel vocoder's), where waveform SNR is
    near 0 dB however good it sounds."""
    import torch

    from fluxmusic.audio import MelConfig, log_mel

    n = min(len(output), len(context.wave))
    cfg = MelConfig(sample_rate=geometry.sample_rate, hop_length=geometry.hop_length, n_mels=geometry.mel_bins)
    ref = np.exp(log_mel(torch.from_numpy(context.wave[:n].copy()), cfg)[0].numpy())
    out = np.exp(log_mel(torch.from_numpy(np.asarray(output[:n], dtype=np.float32).copy()), cfg)[0].numpy())
    w = context.sample_weights(geometry, len(output))[:n]
    frames = min(len(ref), len(out))
    sel = (w[:: cfg.hop_length][:frames] >= 1.0)
    return snr_db(ref[:frames][sel], out[:frames][sel])


def seam_continuity(wave: np.ndarray, seam_seconds: float, sample_rate: int = 16000, span: float = 1.0) -> dict:
    """Spectral continuity at a seam: the log-mel distance and spectral flux between adjacent mel frames
    straddling ``seam_seconds`` (mean over the 3 frame pairs around it) against the same statistics over all
    adjacent pairs within ``span`` seconds on each side (inside the clip). A ratio near 1 is seamless."""
    import torch

    from fluxmusic.audio import MelConfig, log_mel

    cfg = MelConfig(sample_rate=sample_rate)
    mel = log_mel(torch.as_tensor(np.asarray(wave, dtype=np.float32)), cfg)[0].numpy()  # [frames, bins]
    diff = np.abs(np.diff(mel, axis=0)).mean(axis=1)  # L1 log-mel distance of frame t+1 vs t
    flux = np.sqrt((np.clip(np.diff(np.exp(mel), axis=0), 0, None) ** 2).sum(axis=1))  # onset-style flux
    f = int(round(seam_seconds * sample_rate / cfg.hop_length))
    k = int(round(span * sample_rate / cfg.hop_length))
    around = slice(max(0, f - 2), min(len(diff), f + 1))
    inside = np.r_[max(0, f - k) : max(0, f - 3), min(len(diff), f + 2) : min(len(diff), f + k)]
    d_in, fl_in = float(diff[inside].mean()), float(flux[inside].mean())
    d_s, fl_s = float(diff[around].mean()), float(flux[around].mean())
    return {"logmel_step_seam": d_s, "logmel_step_inside": d_in, "logmel_ratio": d_s / max(d_in, 1e-12),
            "flux_seam": fl_s, "flux_inside": fl_in, "flux_ratio": fl_s / max(fl_in, 1e-12)}
