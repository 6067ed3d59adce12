"""In-memory audio bytes for responses: WAV/FLAC (16-bit PCM, via soundfile) and raw float32 PCM."""

from __future__ import annotations

import io

import numpy as np

from fluxmusic.errors import FluxMusicError

#: encoding name -> (soundfile format, subtype); None = raw little-endian float32 samples (bit-exact).
ENCODINGS: dict[str, tuple[str, str] | None] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "pcm_f32le": None,
}
#: Upper bound on encoded bytes per sample (float32 is the largest), and per-file header slack.
MAX_BYTES_PER_SAMPLE = 4
HEADER_BYTES = 1024


def encode_audio(wave: np.ndarray, sample_rate: int, encoding: str) -> bytes:
    """Mono float waveform -> bytes in ``encoding``; refuses NaN/inf so a broken output never looks valid."""
    if encoding not in ENCODINGS:
        raise FluxMusicError(f"audio encoding {encoding!r} is not supported; allowed: {', '.join(ENCODINGS)}")
    wave = np.asarray(wave, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise ValueError("the generated waveform contains NaN or inf")
    fmt = ENCODINGS[encoding]
    if fmt is None:
        return wave.astype("<f4", copy=False).tobytes()
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), int(sample_rate), format=fmt[0], subtype=fmt[1])
    return buf.getvalue()


def decode_audio(data: bytes, encoding: str) -> np.ndarray:
    """Bytes from :func:`encode_audio` -> float32 mono waveform."""
    if encoding not in ENCODINGS:
        raise FluxMusicError(f"audio encoding {encoding!r} is not supported; allowed: {', '.join(ENCODINGS)}")
    if ENCODINGS[encoding] is None:
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    import soundfile as sf

    wave, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return wave.mean(axis=1, dtype=np.float32)
