"""Register hint: the melody's register as a per-token input, the beat grid's companion (:mod:`fluxmusic.beat`).

The bundled model follows register words weakly from text alone (accuracy 0.53-0.58 on the held-out prompts that
name one, against 0.78 for the real clips): its T5 and CLAP were trained on ~2 k captions and a register is a shift
of a few semitones. A model with ``register_channels`` instead gets, on every music token, a flag and the target
pitch of the melody, (MIDI - 66) / 12: the centre of the register the prompt names ("low", "mid", "high"
register; the rendered corpus's classes: top-voice median below 57, 57-73, 74 and up). Training gives each clip
the centre of its own register class, withheld 20 % of the time; generation reads the word from the prompt.
The two channels follow the beat grid's in the context input, and classifier-free guidance withholds them from the
unconditional half as it does the beat.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

#: The flag, then the target pitch (MIDI - REFERENCE_MIDI) / 12.
REGISTER_CHANNELS = 2
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


def register_features(midi: Tensor, tokens: int) -> Tensor:
    """Register-hint tokens [B, tokens, REGISTER_CHANNELS]: [1, (midi - 66) / 12] on every token, or zeros where
    ``midi`` [B] is NaN (no register given)."""
    midi = midi.float().reshape(-1)
    given = torch.isfinite(midi)
    row = torch.stack((given.float(), torch.where(given, (midi - REFERENCE_MIDI) / 12.0, 0.0)), dim=-1)
    return row[:, None].expand(-1, tokens, -1).contiguous()
