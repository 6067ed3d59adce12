"""Training manifest loader errors, and deterministic fixed-length crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from fluxmusic.data.manifest import AudioClipDataset, load_manifest
from fluxmusic.errors import FluxMusicError

SR = 16000


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a").mkdir()
    ramp = (np.arange(3 * SR) / (3 * SR)).astype(np.float32)  # values identify sample positions
    sf.write(str(tmp_path / "a" / "long.wav"), ramp, SR, subtype="FLOAT")
    sf.write(str(tmp_path / "short.flac"), np.full(SR // 2, 0.25, np.float32), SR)
    m = _write(tmp_path / "manifest.jsonl", [
        {"path": "a/long.wav", "caption": "a ramp", "genre": "test"},
        "",
        {"path": "short.flac", "caption": "short", "start": 0.1},
        {"path": "a/long.wav", "caption": "region", "start": 1.0, "duration": 1.5},
    ])
    return m


def test_load_manifest_ok(corpus):
    entries = load_manifest(corpus)
    assert [e.caption for e in entries] == ["a ramp", "short", "region"]
    assert entries[0].path == (corpus.parent / "a" / "long.wav").resolve()
    assert entries[0].attributes == {"genre": "test"} and entries[0].line == 1
    assert entries[2].start == 1.0 and entries[2].duration == 1.5 and entries[2].line == 4


def test_load_manifest_reports_every_bad_line(tmp_path, corpus):
    (tmp_path / "junk.wav").write_bytes(b"RIFF....garbage" * 20)
    m = _write(tmp_path / "bad.jsonl", [
        {"path": "a/long.wav", "caption": "fine"},
        {"path": "gone.wav", "caption": "missing file"},
        {"path": "junk.wav", "caption": "unreadable"},
        '{"path": "a/long.wav", "caption": ',
        {"path": "a/long.wav"},
        {"path": "a/long.wav", "caption": "x", "start": -1},
        ["not", "an", "object"],
    ])
    with pytest.raises(FluxMusicError) as info:
        load_manifest(m)
    msg = str(info.value)
    assert msg.startswith("6 bad manifest entries")
    assert f"{m}:2: audio file not found: {tmp_path / 'gone.wav'}" in msg
    assert f"{m}:3: cannot read audio file {tmp_path / 'junk.wav'}" in msg
    assert f"{m}:4: invalid JSON" in msg
    assert f'{m}:5: a/long.wav: missing "caption"' in msg
    assert f'{m}:6: a/long.wav: "start" must be' in msg
    assert f"{m}:7: expected a JSON object" in msg
    assert ":1:" not in msg


def test_missing_manifest(tmp_path):
    with pytest.raises(FluxMusicError, match="manifest not found"):
        load_manifest(tmp_path / "none.jsonl")


def test_crops_exact_length_deterministic_and_in_region(corpus):
    entries = load_manifest(corpus)
    ds = AudioClipDataset(entries, clip_samples=SR, sr=SR, seed=7)
    a = ds[0]["audio"].numpy()
    assert a.shape == (SR,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, AudioClipDataset(entries, SR, SR, seed=7)[0]["audio"].numpy())
    # A contiguous slice of the ramp: consecutive samples differ by exactly one step.
    np.testing.assert_allclose(np.diff(a), 1 / (3 * SR), atol=1e-6)
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        starts.add(round(float(ds[0]["audio"][0]) * 3 * SR))
    assert len(starts) > 1  # epochs give different crops
    ds.set_epoch(2)
    again = AudioClipDataset(entries, SR, SR, seed=7)
    again.set_epoch(2)
    np.testing.assert_array_equal(ds[2]["audio"].numpy(), again[2]["audio"].numpy())
    # Region crop stays inside [1.0 s, 2.5 s).
    for epoch in range(4):
        ds.set_epoch(epoch)
        r = ds[2]["audio"].numpy() * 3 * SR
        assert r[0] >= SR - 1 and r[-1] < 2.5 * SR
    # Short source (0.5 s minus 0.1 s start) is zero-padded to the clip length.
    item = ds[1]
    assert item["caption"] == "short"
    s = item["audio"].numpy()
    n = int(0.4 * SR)
    np.testing.assert_allclose(s[:n], 0.25, atol=1e-4)
    assert not s[n + 1:].any()


def test_crop_resamples_to_target_rate(tmp_path):
    sf.write(str(tmp_path / "x.wav"), np.zeros((44100 * 2, 2), np.float32), 44100)
    _write(tmp_path / "m.jsonl", [{"path": "x.wav", "caption": "stereo 44.1k"}])
    ds = AudioClipDataset(load_manifest(tmp_path / "m.jsonl"), clip_samples=SR, sr=SR)
    assert ds[0]["audio"].shape == (SR,)
