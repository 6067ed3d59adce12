"""Attributes of corpus music, measured from audio (tempo, melody register) or read from a prompt.

Two attribute spaces, one per corpus: ``SYNTH`` (``fluxmusic data synth``: procedural instruments) and ``RENDER``
(``fluxmusic data render``: music21 scores played by FluidSynth; instrument FAMILY, tempo words over 40-240 BPM,
register of the top voice). An evaluation picks the space of its reference manifest (:func:`space_for`).

The estimators are plain signal processing (librosa), independent of any learned model, so they judge a
generator without sharing its biases. Their own accuracy on real corpus clips is the ceiling an evaluation
reports next to the model's (tempo octave errors, 75 vs 150 BPM, are the main limitation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fluxmusic.data import render as R
from fluxmusic.data.synth import (
    DRUMS_PHRASES,
    DYNAMICS_PHRASES,
    INSTRUMENT_PHRASES,
    MODE_PHRASES,
    REGISTER_PHRASES,
    REGISTERS,
    TEMPO_PHRASES,
    TEMPO_WORDS,
)
from fluxmusic.errors import FluxMusicError


@dataclass(frozen=True)
class TempoPrior:
    """Onset-autocorrelation tempo: a log-normal prior over BPM (``center``, width in ``octaves``) picks between
    octave-related autocorrelation peaks; ``half_beat_weight`` adds the half-beat (eighth-note) lag's evidence."""

    bpm_lo: float
    bpm_hi: float
    center: float
    octaves: float
    half_beat_weight: float


@dataclass(frozen=True)
class MelodyRule:
    """Which voice the register estimator follows on the harmonic-summation CQT salience: the loudest per frame
    (``top_ratio`` None) or the highest pitch whose salience is at least ``top_ratio`` x the frame's maximum (the
    top voice of a chorale); the median is taken over frames louder than ``loud`` x the loudest frame."""

    top_ratio: float | None = None
    loud: float = 0.2


@dataclass(frozen=True)
class AttributeSpace:
    """One corpus's attribute vocabulary (value -> caption phrases; also the zero-shot CLAP class texts), the
    zero-shot templates, the BPM and pitch ranges of its tempo and register words, and its tempo prior."""

    name: str
    vocabularies: dict[str, dict[str, tuple[str, ...]]]
    templates: dict[str, str]
    tempo_words: dict[str, tuple[float, float]]
    registers: dict[str, tuple[float, float]]
    tempo_prior: TempoPrior
    melody: MelodyRule = MelodyRule()

    def tempo_class(self, bpm: float) -> str | None:
        """The tempo word for a BPM (``tempo_words`` ranges, open-ended at both ends)."""
        if not np.isfinite(bpm):
            return None
        for w, (_lo, hi) in self.tempo_words.items():
            if bpm < hi:
                return w
        return list(self.tempo_words)[-1]

    def register_class(self, midi: float) -> str | None:
        """The register word for a melody pitch (boundaries where ``registers`` ranges meet)."""
        if not np.isfinite(midi):
            return None
        names = list(self.registers)
        for name, nxt in zip(names, names[1:]):
            if midi < self.registers[nxt][0]:
                return name
        return names[-1]


# Synthetic corpus: centre, width and the half-beat weight were fitted on 60 corpus clips (seed 7) and checked
# on 60 others (seed 8) and on the 32 held-out evaluation clips (seed 1): 77-80 % three-way accuracy, the misses
# almost all octave errors (fast clips with a quiet, low melody read at half tempo).
SYNTH = AttributeSpace(
    name="synth",
    vocabularies={
        "instrument": INSTRUMENT_PHRASES,
        "tempo": TEMPO_PHRASES,
        "register": REGISTER_PHRASES,
        "mode": MODE_PHRASES,
        "dynamics": DYNAMICS_PHRASES,
        "drums": {str(k).lower(): v for k, v in DRUMS_PHRASES.items()},
    },
    # Each phrase in a short caption made of corpus words (the CLAP saw only captions).
    templates={"instrument": "a melody played on {}", "tempo": "a {} melody", "register": "a melody {}",
               "mode": "a {} melody", "dynamics": "a {} melody", "drums": "a melody {}"},
    tempo_words=dict(TEMPO_WORDS),
    registers=dict(REGISTERS),
    tempo_prior=TempoPrior(55.0, 200.0, 150.0, 0.7, 2.0),
)


def _tempo_phrases() -> dict[str, tuple[str, ...]]:
    # The caption builder's words and phrases for each tempo word, the word itself first.
    return {w: tuple(dict.fromkeys((w, *R._TEMPO_PHRASES[w], *R._TEMPO_ADJ[w]))) for w in R.TEMPO_WORDS}


# Rendered corpus: tempo prior and melody rule fitted on 300 rendered training-split clips (grid search), checked
# on the 116 validation-split clips of /work/run/corpus (seed 0, 1200 files). Tempo: the synthetic prior gives
# 0.49 train / 0.60 val three-way accuracy, this one 0.58 / 0.59 (misses are octave errors: a score's quarter
# note is not always its felt beat). Register: the loudest voice 0.70 / 0.69, the top voice 0.77 / 0.78
# (majority class: 0.69 val). See docs/quality.md "Evaluation on real music".
RENDER = AttributeSpace(
    name="render",
    vocabularies={
        "instrument": {fam: tuple(phrases) for fam, (phrases, _programs) in R.INSTRUMENTS.items()},
        "tempo": _tempo_phrases(),
        "register": {"low": ("low register",), "mid": ("mid register", "middle register"),
                     "high": ("high register",)},
        "mode": {"major": ("major", "major key"), "minor": ("minor", "minor key")},
        "dynamics": {w: tuple(ph) for w, ph in R._DYN_ADJ.items()},
    },
    templates={"instrument": "music played on {}", "tempo": "{} music", "register": "music in the {}",
               "mode": "music in a {}", "dynamics": "{} music"},
    tempo_words=dict(R.TEMPO_WORDS),
    registers=dict(R.REGISTERS),
    tempo_prior=TempoPrior(40.0, 240.0, 130.0, 0.3, 0.5),
    melody=MelodyRule(top_ratio=0.8, loud=0.1),
)
SPACES = {"synth": SYNTH, "render": RENDER}

#: The synthetic corpus's vocabularies and templates (the default space; kept for existing callers).
VOCABULARIES = SYNTH.vocabularies
TEMPLATES = SYNTH.templates


def space_for(rows: Iterable[dict], name: str = "auto") -> AttributeSpace:
    """The attribute space of a manifest's rows: ``name`` when it is ``synth`` or ``render``; with ``auto``,
    ``render`` when the rows carry the renderer's keys (``work`` and ``collection``) or a render-only instrument
    family, else ``synth``."""
    if name != "auto":
        if name not in SPACES:
            raise FluxMusicError(f"unknown attribute space {name!r}; choose from auto, {', '.join(SPACES)}")
        return SPACES[name]
    render_only = set(RENDER.vocabularies["instrument"]) - set(SYNTH.vocabularies["instrument"])
    for row in rows:
        if ("work" in row and "collection" in row) or str(row.get("instrument", "")).lower() in render_only:
            return RENDER
    return SYNTH


_HOP = 160
# Melody pitch: harmonic-summation salience on a semitone CQT; the melody is the loudest voice, so the per-frame
# argmax over the melody range, then the median over the louder frames, estimates its centre (~80-85 %).
_PITCH_LO, _PITCH_HI = 40, 92  # MIDI range searched (the corpus melody spans 40-91; +2 octaves < Nyquist)
_HARMONICS = ((1, 1.0), (2, 0.5), (3, 0.33), (4, 0.25))


def onset_envelope(wave: np.ndarray, sr: int) -> np.ndarray:
    import librosa

    return librosa.onset.onset_strength(y=np.asarray(wave, dtype=np.float32), sr=sr, hop_length=_HOP)


def bpm_grid(prior: TempoPrior) -> np.ndarray:
    return np.arange(prior.bpm_lo, prior.bpm_hi, 0.5)


def tempo_evidence(wave: np.ndarray, sr: int, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Normalised onset-envelope autocorrelation at the beat lag and at the half-beat lag of every grid BPM;
    None for silence."""
    import librosa

    env = onset_envelope(wave, sr)
    env = env - env.mean()
    ac = librosa.autocorrelate(env)
    if ac[0] <= 0:
        return None
    ac = ac / ac[0]
    fps = sr / _HOP
    lags = np.arange(len(ac))
    return np.interp(fps * 60.0 / grid, lags, ac), np.interp(fps * 30.0 / grid, lags, ac)


def pick_tempo(beat: np.ndarray, half: np.ndarray, grid: np.ndarray, prior: TempoPrior) -> float:
    """The grid BPM maximising (beat-lag autocorrelation + weight x half-beat-lag autocorrelation) x prior."""
    weight = np.exp(-0.5 * (np.log2(grid / prior.center) / prior.octaves) ** 2)
    return float(grid[np.argmax((beat + prior.half_beat_weight * half) * weight)])


def estimate_tempo(wave: np.ndarray, sr: int, prior: TempoPrior = SYNTH.tempo_prior) -> float:
    """Beats per minute from the autocorrelation of the onset-strength envelope, weighted by ``prior``."""
    grid = bpm_grid(prior)
    ev = tempo_evidence(wave, sr, grid)
    return float("nan") if ev is None else pick_tempo(*ev, grid, prior)


def estimate_melody_pitch(wave: np.ndarray, sr: int, rule: MelodyRule = MelodyRule()) -> float:
    """Median MIDI pitch of the melody (harmonic-summation CQT salience): the loudest or the top voice (``rule``)."""
    import librosa

    wave = np.asarray(wave, dtype=np.float32)
    if not np.any(wave):
        return float("nan")
    n = _PITCH_HI - _PITCH_LO
    top_harmonic = int(round(12 * np.log2(_HARMONICS[-1][0])))
    c = np.abs(librosa.cqt(wave, sr=sr, hop_length=512, fmin=librosa.midi_to_hz(_PITCH_LO),
                           n_bins=n + top_harmonic, bins_per_octave=12))
    sal = np.zeros((n, c.shape[1]))
    for h, w in _HARMONICS:
        off = int(round(12 * np.log2(h)))
        sal += w * c[off:off + n]
    peak = sal.max(0)
    loud = peak > rule.loud * peak.max()
    if rule.top_ratio is None:
        voice = sal.argmax(0)
    else:  # the highest bin within top_ratio of the frame's strongest
        voice = n - 1 - np.argmax((sal >= rule.top_ratio * peak[None])[::-1], axis=0)
    return float(np.median(voice[loud] + _PITCH_LO))


def tempo_class(bpm: float, space: AttributeSpace = SYNTH) -> str | None:
    """The corpus's tempo word for a BPM."""
    return space.tempo_class(bpm)


def register_class(midi: float, space: AttributeSpace = SYNTH) -> str | None:
    """The corpus's register word for a melody pitch."""
    return space.register_class(midi)


def measure(wave: np.ndarray, sr: int, space: AttributeSpace = SYNTH) -> dict:
    """Measured attributes of one clip: BPM, melody pitch, and their classes in ``space``."""
    bpm, pitch = estimate_tempo(wave, sr, space.tempo_prior), estimate_melody_pitch(wave, sr, space.melody)
    return {"tempo_bpm": bpm, "melody_midi": pitch, "tempo": space.tempo_class(bpm),
            "register": space.register_class(pitch)}


def parse_attributes(text: str, space: AttributeSpace = SYNTH) -> dict[str, str]:
    """Attribute values a prompt states in the corpus vocabulary (longest phrase wins, so "string pad" is a
    synth pad and not a plucked string, and "flute, oboe, clarinet and bassoon" woodwinds and not a flute).
    Attributes it does not mention are absent."""
    low = " " + re.sub(r"[^a-z0-9-]+", " ", text.lower()) + " "
    found: dict[str, str] = {}
    for attr, values in space.vocabularies.items():
        best: tuple[int, str] | None = None
        for value, phrases in values.items():
            for ph in phrases:
                key = " " + re.sub(r"[^a-z0-9-]+", " ", ph.lower()).strip() + " "
                if key in low and (best is None or len(key) > best[0]):
                    best = (len(key), value)
        if best is not None:
            found[attr] = best[1]
    if "tempo" not in found:  # "at 104 BPM", "96 beats per minute": the number names the tempo word
        m = re.search(r"\b(\d{2,3}(?:\.\d+)?)\s*(?:bpm|beats per minute)\b", text.lower())
        if m:
            found["tempo"] = str(space.tempo_class(float(m.group(1))))
    return found


# Temperley's (Kostka-Payne) key profiles, C major / C minor, rotated to every tonic. On 40 held-out clips of
# the rendered corpus they name the manifest's key 45 % of the time against 33 % for Krumhansl-Kessler's (many
# misses are a fifth away or the relative key): short, sparse clips are hard, so consistency across windows
# also reports the correlation of the windows' chroma (:func:`mean_chroma`), which needs no key label.
_KEY_MAJOR = np.array([5.0, 2.0, 3.5, 2.0, 4.5, 4.0, 2.0, 4.5, 2.0, 3.5, 1.5, 4.0])
_KEY_MINOR = np.array([5.0, 2.0, 3.5, 4.5, 2.0, 4.0, 2.0, 4.5, 3.5, 2.0, 1.5, 4.0])
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_PC_ALIASES = {"Db": "C#", "D#": "Eb", "Gb": "F#", "G#": "Ab", "A#": "Bb", "Cb": "B", "B#": "C", "E#": "F",
               "Fb": "E"}


def mean_chroma(wave: np.ndarray, sr: int) -> np.ndarray | None:
    """The clip's mean CQT chroma [12] (C first); None for silence."""
    import librosa

    wave = np.asarray(wave, dtype=np.float32)
    if not np.any(wave):
        return None
    chroma = librosa.feature.chroma_cqt(y=wave, sr=sr, hop_length=512).mean(axis=1)
    return chroma if np.any(chroma) else None


def estimate_key(wave: np.ndarray, sr: int, chroma: np.ndarray | None = None) -> str | None:
    """The key of a clip as "D major" / "F# minor": the clip's mean CQT chroma (or ``chroma``) correlated with
    the key profiles of all 24 keys (the best correlation wins); None for silence."""
    chroma = mean_chroma(wave, sr) if chroma is None else chroma
    if chroma is None:
        return None
    best, name = -np.inf, None
    for mode, prof in (("major", _KEY_MAJOR), ("minor", _KEY_MINOR)):
        for tonic in range(12):
            r = float(np.corrcoef(chroma, np.roll(prof, tonic))[0, 1])
            if r > best:
                best, name = r, f"{PITCH_CLASSES[tonic]} {mode}"
    return name


def key_name(tonic: str, mode: str) -> str:
    """A manifest's ``key`` and ``mode`` fields in :func:`estimate_key`'s spelling ("Db", "major" -> "C# major")."""
    t = tonic.strip().replace("-", "b")
    t = t[:1].upper() + t[1:]
    return f"{_PC_ALIASES.get(t, t)} {mode.strip().lower()}"
