"""The real-music corpus: music21 scores -> notes -> FluidSynth audio -> captioned clips, split by work.

Rendering needs the FluidSynth library and a General MIDI SoundFont (system packages, installed by .ci/run
where it can); without them the rendering tests skip with that reason. Parsing and captions need only music21.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

music21 = pytest.importorskip("music21", reason="music21 is not installed (pip install -e '.[render]')")

from fluxmusic.data import render as R  # noqa: E402
from fluxmusic.errors import FluxMusicError  # noqa: E402


def _soundfont() -> str:
    try:
        font = R.find_soundfont(None)
        R.FluidRenderer(font).close()
    except FluxMusicError as e:
        pytest.skip(f"no FluidSynth + GM SoundFont here: {e}")
    return font


def _bach_path() -> str:
    return str(music21.corpus.getWork("bach/bwv66.6"))


def test_parse_a_bach_chorale_into_tempo_free_parts():
    (work,) = R.parse_works(_bach_path())
    assert work.collection == "bach" and len(work.parts) == 4
    tops = [float(np.median(p[:, 2])) for p in work.parts]
    assert tops == sorted(tops, reverse=True)  # soprano first: the register is read from the top voice
    assert work.key == (6, "minor")  # F# minor, as music21's analysis says
    assert work.metre == "4/4" and all(p[:, 1].min() > 0 for p in work.parts)


def test_captions_state_only_the_clip_facts():
    (work,) = R.parse_works(_bach_path())
    rng = np.random.default_rng(0)
    for i in range(20):
        choice = R.choose_rendering(work, np.random.default_rng(i))
        facts = R.clip_facts(work, choice, 0.0, 10.24)
        assert facts["tempo"] == R.tempo_word(choice["bpm"]) and facts["instrument"] in R.ENSEMBLE_FAMILIES
        assert 45 <= float(np.median(work.parts[0][:, 2])) + choice["transpose"] <= 88
        cap = R.make_caption(facts, rng)
        assert cap[0].isupper()
        # Every caption names the instrument by one of its family's phrases; only the facts' words appear.
        low = cap.lower()
        assert any(p in low for p in R.INSTRUMENTS[facts["instrument"]][0])
        other = {"slow", "medium", "fast"} - {facts["tempo"]}
        assert not any(w in low.replace(",", " ").split() for w in other)


def test_split_is_by_work_and_stable():
    assert R.is_val_work("bach/bwv66.6.mxl", 0.5) == R.is_val_work("bach/bwv66.6.mxl", 0.5)
    flags = [R.is_val_work(f"w{i}", 0.1) for i in range(2000)]
    assert 0.07 < np.mean(flags) < 0.13


def test_unknown_collection_and_missing_soundfont_are_clear_errors(tmp_path):
    with pytest.raises(FluxMusicError, match="unknown corpus collection.*nosuch"):
        R.list_corpus(("nosuch",))
    with pytest.raises(FluxMusicError, match="SoundFont not found.*apt-get install fluidsynth fluid-soundfont-gm"):
        R.render_corpus(tmp_path / "c", max_works=1, soundfont=str(tmp_path / "missing.sf2"))


def test_render_corpus_writes_clips_manifest_and_counts_skips(tmp_path):
    font = _soundfont()
    bad = tmp_path / "broken.abc"
    bad.write_text("X:1\nT:broken\nK:nonsense-key-zzz\n|]]]\n")  # music21 finds no notes or fails to parse
    manifest = R.render_corpus(tmp_path / "corpus", paths=[_bach_path(), str(bad)], clips_per_work=2,
                               soundfont=font, val_fraction=0.0, progress=False)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert 1 <= len(lines) <= 2
    summary = json.loads((tmp_path / "corpus" / "render_summary.json").read_text())
    assert summary["files"] == 2 and sum(summary["skipped"].values()) == 1
    from fluxmusic.audio import read_audio
    from fluxmusic.data.manifest import load_manifest

    entries = load_manifest(manifest)  # the trainers' own manifest reader accepts it
    wave = read_audio(entries[0].path, 16000)
    assert len(wave) == int(round(10.24 * 16000))
    peak = R.DYNAMICS[lines[0]["dynamics"]][1]
    assert abs(float(np.abs(wave).max()) - peak) < 0.01  # loudness follows the caption's dynamics word
    # Real notes: a harmonic spectrum, not noise -- the strongest bins stand far above the median.
    spec = np.abs(np.fft.rfft(wave[:16384] * np.hanning(16384)))
    assert np.sort(spec)[-20:].mean() > 50 * np.median(spec)
    assert all(x["split"] == "train" and x["work"].startswith("bach/") for x in lines)


def test_cli_render_and_its_errors(tmp_path):
    import subprocess
    import sys

    font = _soundfont()
    cmd = [sys.executable, "-m", "fluxmusic.cli", "data", "render", "--out", str(tmp_path / "c"), "--works", "2",
           "--collections", "bach", "--soundfont", font]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and (tmp_path / "c" / "manifest.jsonl").is_file()
    bad = subprocess.run(cmd[:-2] + ["--soundfont", str(tmp_path / "none.sf2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "SoundFont not found" in bad.stderr and "Traceback" not in bad.stderr
