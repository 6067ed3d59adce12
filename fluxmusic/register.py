"""Register hint: the melody's register as a per-token input, the beat grid's companion (:mod:`fluxmusic.beat`).

From text alone the bundled model followed register words weakly (accuracy 0.53 on the held-out prompts that name
one, against 0.78 for the real clips): its T5 and CLAP were trained on ~2 k captions and a register is a shift
of a few semitones. With this hint it reaches 0.67 (docs/quality.md). A model with ``register_channels`` instead
gets, on every music token, a flag, the target
pitch of the melody, (MIDI - 66) / 12 -- the centre of the register the prompt names ("low", "mid", "high"
register; the rendered corpus's classes: top-voice median below 57, 57-73, 74 and up) -- and where that pitch lies
relative to the token's own frequency band (token centre minus the pitch's position on the latent frequency axis,
in tokens). The last one makes the hint local: RoPE gives attention the token positions, but a token's own
activations do not know its band, so a global scalar alone moved the melody by ~1 semitone per register after
450 fine-tuning steps. Training gives each clip its measured melody pitch where the cache has one
(``beat_phases --melody``), else the centre of its register class, withheld 20 % of the time; generation reads
the word from the prompt and asks for that class's centre. The three channels follow the beat grid's in the
context input, and classifier-free guidance withholds them from the
unconditional half as it does the beat.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

#: The flag, the target pitch (MIDI - REFERENCE_MIDI) / 12, the token's band centre minus the pitch's position.
REGISTER_CHANNELS = 3
REFERENCE_MIDI = 66.0
#: The melody pitch each register word stands for (the middle of the rendered corpus's class ranges).
REGISTER_MIDI: dict[str, float] = {"low": 50.0, "mid": 66.0, "high": 80.0}
_WORDS = {"low": "low", "bass": "low", "mid": "mid", "middle": "mid", "high": "high", "treble": "high"}
_PHRASE = re.compile(r"\b(low|bass|mid|middle|high|treble)(?:-| )(?:register|range)\b|\b(high|low)-pitched\b",
                     re.IGNORECASE)


def register_from_prompt(prompt: str) -> str | None:
    """The register a prompt names ("a melody in a high register", "mid register", "low-pitched"), else None."""
    m = _PHRASE.search(prompt)
    if m is None:
        return None
    return _WORDS[(m.group(1) or m.group(2)).lower()]


def register_midi(word: object) -> float:
    """The target pitch of a register word; NaN for anything else (no hint)."""
    return REGISTER_MIDI.get(word, float("nan")) if isinstance(word, str) else float("nan")


def register_features(midi: Tensor, grid_h: int, grid_w: int, sample_rate: int = 16000) -> Tensor:
    """Register-hint tokens [B, grid_h * grid_w, REGISTER_CHANNELS] in :func:`fluxmusic.latent.patchify`'s order:
    [1, (midi - 66) / 12, w + 0.5 - u] on the token of frequency column w, where u is the pitch's position on the
    latent frequency axis (its slaney-mel position over 0 .. sample_rate / 2, in tokens), or zeros where ``midi``
    [B] is NaN (no register given)."""
    from fluxmusic.audio import hz_to_mel

    midi = midi.double().reshape(-1)
    given = torch.isfinite(midi)
    safe = torch.where(given, midi, REFERENCE_MIDI)
    hz = 440.0 * 2.0 ** ((safe - 69.0) / 12.0)
    u = torch.from_numpy(hz_to_mel(hz.numpy()) / hz_to_mel(sample_rate / 2.0) * grid_w)
    band = torch.arange(grid_w, dtype=torch.float64)[None] + 0.5 - u[:, None]  # [B, grid_w]
    b = midi.shape[0]
    feats = torch.stack((torch.ones(b, grid_w, dtype=torch.float64), ((safe - REFERENCE_MIDI) / 12.0)[:, None]
                         .expand(-1, grid_w), band), dim=-1) * given[:, None, None]
    return feats[:, None].expand(-1, grid_h, -1, -1).reshape(b, grid_h * grid_w, REGISTER_CHANNELS).float()
