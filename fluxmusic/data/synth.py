"""A procedural music corpus: scored clips (melody, chords, bass, drums) rendered with simple synthesizers,
each with a caption in varied natural language and its attributes in a JSONL manifest.

Why procedural: the default model must be trained here on CPU with no downloads, and the evaluation needs
ground-truth attributes (tempo, register, instrument, mode, ...) that move measurable audio features.

Determinism: everything comes from ``numpy.random.SeedSequence`` streams, one per clip, split into
independent streams for attributes, the score, rendering noise and the caption. So changing one attribute
(``synth_clip(seed, {"tempo": "fast"})``) keeps the same melody, progression and phrasing, and a corpus is
byte-identical for a seed (16-bit PCM hides last-bit float differences).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fluxmusic.errors import FluxMusicError

# ---------------------------------------------------------------------------------------------------------
# Attribute vocabulary (the evaluation code imports these)
# ---------------------------------------------------------------------------------------------------------

INSTRUMENTS = ("piano", "electric piano", "bell", "plucked string", "synth pad", "organ", "square lead")
#: tempo word -> BPM range [lo, hi)
TEMPO_WORDS = {"slow": (60, 90), "medium": (90, 130), "fast": (130, 181)}
#: register -> MIDI pitch range of the melody [lo, hi]
REGISTERS = {"low": (40, 57), "mid": (57, 74), "high": (74, 91)}
MODES = ("major", "minor")
KEYS = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
DYNAMICS = ("soft", "loud")
#: boolean parts of the arrangement (the melody is always present)
PARTS = ("drums", "bass", "chords")
#: peak level of the final mix per dynamics word
DYNAMICS_PEAK = {"soft": 0.22, "loud": 0.9}

SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
#: chord progressions as 0-based scale degrees, one chord per bar
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 3), (0, 5, 3, 4), (0, 3, 0, 4), (1, 4, 0, 0), (0, 5, 1, 4)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 3, 6, 2), (0, 5, 3, 4), (0, 2, 3, 4)),
}
#: one-bar melody rhythms in eighth notes (each sums to 8)
RHYTHMS = (
    (2, 2, 2, 2), (1, 1, 2, 1, 1, 2), (3, 1, 2, 2), (2, 1, 1, 4), (1, 1, 1, 1, 2, 2), (4, 2, 2),
    (2, 2, 4), (3, 3, 2), (1, 1, 1, 1, 1, 1, 2), (2, 1, 1, 2, 2), (6, 2), (1, 2, 1, 2, 2),
)
#: 16-step drum patterns: (kick, snare, hat) step lists
DRUM_PATTERNS = (
    ((0, 8), (4, 12), tuple(range(0, 16, 2))),
    ((0, 6, 8), (4, 12), tuple(range(16))),
    ((0, 4, 8, 12), (4, 12), tuple(range(2, 16, 4))),
    ((0, 10), (4, 12), tuple(range(0, 16, 2))),
    ((0, 3, 8, 11), (4, 12), tuple(range(0, 16, 2))),
    ((0,), (8,), tuple(range(0, 16, 4))),
)
#: melody phrase forms over 4 bars ("A" repeats the first motif, "a" a varied repeat)
FORMS = ("AAAB", "AABA", "ABAB", "AaBA", "ABAC", "AaAB")

# --- caption vocabulary; synonyms never overlap between values of one attribute ---------------------------
INSTRUMENT_PHRASES = {
    "piano": ("piano", "acoustic piano", "grand piano"),
    "electric piano": ("electric piano", "Rhodes-style electric piano", "e-piano"),
    "bell": ("bell", "FM bell", "chime", "glockenspiel-like bell"),
    "plucked string": ("plucked string", "plucked guitar", "harp-like plucked string", "pizzicato string"),
    "synth pad": ("synth pad", "warm pad", "ambient synth pad", "string pad"),
    "organ": ("organ", "church organ", "electric organ", "drawbar organ"),
    "square lead": ("square lead", "square-wave synth", "chiptune lead", "8-bit square synth"),
}
TEMPO_PHRASES = {
    "slow": ("slow", "slow-paced", "laid-back", "unhurried", "leisurely"),
    "medium": ("medium-tempo", "moderate", "mid-tempo", "moderately paced"),
    "fast": ("fast", "upbeat", "quick", "energetic", "up-tempo", "brisk"),
}
MODE_PHRASES = {
    "major": ("happy", "cheerful", "uplifting", "joyful", "bright major-key"),
    "minor": ("sad", "melancholic", "somber", "dark", "moody minor-key"),
}
REGISTER_PHRASES = {
    "low": ("in a low register", "low-pitched", "deep and low", "in the low range"),
    "mid": ("in a middle register", "mid-range", "in the middle range", "mid-pitched"),
    "high": ("in a high register", "high-pitched", "in the high range", "up high"),
}
DYNAMICS_PHRASES = {
    "soft": ("soft", "quiet", "gentle", "softly played", "hushed"),
    "loud": ("loud", "powerful", "forceful", "loudly played", "strong"),
}
DRUMS_PHRASES = {
    True: ("with drums", "with a drum beat", "over a kick and snare groove", "with hi-hats, kick and snare"),
    False: ("without drums", "with no percussion", "no drums"),
}
BASS_PHRASES = ("with a bass line", "over a steady bassline", "with bass")
CHORDS_PHRASES = ("with chords", "over a chord progression", "with harmony")

ATTRIBUTE_KEYS = ("instrument", "tempo", "tempo_bpm", "register", "mode", "key", "dynamics") + PARTS


@dataclass(frozen=True)
class Note:
    onset: float  # beats
    dur: float  # beats
    pitch: int  # MIDI
    vel: float  # 0..1


# ---------------------------------------------------------------------------------------------------------
# Attributes
# ---------------------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_attributes(rng: np.random.Generator, overrides: dict | None = None) -> dict:
    """Draw every attribute (always the same draws, so overrides do not shift the others), then override."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(ATTRIBUTE_KEYS)
    if unknown:
        raise FluxMusicError(f"unknown synth attributes {sorted(unknown)}; allowed: {', '.join(ATTRIBUTE_KEYS)}")
    allowed = {"instrument": INSTRUMENTS, "tempo": tuple(TEMPO_WORDS), "register": tuple(REGISTERS),
               "mode": MODES, "key": KEYS, "dynamics": DYNAMICS}
    for k, vals in allowed.items():
        if k in overrides and overrides[k] not in vals:
            raise FluxMusicError(f"{k}={overrides[k]!r} is not allowed; choose one of: {', '.join(vals)}")
    for k in PARTS:
        if k in overrides and not isinstance(overrides[k], bool):
            raise FluxMusicError(f"{k} must be true or false, got {overrides[k]!r}")

    a = {
        "instrument": _choice(rng, INSTRUMENTS),
        "tempo": _choice(rng, tuple(TEMPO_WORDS)),
        "register": _choice(rng, tuple(REGISTERS)),
        "mode": _choice(rng, MODES),
        "key": _choice(rng, KEYS),
        "dynamics": _choice(rng, DYNAMICS),
    }
    u_tempo = float(rng.random())
    parts = {"drums": bool(rng.random() < 0.6), "bass": bool(rng.random() < 0.6),
             "chords": bool(rng.random() < 0.7)}
    a.update({k: v for k, v in overrides.items() if k in a})
    a.update(parts)
    a.update({k: overrides[k] for k in PARTS if k in overrides})
    if "tempo_bpm" in overrides:
        bpm = overrides["tempo_bpm"]
        if isinstance(bpm, bool) or not isinstance(bpm, (int, float)) or not 40 <= bpm <= 240:
            raise FluxMusicError(f"tempo_bpm must be a number in [40, 240], got {bpm!r}")
        a["tempo_bpm"] = int(round(bpm))
        if "tempo" not in overrides:
            a["tempo"] = next((w for w, (lo, hi) in TEMPO_WORDS.items() if lo <= bpm < hi),
                              "slow" if bpm < 60 else "fast")
    else:
        lo, hi = TEMPO_WORDS[a["tempo"]]
        a["tempo_bpm"] = int(lo + u_tempo * (hi - lo))
    return {k: a[k] for k in ATTRIBUTE_KEYS}


# ---------------------------------------------------------------------------------------------------------
# Score
# ---------------------------------------------------------------------------------------------------------


def _degree_to_midi(degree: int, scale: tuple[int, ...], tonic: int) -> int:
    return tonic + scale[degree % 7] + 12 * (degree // 7)


def make_score(rng: np.random.Generator, attrs: dict, bars: int) -> dict:
    """A tempo-independent score (times in beats, 4/4) for ``bars`` bars: melody, chords, bass, drum hits.

    The random draws do not depend on tempo, so a slow and a fast rendering share the same music.
    """
    scale = SCALES[attrs["mode"]]
    lo, hi = REGISTERS[attrs["register"]]
    root_pc = KEYS.index(attrs["key"])
    center = (lo + hi) // 2
    tonic = center - ((center - root_pc) % 12)  # tonic at or just below the register's center
    prog = _choice(rng, PROGRESSIONS[attrs["mode"]])
    form = _choice(rng, FORMS)

    def new_motif() -> list[tuple[float, float, int]]:
        rhythm = _choice(rng, RHYTHMS)
        steps = rng.choice((-2, -1, -1, 0, 1, 1, 2, 3, -3), size=len(rhythm))
        steps[0] = 0
        t, out, deg = 0.0, [], 0
        for r, s in zip(rhythm, steps):
            deg += int(s)
            out.append((t, r / 2.0, deg))
            t += r / 2.0
        return out

    motifs = {"A": new_motif(), "B": new_motif(), "C": new_motif()}
    varied = [(t, d, g + int(rng.choice((-1, 0, 1)))) for t, d, g in motifs["A"]]
    varied[0] = motifs["A"][0]
    motifs["a"] = varied
    chord_tone_choice = rng.integers(0, 3, size=bars)
    vels = 0.75 + 0.25 * rng.random(size=256)

    melody: list[Note] = []
    for bar in range(bars):
        chord_root = prog[bar % len(prog)]
        start_deg = chord_root + 2 * int(chord_tone_choice[bar])  # start each bar on a chord tone
        for j, (t, d, g) in enumerate(motifs[form[bar % len(form)]]):
            melody.append(Note(bar * 4 + t, d, _degree_to_midi(start_deg + g, scale, tonic),
                               float(vels[(bar * 8 + j) % 256])))
    # Fold whole notes into the register by octaves (keeps the contour, unlike clamping).
    melody = [Note(n.onset, n.dur, n.pitch + 12 * _octave_fix(n.pitch, lo, hi), n.vel) for n in melody]

    chord_style = int(rng.integers(3))  # 0 block whole bar, 1 on each beat, 2 arpeggio in eighths
    chords: list[Note] = []
    chord_tonic = max(tonic - 12, 43)
    for bar in range(bars):
        root = prog[bar % len(prog)]
        tones = [_degree_to_midi(root + k, scale, chord_tonic) for k in (0, 2, 4)]
        if chord_style == 0:
            chords += [Note(bar * 4, 4.0, p, 0.7) for p in tones]
        elif chord_style == 1:
            chords += [Note(bar * 4 + b, 0.9, p, 0.6) for b in range(4) for p in tones]
        else:
            chords += [Note(bar * 4 + i / 2, 0.5, tones[(0, 1, 2, 1)[i % 4]], 0.6) for i in range(8)]

    bass_style = int(rng.integers(3))  # 0 roots on half notes, 1 quarters, 2 eighths with octave jumps
    bass_tonic = 28 + root_pc
    bass: list[Note] = []
    for bar in range(bars):
        r = _degree_to_midi(prog[bar % len(prog)], scale, bass_tonic)
        if bass_style == 0:
            bass += [Note(bar * 4 + b, 2.0, r, 0.9) for b in (0, 2)]
        elif bass_style == 1:
            bass += [Note(bar * 4 + b, 1.0, r, 0.9) for b in range(4)]
        else:
            bass += [Note(bar * 4 + i / 2, 0.5, r + 12 * (i % 2), 0.85) for i in range(8)]

    kick, snare, hat = _choice(rng, DRUM_PATTERNS)
    drums = [(bar * 4 + s / 4, kind) for bar in range(bars)
             for kind, steps in (("kick", kick), ("snare", snare), ("hat", hat)) for s in steps]
    return {"melody": melody, "chords": chords, "bass": bass, "drums": drums,
            "progression": [int(d) for d in prog], "form": form}


def _octave_fix(p: int, lo: int, hi: int) -> int:
    k = 0
    while p + 12 * k < lo:
        k += 1
    while p + 12 * k > hi:
        k -= 1
    return k


# ---------------------------------------------------------------------------------------------------------
# Timbres: each returns a note buffer (vectorized over samples and partials)
# ---------------------------------------------------------------------------------------------------------


def _hz(pitch: float) -> float:
    return 440.0 * 2.0 ** ((pitch - 69) / 12)


def _env(n: int, sr: int, attack: float, gate: int, release: float) -> np.ndarray:
    """Linear attack, hold until ``gate`` samples, exponential release; all vectorized."""
    t = np.arange(n)
    a = np.minimum(1.0, t / max(1.0, attack * sr))
    rel = np.exp(-np.maximum(0, t - gate) / max(1.0, release * sr / 5))
    return a * rel


def _partials(f0: float, ratios: np.ndarray, amps: np.ndarray, decays: np.ndarray, n: int, sr: int,
              phase: np.ndarray | None = None) -> np.ndarray:
    """Sum of sinusoids f0*ratios with per-partial exponential decay (1/s), partials above 0.47*sr dropped."""
    keep = f0 * ratios < 0.47 * sr
    ratios, amps, decays = ratios[keep], amps[keep], decays[keep]
    if not len(ratios):
        return np.zeros(n)
    t = np.arange(n) / sr
    ph = 0.0 if phase is None else phase[keep][:, None]
    return (amps[:, None] * np.exp(-decays[:, None] * t) * np.sin(2 * np.pi * f0 * ratios[:, None] * t + ph)
            ).sum(0)


def _piano(f0, dur, vel, sr, rng):
    n = int(min(dur + 0.5, 3.0) * sr)
    k = np.arange(1, 13, dtype=np.float64)
    ratios = k * np.sqrt(1 + 0.0004 * k * k)  # stiff-string inharmonicity
    amps = (0.5 + vel) / k ** (2.3 - vel)  # louder -> brighter
    decays = 1.2 + 0.35 * k + f0 / 600
    y = _partials(f0, ratios, amps, decays, n, sr)
    return y * _env(n, sr, 0.003, int(dur * sr), 0.25)


def _fm(f0, n, sr, ratio, index0, index_decay, amp_decay, attack=0.002):
    t = np.arange(n) / sr
    index = index0 * np.exp(-index_decay * t)
    y = np.sin(2 * np.pi * f0 * t + index * np.sin(2 * np.pi * f0 * ratio * t))
    return y * np.exp(-amp_decay * t) * np.minimum(1.0, t / attack)


def _electric_piano(f0, dur, vel, sr, rng):
    n = int(min(dur + 0.4, 3.0) * sr)
    y = _fm(f0, n, sr, 1.0, 1.0 + 2.5 * vel, 3.0, 1.5) + 0.15 * _fm(f0, n, sr, 14.0, 0.8 * vel, 20.0, 6.0)
    return y * _env(n, sr, 0.002, int(dur * sr), 0.3)


def _bell(f0, dur, vel, sr, rng):
    n = int(min(max(dur, 1.0) + 1.0, 3.0) * sr)
    return _fm(f0, n, sr, 3.5, 2.0 + 3.0 * vel, 1.5, 1.2)


def _plucked(f0, dur, vel, sr, rng):
    """Karplus-Strong, vectorized one period at a time; fractional tuning by resampling the result."""
    n = int(min(dur + 0.6, 3.0) * sr)
    period = max(2, int(sr / f0 - 0.5))  # the 2-tap average adds half a sample of delay
    true_f = sr / (period + 0.5)
    m = int(n * f0 / true_f) + period + 2  # samples at the integer-period pitch before retuning
    y = np.zeros(m + period)
    burst = rng.uniform(-1, 1, period)
    burst = np.convolve(burst, (0.5, 0.5), mode="same") if vel < 0.85 else burst  # softer pluck = darker
    y[:period] = burst
    damp = 0.996 if f0 < 300 else 0.993
    for s in range(period, m, period):
        e = min(s + period, m)
        prev = y[s - period - 1:e - period - 1] if s > period else np.concatenate(([0.0], y[:e - period - 1]))
        y[s:e] = damp * 0.5 * (y[s - period:e - period] + prev)
    y = np.interp(np.arange(n) * (f0 / true_f), np.arange(len(y)), y)
    return y * _env(n, sr, 0.001, int(dur * sr), 0.15)


def _pad(f0, dur, vel, sr, rng):
    """Two detuned soft saws read from one band-limited wavetable (pads are long: summing partials per
    sample would dominate the corpus render time)."""
    n = int((dur + 0.6) * sr)
    size = 2048
    k = np.arange(1, 13, dtype=np.float64)
    k = k[f0 * 1.01 * k < 0.47 * sr]
    x = np.arange(size) / size
    table = (np.sin(2 * np.pi * k[:, None] * x + rng.uniform(0, 6.28, len(k))[:, None]) / k[:, None] ** 1.6).sum(0)
    t = np.arange(n) / sr
    y = sum(table[((f0 * 2 ** (c / 1200) * t + ph) * size).astype(np.int64) % size]
            for c, ph in ((-7.0, 0.0), (7.0, 0.37))) / 2
    return y * _env(n, sr, min(0.35, dur / 2), int(dur * sr), 0.6)


def _organ(f0, dur, vel, sr, rng):
    n = int((dur + 0.08) * sr)
    ratios = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0])
    amps = np.array([0.6, 1.0, 0.7, 0.45, 0.35, 0.2, 0.15])
    y = _partials(f0, ratios, amps, np.zeros(7), n, sr)
    return y * _env(n, sr, 0.008, int(dur * sr), 0.06)


def _square(f0, dur, vel, sr, rng):
    n = int((dur + 0.08) * sr)
    t = np.arange(n) / sr
    vib = 1 + 0.004 * np.sin(2 * np.pi * 5.5 * t) * np.minimum(1, t / 0.3)
    phase = 2 * np.pi * f0 * np.cumsum(vib) / sr
    k = np.arange(1, 30, 2, dtype=np.float64)
    k = k[f0 * k < 0.47 * sr]
    y = (np.sin(phase[None, :] * k[:, None]) / k[:, None]).sum(0)
    return y * _env(n, sr, 0.005, int(dur * sr), 0.05)


def _bass(f0, dur, vel, sr, rng):
    n = int((dur + 0.1) * sr)
    k = np.arange(1, 7, dtype=np.float64)
    y = _partials(f0, k, 1.0 / k ** 2, 2.0 + 1.5 * k, n, sr)
    return y * _env(n, sr, 0.004, int(dur * 0.9 * sr), 0.08)


TIMBRES = {
    "piano": _piano, "electric piano": _electric_piano, "bell": _bell, "plucked string": _plucked,
    "synth pad": _pad, "organ": _organ, "square lead": _square,
}


def _drum(kind: str, vel: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "kick":
        n = int(0.35 * sr)
        t = np.arange(n) / sr
        f = 45 + 110 * np.exp(-t / 0.04)
        return 1.1 * vel * np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / 0.12)
    if kind == "snare":
        n = int(0.25 * sr)
        t = np.arange(n) / sr
        noise = np.diff(rng.standard_normal(n + 1)) * 0.5  # tilt the noise toward highs
        return vel * (0.7 * noise * np.exp(-t / 0.06) + 0.5 * np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.03))
    n = int(0.06 * sr)
    t = np.arange(n) / sr
    noise = np.diff(rng.standard_normal(n + 2), 2) * 0.25  # second difference: a crude high-pass
    return 0.35 * vel * noise * np.exp(-t / 0.015)


# ---------------------------------------------------------------------------------------------------------
# Rendering and captions
# ---------------------------------------------------------------------------------------------------------


def _mix_in(out: np.ndarray, buf: np.ndarray, start: int, gain: float) -> None:
    if start >= len(out):
        return
    end = min(len(out), start + len(buf))
    out[start:end] += gain * buf[: end - start]


def render(score: dict, attrs: dict, rng: np.random.Generator, seconds: float, sr: int) -> np.ndarray:
    """Render the score at the clip's tempo and dynamics to float32 mono of ``round(seconds * sr)`` samples."""
    n = int(round(seconds * sr))
    spb = 60.0 / attrs["tempo_bpm"]
    voice = TIMBRES[attrs["instrument"]]
    soft = attrs["dynamics"] == "soft"
    out = np.zeros(n)

    def play(notes: Iterable[Note], synth, gain: float) -> None:
        for note in notes:
            start = int(round(note.onset * spb * sr))
            if start >= n:
                continue
            vel = note.vel * (0.6 if soft else 1.0)
            buf = synth(_hz(note.pitch), note.dur * spb, vel, sr, rng)
            fade = min(len(buf), int(0.01 * sr))  # no click where a buffer is cut off
            buf[len(buf) - fade:] *= np.linspace(1, 0, fade)
            _mix_in(out, buf, start, gain * vel)

    play(score["melody"], voice, 1.0)
    if attrs["chords"]:
        play(score["chords"], voice, 0.28)
    if attrs["bass"]:
        play(score["bass"], _bass, 0.55)
    if attrs["drums"]:
        hits = {k: [_drum(k, 1.0, sr, rng) for _ in range(4)] for k in ("kick", "snare", "hat")}
        for i, (beat, kind) in enumerate(score["drums"]):
            start = int(round(beat * spb * sr))
            _mix_in(out, hits[kind][i % 4], start, (0.55 if soft else 0.8) * (0.9 + 0.1 * ((i * 7) % 3)))
    # A short noise-tail reverb: cheap (one FFT convolution) and makes the timbres less sterile.
    from scipy.signal import fftconvolve

    tail = int(0.4 * sr)
    ir = rng.standard_normal(tail) * np.exp(-np.arange(tail) / (0.08 * sr)) * 0.02
    ir[0] = 1.0
    out = fftconvolve(out, ir)[:n]
    peak = np.abs(out).max()
    if peak > 0:
        out *= DYNAMICS_PEAK[attrs["dynamics"]] / peak
    return out.astype(np.float32)


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def make_caption(attrs: dict, rng: np.random.Generator) -> str:
    """A caption naming instrument, tempo, mode, register and dynamics (and drums; bass/chords/key/BPM
    sometimes), with phrasing, synonyms and order drawn from ``rng``."""
    inst = _choice(rng, INSTRUMENT_PHRASES[attrs["instrument"]])
    tempo = _choice(rng, TEMPO_PHRASES[attrs["tempo"]])
    mood = _choice(rng, MODE_PHRASES[attrs["mode"]])
    reg = _choice(rng, REGISTER_PHRASES[attrs["register"]])
    dyn = _choice(rng, DYNAMICS_PHRASES[attrs["dynamics"]])
    noun = _choice(rng, ("melody", "tune", "piece", "song", "track", "instrumental", "loop"))
    extras = [_choice(rng, DRUMS_PHRASES[attrs["drums"]])]
    if attrs["bass"] and rng.random() < 0.5:
        extras.append(_choice(rng, BASS_PHRASES))
    if attrs["chords"] and rng.random() < 0.4:
        extras.append(_choice(rng, CHORDS_PHRASES))
    if rng.random() < 0.35:
        extras.append(f"in {attrs['key']} {attrs['mode']}")
    if rng.random() < 0.3:
        extras.append(f"at {attrs['tempo_bpm']} BPM")
    rng.shuffle(extras)
    tail = ", ".join(extras)
    template = int(rng.integers(8))
    if template == 0:
        s = f"{_a(tempo)} {mood} {noun} played on {_a(inst)}, {reg}, {dyn}, {tail}"
    elif template == 1:
        s = f"{_a(dyn)} {inst} {noun}, {tempo} and {mood}, {reg}, {tail}"
    elif template == 2:
        s = f"{mood.capitalize()} music on {_a(inst)}, {reg}; {tempo}, {dyn}, {tail}"
    elif template == 3:
        s = f"{inst.capitalize()} playing {_a(tempo)}, {mood} {noun} {reg}, {dyn}, {tail}"
    elif template == 4:
        s = f"{_a(mood)}, {dyn} {noun} {reg} featuring {inst}, {tempo}, {tail}"
    elif template == 5:
        s = f"{tempo.capitalize()} {inst} {noun} {tail}, {mood} and {dyn}, {reg}"
    elif template == 6:
        s = f"{_a(tempo)} {noun} with {_a(inst)} {reg}, {mood} mood, {dyn} playing, {tail}"
    else:
        s = f"{_a(dyn)}, {mood} {inst} {noun}; {tempo}, {reg}, {tail}"
    s = s[0].upper() + s[1:]
    return s.rstrip(", ") + "."


def _seed_sequence(rng_or_seed: int | np.random.Generator | np.random.SeedSequence) -> np.random.SeedSequence:
    if isinstance(rng_or_seed, np.random.SeedSequence):
        return rng_or_seed
    if isinstance(rng_or_seed, np.random.Generator):
        return np.random.SeedSequence(int(rng_or_seed.integers(2**63)))
    if isinstance(rng_or_seed, (int, np.integer)) and not isinstance(rng_or_seed, bool):
        return np.random.SeedSequence(int(rng_or_seed))
    raise FluxMusicError(f"synth_clip needs an int seed or a numpy Generator, got {type(rng_or_seed).__name__}")


def synth_clip(
    rng_or_seed: int | np.random.Generator | np.random.SeedSequence,
    attributes: dict | None = None,
    seconds: float = 10.24,
    sr: int = 16000,
) -> tuple[np.ndarray, dict, str]:
    """Render one clip: (float32 mono wave, attributes, caption).

    ``attributes`` fixes any of ``ATTRIBUTE_KEYS``; the rest are drawn. With the same seed, clips that differ
    in one attribute share everything else (melody, progression, caption phrasing).
    """
    if not 0 < seconds <= 600:
        raise FluxMusicError(f"seconds must be in (0, 600], got {seconds}")
    s_attr, s_score, s_render, s_caption = (np.random.default_rng(s) for s in _seed_sequence(rng_or_seed).spawn(4))
    attrs = sample_attributes(s_attr, attributes)
    bars = int(math.ceil(seconds * 240 / 60 / 4)) + 1  # enough bars at the fastest tempo
    score = make_score(s_score, attrs, bars)
    wave = render(score, attrs, s_render, seconds, sr)
    attrs = {**attrs, "progression": score["progression"], "form": score["form"]}
    return wave, attrs, make_caption(attrs, s_caption)


# ---------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------

VAL_FRACTION = 0.05
FORMATS = ("wav", "flac")


def _render_job(job: tuple[int, int, float, int]) -> tuple[int, np.ndarray, dict, str]:
    seed, index, seconds, sr = job
    wave, attrs, caption = synth_clip(np.random.SeedSequence([seed, index]), seconds=seconds, sr=sr)
    return index, wave, attrs, caption


def make_corpus(
    out_dir: str | os.PathLike,
    hours: float,
    seed: int = 0,
    clip_seconds: float = 10.24,
    fmt: str = "wav",
    sr: int = 16000,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write ``clips/NNNNNN.<fmt>`` and ``manifest.jsonl`` (paths relative to ``out_dir``); returns the manifest.

    Clip ``i`` depends only on (seed, i), and the ~5 % validation split is a seeded permutation, so a corpus
    is byte-identical for a seed whatever ``workers`` is.
    """
    from fluxmusic.audio import write_audio

    if fmt not in FORMATS:
        raise FluxMusicError(f"format {fmt!r} is not allowed; choose one of: {', '.join(FORMATS)}")
    if not (hours > 0 and math.isfinite(hours)):
        raise FluxMusicError(f"--hours must be a positive number, got {hours}")
    if not 0 < clip_seconds <= 600:
        raise FluxMusicError(f"--clip-seconds must be in (0, 600], got {clip_seconds}")
    n = max(1, math.ceil(hours * 3600 / clip_seconds))
    out = Path(out_dir)
    try:
        (out / "clips").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FluxMusicError(f"cannot create output directory {out}: {e.strerror}") from e
    n_val = max(1, round(VAL_FRACTION * n)) if n >= 2 else 0
    val = set(np.random.default_rng([seed, 0x5A11]).permutation(n)[:n_val].tolist())

    jobs = [(seed, i, clip_seconds, sr) for i in range(n)]
    lines: list[str] = [""] * n
    t0 = time.perf_counter()
    pool = None
    if workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
        results = pool.imap(_render_job, jobs, chunksize=4)
    else:
        results = map(_render_job, jobs)
    try:
        for done, (i, wave, attrs, caption) in enumerate(results, start=1):
            rel = f"clips/{i:06d}.{fmt}"
            write_audio(out / rel, wave, sr)
            rec = {"path": rel, "caption": caption, "duration": clip_seconds, **attrs,
                   "seed": seed, "index": i, "split": "val" if i in val else "train"}
            lines[i] = json.dumps(rec, ensure_ascii=False)
            if progress and (done == n or done % 20 == 0):
                el = time.perf_counter() - t0
                audio_h = done * clip_seconds / 3600
                print(f"synth: {done}/{n} clips, {audio_h:.3f} h audio, {el:.1f} s, "
                      f"{done * clip_seconds / el:.0f}x real time", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.terminate()
    manifest = out / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, manifest)
    return manifest
