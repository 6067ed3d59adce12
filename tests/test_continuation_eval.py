"""``fluxmusic eval --task continue|infill|long`` on a tiny model and a tiny rendered-style manifest, and the key
estimator it uses for consistency across windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fluxmusic.audio import write_audio
from fluxmusic.evaluation.attributes import estimate_key, key_name, mean_chroma

SR = 16000


def _chord_tones(tonic_midi: int, minor: bool, seconds: float, seed: int = 0) -> np.ndarray:
    """A scale-and-triad melody in one key (harmonic tones), for the key estimator and as corpus clips."""
    rng = np.random.default_rng(seed)
    scale = [0, 2, 3, 5, 7, 8, 10] if minor else [0, 2, 4, 5, 7, 9, 11]
    degrees = [0, 2, 4, 0, 4, 2, 0, 1, 3, 5, 4, 0, 6, 0]  # tonic-heavy, like real tunes
    n, step = int(seconds * SR), int(0.25 * SR)
    out = np.zeros(n, dtype=np.float32)
    t = np.arange(step) / SR
    for k, i in enumerate(range(0, n - step, step)):
        midi = tonic_midi + scale[degrees[k % len(degrees)]]
        f = 440.0 * 2 ** ((midi - 69) / 12)
        tone = sum(np.sin(2 * np.pi * h * f * t + rng.uniform(0, 6)) / h**1.5 for h in range(1, 5))
        out[i : i + step] += (0.3 * tone * np.exp(-3 * t)).astype(np.float32)
    return out


@pytest.mark.parametrize(("tonic", "minor", "name"), [(62, False, "D major"), (57, True, "A minor"),
                                                      (66, False, "F# major")])
def test_key_estimator_names_the_key_of_a_tonal_melody(tonic, minor, name):
    w = _chord_tones(tonic, minor, 6.0)
    assert estimate_key(w, SR) == name
    assert estimate_key(np.zeros(SR, np.float32), SR) is None and mean_chroma(np.zeros(SR, np.float32), SR) is None


def test_manifest_key_spelling():
    assert key_name("Db", "Major") == "C# major" and key_name("B-", "minor") == "Bb minor"
    assert key_name("F#", "minor") == "F# minor" and key_name("Ab", "major") == "Ab major"


def _manifest(root: Path, n: int = 8) -> Path:
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"clips/{i}.wav"
        write_audio(root / rel, _chord_tones(60 + (i // 2) % 5, bool(i % 3 == 0), 10.24, seed=i), SR)
        rows.append({"path": rel, "caption": "A chorale on piano, slow", "instrument": "piano", "tempo": "slow",
                     "key": ("C", "C#", "D", "Eb", "E")[(i // 2) % 5], "mode": "minor" if i % 3 == 0 else "major",
                     "work": f"bach/w{i // 2}.mxl", "collection": "bach", "split": "val"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


def test_eval_tasks_on_held_out_clips(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    from fluxmusic.cli import main

    man = _manifest(tmp_path / "corpus")
    out = tmp_path / "cont.json"
    argv = ["eval", "--task", "continue,infill,long", "--model", str(tiny_model_dir), "--reference", str(man),
            "--split", "val", "--clips", "2", "--reference-limit", "6", "--seam", "6", "--regenerate", "4:6",
            "--long-duration", "16", "--long-clips", "1", "--steps", "1", "--quiet", "--out", str(out),
            "--save-audio", str(tmp_path / "wav")]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    c, i, lg = r["continue"], r["infill"], r["long"]
    assert c["clips"] == 2 and i["clips"] == 2 and lg["songs"] == 1
    assert r["config"]["reference_clips"] == 6 and r["config"]["conditioning_used"] == "replace"
    for block in (c, i):
        seam = block["seam"]
        assert np.isfinite(seam["model"]["logmel_ratio"]) and np.isfinite(seam["real_clip"]["flux_ratio"])
        assert block["kept_snr_db"] > 10  # spliced: the kept audio itself (outside the short fade)
        assert np.isfinite(block["fad"]["model"]) and np.isfinite(block["fad"]["real_regions"])
        assert block["cost"]["sampling_s_per_minute"] > 0 and block["cost"]["evaluations_per_minute"] > 0
    assert np.isfinite(c["seam"]["naive_join"]["logmel_ratio"]) and np.isfinite(c["fad"]["naive_join"])
    assert len(c["per_clip"]) == 2 and len(i["per_clip"][0]) >= 6
    song = lg["per_song"][0]
    assert song["windows"] >= 2 and len(song["seams"]) == song["windows"]  # given-audio seam + window seams
    assert len(song["window_attributes"]) == song["windows"]
    cons = lg["consistency"]
    assert set(cons["model"]) == {"tempo", "key", "chroma", "instrument"}
    assert cons["real_pairs"] >= 2 and cons["real_same_work"]["instrument"] is not None
    assert 0 <= r["key_estimator_accuracy"] <= 1
    assert sorted(p.name for p in (tmp_path / "wav").iterdir()) == [
        "continue0.continued.wav", "continue0.original.wav", "continue1.continued.wav", "continue1.original.wav",
        "long0.wav"]
    printed = capsys.readouterr().out
    assert "| continue | naive join |" in printed and "two excerpts of one real work" in printed

    def fails(extra: list[str], match: str) -> None:
        assert main(argv[:-4] + ["--out", str(tmp_path / "x.json")] + extra) == 2
        assert match in capsys.readouterr().err

    fails(["--task", "outpaint"], "--task 'outpaint': allowed: continue, infill, long")
    fails(["--task", "infill", "--regenerate", "6:4"], "--regenerate '6:4' must be A:B with 0 < A < B")
    fails(["--task", "continue", "--seam", "11"], "--seam")
    fails(["--task", "continue", "--clips", "5"], "--clips 5 needs at least 9")
    fails(["--task", "continue", "--conditioning", "trained"], "no trained masked conditioning")
    fails(["--task", "continue", "--blend", "5"], "blend")
    assert main(["eval", "--reference", str(man), "--out", str(tmp_path / "y.json")]) == 2
    assert "--prompts is required" in capsys.readouterr().err
