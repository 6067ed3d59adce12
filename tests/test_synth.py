"""Procedural corpus: determinism, captions that match attributes, controlled attributes, the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fluxmusic.cli import main
from fluxmusic.data import synth
from fluxmusic.data.manifest import load_manifest
from fluxmusic.errors import FluxMusicError

PHRASES = {
    "instrument": synth.INSTRUMENT_PHRASES,
    "tempo": synth.TEMPO_PHRASES,
    "mode": synth.MODE_PHRASES,
    "register": synth.REGISTER_PHRASES,
    "dynamics": synth.DYNAMICS_PHRASES,
}


def _mentions(caption: str, phrase: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(phrase.lower()) + r"(?![\w-])", caption.lower()) is not None


def _check_caption(caption: str, attrs: dict) -> None:
    for key, table in PHRASES.items():
        said = {v for v, phrases in table.items() if any(_mentions(caption, p) for p in phrases)}
        if key == "instrument":  # "electric piano" contains "piano": keep the most specific match
            said = {v for v in said if not any(v != w and v in w for w in said)}
        assert said == {attrs[key]}, (key, caption, attrs)
    assert any(_mentions(caption, p) for p in synth.DRUMS_PHRASES[attrs["drums"]]), caption


def test_clip_shape_level_and_caption():
    for seed in range(8):
        wave, attrs, caption = synth.synth_clip(seed, {"instrument": synth.INSTRUMENTS[seed % 7]})
        assert wave.shape == (163840,) and wave.dtype == np.float32 and np.isfinite(wave).all()
        assert np.abs(wave).max() == pytest.approx(synth.DYNAMICS_PEAK[attrs["dynamics"]], rel=1e-5)
        lo, hi = synth.TEMPO_WORDS[attrs["tempo"]]
        assert lo <= attrs["tempo_bpm"] < hi
        _check_caption(caption, attrs)


def test_same_seed_same_clip_and_controlled_attributes():
    w1, a1, c1 = synth.synth_clip(5)
    w2, a2, c2 = synth.synth_clip(5)
    np.testing.assert_array_equal(w1, w2)
    assert (a1, c1) == (a2, c2)
    slow, a_slow, _ = synth.synth_clip(11, {"tempo": "slow", "drums": False})
    fast, a_fast, _ = synth.synth_clip(11, {"tempo": "fast", "drums": False})
    same = ("instrument", "register", "mode", "key", "dynamics", "progression", "form")
    assert all(a_slow[k] == a_fast[k] for k in same)
    assert a_slow["tempo_bpm"] < 90 <= 130 <= a_fast["tempo_bpm"]

    librosa = pytest.importorskip("librosa")

    def onsets_per_second(w):
        return len(librosa.onset.onset_detect(y=w, sr=16000, units="time")) / (len(w) / 16000)

    assert onsets_per_second(fast) > 1.5 * onsets_per_second(slow)  # measured 7.3 vs 3.7

    def centroid(w):
        spec = np.abs(np.fft.rfft(w))
        return float((spec * np.fft.rfftfreq(len(w), 1 / 16000)).sum() / spec.sum())

    base = {"instrument": "organ", "drums": False, "bass": False, "chords": False}
    low = synth.synth_clip(3, {**base, "register": "low"})[0]
    high = synth.synth_clip(3, {**base, "register": "high"})[0]
    assert centroid(high) > 2 * centroid(low)


def test_bad_attributes():
    with pytest.raises(FluxMusicError, match="instrument='kazoo' is not allowed; choose one of: piano"):
        synth.synth_clip(0, {"instrument": "kazoo"})
    with pytest.raises(FluxMusicError, match="unknown synth attributes"):
        synth.synth_clip(0, {"genre": "jazz"})


def test_cli_corpus_deterministic(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["data", "synth", "--out", str(a), "--hours", "0.01", "--seed", "4", "--clip-seconds", "4"]) == 0
    assert "wrote 9 clips" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(b), "--hours", "0.01", "--seed", "4", "--clip-seconds", "4",
                 "--format", "wav"]) == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 10  # 9 clips + manifest, no temporary files
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    entries = load_manifest(a / "manifest.jsonl")
    assert len(entries) == 9 and entries[0].path.name == "000000.wav"
    recs = [json.loads(x) for x in (a / "manifest.jsonl").read_text().splitlines()]
    assert sum(r["split"] == "val" for r in recs) == 1
    for r in recs:
        assert not r["path"].startswith("/")
        _check_caption(r["caption"], r)
    assert main(["data", "synth", "--out", str(tmp_path / "c"), "--hours", "0.01", "--seed", "5",
                 "--clip-seconds", "4"]) == 0
    assert (tmp_path / "c" / "clips" / "000000.wav").read_bytes() != (a / "clips" / "000000.wav").read_bytes()


def test_cli_errors(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--hours", "0.01", "--format", "mp3"]) == 2
    assert "format 'mp3' is not allowed; choose one of: wav, flac" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--hours", "0"]) == 2
    (tmp_path / "f").write_text("x")
    assert main(["data", "synth", "--out", str(tmp_path / "f" / "sub"), "--hours", "0.01"]) == 2
    assert "cannot create output directory" in capsys.readouterr().err
