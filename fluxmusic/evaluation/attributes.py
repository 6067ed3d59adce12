"""Attributes of synthetic-corpus music, measured from audio (tempo, melody register) or read from a prompt.

The estimators are plain signal processing (librosa), independent of any learned model, so they judge a
generator without sharing its biases. Their own accuracy on real corpus clips is the ceiling an evaluation
reports next to the model's (tempo octave errors, 75 vs 150 BPM, are the main limitation).
"""

from __future__ import annotations

import re

import numpy as np

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

#: Attribute -> value -> phrases, the corpus's caption vocabulary (also the zero-shot CLAP class texts).
VOCABULARIES: dict[str, dict[str, tuple[str, ...]]] = {
    "instrument": INSTRUMENT_PHRASES,
    "tempo": TEMPO_PHRASES,
    "register": REGISTER_PHRASES,
    "mode": MODE_PHRASES,
    "dynamics": DYNAMICS_PHRASES,
    "drums": {str(k).lower(): v for k, v in DRUMS_PHRASES.items()},
}
#: Zero-shot class texts: each phrase in a short caption made of corpus words (the CLAP saw only captions).
TEMPLATES = {
    "instrument": "a melody played on {}",
    "tempo": "a {} melody",
    "register": "a melody {}",
    "mode": "a {} melody",
    "dynamics": "a {} melody",
    "drums": "a melody {}",
}

# Onset-autocorrelation tempo: a log-normal prior over BPM picks between octave-related peaks. Centre, width
# and the weight of the half-beat (eighth-note) lag were fitted on 60 corpus clips (seed 7) and checked on 60
# others (seed 8) and on the 32 held-out evaluation clips (seed 1): 77-80 % three-way accuracy, the misses
# almost all octave errors (fast clips with a quiet, low melody read at half tempo).
_HOP = 160
_BPM_GRID = np.arange(55.0, 200.0, 0.5)
_PRIOR_CENTER_BPM = 150.0
_PRIOR_OCTAVES = 0.7
_HALF_BEAT_WEIGHT = 2.0
# Melody pitch: harmonic-summation salience on a semitone CQT; the melody is the loudest voice, so the per-frame
# argmax over the melody range, then the median over the louder frames, estimates its centre (~80-85 %).
_PITCH_LO, _PITCH_HI = 40, 92  # MIDI range searched (the corpus melody spans 40-91; +2 octaves < Nyquist)
_HARMONICS = ((1, 1.0), (2, 0.5), (3, 0.33), (4, 0.25))


def onset_envelope(wave: np.ndarray, sr: int) -> np.ndarray:
    import librosa

    return librosa.onset.onset_strength(y=np.asarray(wave, dtype=np.float32), sr=sr, hop_length=_HOP)


def estimate_tempo(wave: np.ndarray, sr: int) -> float:
    """Beats per minute from the autocorrelation of the onset-strength envelope."""
    import librosa

    env = onset_envelope(wave, sr)
    env = env - env.mean()
    ac = librosa.autocorrelate(env)
    if ac[0] <= 0:
        return float("nan")  # silence
    ac = ac / ac[0]
    fps = sr / _HOP
    lags = np.arange(len(ac))
    beat = np.interp(fps * 60.0 / _BPM_GRID, lags, ac)
    half = np.interp(fps * 30.0 / _BPM_GRID, lags, ac)
    prior = np.exp(-0.5 * (np.log2(_BPM_GRID / _PRIOR_CENTER_BPM) / _PRIOR_OCTAVES) ** 2)
    return float(_BPM_GRID[np.argmax((beat + _HALF_BEAT_WEIGHT * half) * prior)])


def estimate_melody_pitch(wave: np.ndarray, sr: int) -> float:
    """Median MIDI pitch of the predominant voice (harmonic-summation CQT salience)."""
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
    loud = peak > 0.2 * peak.max()
    return float(np.median(sal.argmax(0)[loud] + _PITCH_LO))


def tempo_class(bpm: float) -> str | None:
    """The corpus's tempo word for a BPM (ranges of ``TEMPO_WORDS``, open-ended at both ends)."""
    if not np.isfinite(bpm):
        return None
    words = list(TEMPO_WORDS)
    for w in words:
        if bpm < TEMPO_WORDS[w][1]:
            return w
    return words[-1]


def register_class(midi: float) -> str | None:
    """The corpus's register word for a melody pitch (boundaries where ``REGISTERS`` ranges meet)."""
    if not np.isfinite(midi):
        return None
    names = list(REGISTERS)
    for name, nxt in zip(names, names[1:]):
        if midi < REGISTERS[nxt][0]:
            return name
    return names[-1]


def measure(wave: np.ndarray, sr: int) -> dict:
    """Measured attributes of one clip: BPM, melody pitch, and their corpus classes."""
    bpm, pitch = estimate_tempo(wave, sr), estimate_melody_pitch(wave, sr)
    return {"tempo_bpm": bpm, "melody_midi": pitch, "tempo": tempo_class(bpm), "register": register_class(pitch)}


def parse_attributes(text: str) -> dict[str, str]:
    """Attribute values a prompt states in the corpus vocabulary (longest phrase wins, so "string pad" is a
    synth pad and not a plucked string). Attributes it does not mention are absent."""
    low = " " + re.sub(r"[^a-z0-9-]+", " ", text.lower()) + " "
    found: dict[str, str] = {}
    for attr, values in VOCABULARIES.items():
        best: tuple[int, str] | None = None
        for value, phrases in values.items():
            for ph in phrases:
                key = " " + re.sub(r"[^a-z0-9-]+", " ", ph.lower()).strip() + " "
                if key in low and (best is None or len(key) > best[0]):
                    best = (len(key), value)
        if best is not None:
            found[attr] = best[1]
    return found
