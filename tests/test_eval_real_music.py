"""Evaluation on real music: the hop-rate comb figure and note density on signals with known answers, the
attribute space chosen from a rendered-corpus manifest, and the vocoder resynthesis benchmark on a tiny
vocoder next to Griffin-Lim."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from fluxmusic.audio import write_audio
from fluxmusic.data import render as R
from fluxmusic.errors import FluxMusicError
from fluxmusic.evaluation.attributes import RENDER, SYNTH, parse_attributes, space_for
from fluxmusic.evaluation.signal_features import comb_figure, note_density, rhythm_clarity

SR = 16000
N = int(10.24 * SR)


def _notes(pitches=(60, 64, 67, 72), seconds: float = 10.24, note_s: float = 0.5, seed: int = 0) -> np.ndarray:
    """A few decaying harmonic notes in sequence (a plucked melody), with a little noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    out = np.zeros(n)
    step = int(note_s * SR)
    t = np.arange(step) / SR
    for i, start in enumerate(range(0, n - step + 1, step)):
        f = 440.0 * 2 ** ((pitches[i % len(pitches)] - 69) / 12)
        tone = sum(np.sin(2 * np.pi * h * f * t + rng.uniform(0, 6.3)) / h for h in range(1, 6) if h * f < SR / 2)
        out[start:start + step] += np.exp(-4 * t) * tone
    return (0.3 * out / np.abs(out).max() + 1e-3 * rng.normal(size=n)).astype(np.float32)


# --------------------------------------------------------------------------------------------- comb figure
def test_comb_figure_flags_a_hop_rate_pulse_train_and_not_noise_or_notes():
    rng = np.random.default_rng(0)
    pulses = np.zeros(N)
    pulses[::160] = 1.0  # a vocoder that buzzes at its hop: 16000 / 160 = 100 Hz
    buzz = comb_figure(pulses + 0.01 * rng.normal(size=N), SR)
    noise = [comb_figure(rng.normal(size=N), SR) for _ in range(3)]
    notes = [comb_figure(_notes(seed=s), SR) for s in range(2)]
    assert buzz > 100, buzz
    assert all(1.8 < v < 3.0 for v in noise), noise  # the max of ~80 Rayleigh bins over their median
    assert all(v < 4.0 for v in notes), notes
    # A buzz on music: the comb still stands out far above the music's own figure.
    assert comb_figure(_notes() + 0.02 * pulses, SR) > 3 * max(notes)
    # A pulse train at another rate is not a hop comb.
    other = np.zeros(N)
    other[::173] = 1.0
    assert comb_figure(other + 0.05 * rng.normal(size=N), SR) < 4.0
    assert np.isnan(comb_figure(np.zeros(N), SR))


def test_note_density_counts_onsets_per_second():
    clicks = np.zeros(N, np.float32)
    t = np.arange(800) / SR
    burst = (np.exp(-60 * t) * np.sin(2 * np.pi * 880 * t)).astype(np.float32)
    for start in range(0, N - 800, SR // 4):  # 4 notes a second
        clicks[start:start + 800] += burst
    assert note_density(clicks, SR) == pytest.approx(4.0, abs=0.5)
    assert note_density(_notes(note_s=0.5), SR) == pytest.approx(2.0, abs=0.5)
    assert note_density(np.zeros(N, np.float32), SR) == 0.0


def test_rhythm_clarity_tells_a_beat_from_onsets_at_random_times():
    rng = np.random.default_rng(0)
    t = np.arange(800) / SR
    burst = (np.exp(-60 * t) * np.sin(2 * np.pi * 660 * t)).astype(np.float32)

    def onsets_at(starts) -> np.ndarray:
        x = 1e-3 * rng.normal(size=N).astype(np.float32)
        for s in starts:
            x[s:s + 800] += burst
        return x

    beat = [rhythm_clarity(onsets_at(range(0, N - 800, int(SR * 60 / bpm))), SR) for bpm in (60, 120, 180)]
    scattered = [rhythm_clarity(onsets_at(np.sort(rng.integers(0, N - 800, 30))), SR) for _ in range(3)]
    assert min(beat) > 0.5, beat  # 60 BPM: ten beats in 10.24 s, so the 1 s lag overlaps less
    assert max(scattered) < 0.3, scattered
    assert rhythm_clarity(_notes(note_s=0.5), SR) > 0.5  # a plucked melody in even notes has a beat
    assert np.isnan(rhythm_clarity(np.zeros(N, np.float32), SR))


# --------------------------------------------------------------------------------------------- vocabularies
def test_attribute_space_follows_the_manifest():
    rendered = [{"instrument": "choir", "tempo": "slow", "work": "bach/bwv1.mxl", "collection": "bach"}]
    assert space_for(rendered) is RENDER
    assert space_for([{"instrument": "brass", "tempo": "fast"}]) is RENDER  # a render-only family
    assert space_for([{"instrument": "piano", "tempo": "slow", "drums": True}]) is SYNTH
    assert space_for([]) is SYNTH
    assert space_for(rendered, "synth") is SYNTH
    with pytest.raises(FluxMusicError, match="unknown attribute space 'midi'"):
        space_for(rendered, "midi")
    assert set(RENDER.vocabularies["instrument"]) == set(R.INSTRUMENTS)
    assert [RENDER.tempo_class(b) for b in (45, 100, 220)] == ["slow", "medium", "fast"]
    assert RENDER.register_class(50) == "low" and RENDER.register_class(60) == "mid"
    assert RENDER.register_class(80) == "high"


@pytest.mark.parametrize("seed", range(6))
def test_render_captions_parse_back_to_their_facts(seed):
    rng = np.random.default_rng(seed)
    family = list(R.INSTRUMENTS)[seed * 5 % len(R.INSTRUMENTS)]
    bpm = float(rng.uniform(45, 220))
    facts = {"instrument": family, "tempo": R.tempo_word(bpm), "bpm": bpm, "register": "high", "mode": "minor",
             "key": "D", "metre": "3/4", "texture": "solo", "dynamics": "soft", "style": "a folk song",
             "composer": None, "era": "folk"}
    for _ in range(6):  # several templates
        caption = R.make_caption(facts, rng)
        got = parse_attributes(caption, RENDER)
        assert got["instrument"] == family, caption
        assert got.get("tempo", facts["tempo"]) == facts["tempo"], caption
        if "minor" in caption:
            assert got["mode"] == "minor", caption
    got = parse_attributes("Four-part church music for flute, oboe, clarinet and bassoon at 150 BPM", RENDER)
    assert got["instrument"] == "woodwinds" and got["tempo"] == "fast"


def _tiny_render_manifest(root: Path, n: int = 8) -> Path:
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"clips/{i}.wav"
        write_audio(root / rel, _notes(seconds=1.28, note_s=0.32, seed=i), SR)
        fam = ("organ", "harp", "choir", "piano")[i % 4]
        rows.append({"path": rel, "caption": f"A chorale on {R.INSTRUMENTS[fam][0][0]}, slow", "instrument": fam,
                     "tempo": "slow", "register": "mid", "mode": "major", "dynamics": "soft", "collection": "bach",
                     "work": f"bach/w{i // 2}.mxl", "note_density": 3.1, "split": "val" if i % 2 else "train"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


def test_reference_and_prompts_take_the_manifest_space_and_split(tmp_path):
    from fluxmusic.evaluation.data import load_prompts, load_reference

    man = _tiny_render_manifest(tmp_path)
    ref = load_reference(man, SR, 1.28, split="val")
    assert ref.space is RENDER and len(ref.waves) == 4
    assert [a["instrument"] for a in ref.attributes] == ["harp", "piano", "harp", "piano"]
    assert all(e["split"] == "val" and e["note_density"] == 3.1 for e in ref.extra)
    prompts = load_prompts(man, ref.space, "val")
    assert [p.path for p in prompts] == ref.paths
    # A caption is held to what it says ("slow", the instrument), not to its clip's other manifest fields.
    assert all(set(p.attributes) == {"instrument", "tempo"} and p.attributes["tempo"] == "slow" for p in prompts)
    assert ref.attributes[0]["register"] == "mid"  # the reference clip keeps every fact of the manifest
    user = tmp_path / "user.jsonl"
    user.write_text(json.dumps({"prompt": "a chorale on organ", "tempo": "fast"}) + "\n"
                    + json.dumps({"prompt": "a jig on harp"}) + "\n")
    assert [p.attributes for p in load_prompts(user, RENDER)] == [{"instrument": "organ", "tempo": "fast"},
                                                                 {"instrument": "harp"}]
    assert load_reference(man, SR, 1.28).space is RENDER and len(load_reference(man, SR, 1.28).waves) == 8
    with pytest.raises(FluxMusicError, match="no entry of .* has \"split\": \"test\""):
        load_reference(man, SR, 1.28, split="test")
    with pytest.raises(FluxMusicError, match="no entry of .* has \"split\": \"test\""):
        load_prompts(man, RENDER, "test")


def test_comb_check_and_accuracy_use_the_reference_range_and_space():
    from fluxmusic.evaluation.evaluate import Scored, attribute_accuracy, comb_check, signal_summary

    def scored(combs, inst_idx):
        probs = np.eye(len(RENDER.vocabularies["instrument"]))[inst_idx]
        return Scored(np.zeros((len(combs), 2)), {"instrument": probs},
                      [{"comb": c, "note_density": 2.0, "rhythm_clarity": 0.5, "tempo": "slow", "register": "mid"}
                       for c in combs])

    ref = scored([2.0, 3.5, 2.5], [0, 1, 2])
    gen = scored([2.2, 400.0, float("nan")], [0, 0, 2])
    check = comb_check(gen, ref)
    assert check["reference_max"] == 3.5 and check["fraction_within"] == pytest.approx(1 / 3)
    assert not check["all_within"] and comb_check(ref, ref)["all_within"]
    assert signal_summary(gen)["comb"]["max"] == 400.0
    fams = list(RENDER.vocabularies["instrument"])
    stated = [{"instrument": fams[0], "tempo": "slow"}, {"instrument": fams[1]}, {"instrument": fams[2]}]
    acc = attribute_accuracy(gen, stated, fams)
    assert acc["instrument"] == pytest.approx(2 / 3) and acc["tempo"] == 1.0 and acc["register"] is None


# --------------------------------------------------------------------------------------------- resynthesis
def _load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vocoder_resynthesis.py"
    spec = importlib.util.spec_from_file_location("vocoder_resynthesis", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vocoder_resynthesis"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_vocoder_resynthesis_benchmark_on_a_tiny_vocoder(tmp_path, capsys):
    import torch

    from fluxmusic.tiny import tiny_vocoder

    bench = _load_benchmark()
    torch.manual_seed(0)
    tiny_vocoder().save_pretrained(str(tmp_path / "vocoder"))  # untrained: a poor decoder
    man = _tiny_render_manifest(tmp_path / "corpus")
    out = tmp_path / "res.json"
    argv = ["--vocoder", str(tmp_path), "--manifest", str(man.parent), "--split", "val", "--limit", "3",
            "--seconds", "1.28", "--gl-iters", "16", "--json", str(out), "--quiet"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| real clips (input) |" in printed and "Griffin-Lim (16 iterations)" in printed
    res = json.loads(out.read_text())
    assert res["clips"] == 3 and len(res["per_clip"]) == 3
    voc, gl = res["systems"]["vocoder (speecht5_hifigan)"], res["systems"]["Griffin-Lim (16 iterations)"]
    for s in (voc, gl):
        assert np.isfinite([s["log_mel_l1"], s["mr_stft"], s["comb_max"]]).all()
    # Griffin-Lim from the true log-mel of clean notes is close (aligned, right scale); an untrained vocoder not.
    assert gl["log_mel_l1"] < 0.6 and gl["log_mel_l1"] < voc["log_mel_l1"], (gl, voc)
    assert gl["mr_stft"] < voc["mr_stft"]
    assert res["real"]["comb_max"] < 4.0

    assert bench.main(argv[:-3] + ["--no-griffin-lim", "--quiet"]) == 0
    assert "Griffin-Lim" not in capsys.readouterr().out
    assert bench.main(argv[:6] + ["--split", "test", "--quiet"]) == 2
    assert "no entry of" in capsys.readouterr().err
    assert bench.main(["--vocoder", str(tmp_path / "nowhere"), "--manifest", str(man)]) == 2
    assert "neither a vocoder directory" in capsys.readouterr().err


def test_vocoder_resynthesis_benchmark_runs_mel_match_variants_interleaved(tmp_path, capsys):
    import torch

    from fluxmusic.tiny import tiny_vocoder
    from fluxmusic.vocos import VocosConfig, VocosVocoder

    bench = _load_benchmark()
    torch.manual_seed(0)
    VocosVocoder(VocosConfig(hidden_size=16, intermediate_size=16, num_layers=1, phase_integrate=True)).save_pretrained(
        str(tmp_path / "vocoder"))
    man = _tiny_render_manifest(tmp_path / "corpus")
    out = tmp_path / "res.json"
    argv = ["--vocoder", str(tmp_path), "--manifest", str(man.parent), "--split", "val", "--limit", "2",
            "--seconds", "1.28", "--no-griffin-lim", "--quiet", "--json", str(out)]
    assert bench.main(argv + ["--mel-match", "3", "3/0.6"]) == 0
    systems = json.loads(out.read_text())["systems"]
    plain, k3 = systems["vocoder (fluxmusic_vocos)"], systems["vocoder, mel_match 3 momentum 0"]
    k3m = systems["vocoder, mel_match 3 momentum 0.6"]
    assert "mel_match 3 momentum 0.6" in capsys.readouterr().out
    # an untrained vocoder is far from its input mel; the projection pulls it in, faster with momentum
    assert k3m["log_mel_l1"] < k3["log_mel_l1"] < plain["log_mel_l1"], (plain, k3, k3m)
    for bad, message in (("3/x", "must be ROUNDS or ROUNDS/MOMENTUM"), ("3/1.5", "mel_match_momentum 1.5")):
        assert bench.main(argv + ["--mel-match", bad]) == 2
        assert message in capsys.readouterr().err
    tiny_vocoder().save_pretrained(str(tmp_path / "hifigan" / "vocoder"))
    assert bench.main(["--vocoder", str(tmp_path / "hifigan"), *argv[2:], "--mel-match", "2"]) == 2
    assert "needs a Vocos vocoder" in capsys.readouterr().err


def test_eval_cli_on_a_rendered_manifest_uses_its_vocabulary_and_split(tmp_path, capsys):
    from fluxmusic.cli import main
    from fluxmusic.tiny import build_tiny_model_dir

    model = build_tiny_model_dir(tmp_path / "model")
    man = _tiny_render_manifest(tmp_path / "corpus")
    out = tmp_path / "res.json"
    argv = ["eval", "--model", str(model), "--prompts", str(man), "--reference", str(man), "--split", "val",
            "--steps", "1", "--no-untrained", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["attribute_space"] == "render" and res["config"]["split"] == "val"
    assert res["n_prompts"] == 4 and res["paired"]
    model_s, ref_s = res["systems"]["model"], res["systems"]["reference"]
    assert set(model_s["attribute_accuracy"]) == {"tempo", "register", "instrument", "mean"}
    assert ref_s["signal"]["comb"]["max"] < 4.0  # clean notes
    assert model_s["comb_check"]["reference_max"] == ref_s["signal"]["comb"]["max"]
    assert all(np.isfinite(p["measured"]["note_density"]) for p in res["per_prompt"])
    assert 0.5 < ref_s["signal"]["rhythm_clarity"]["median"] <= 1  # even notes: a clear beat
    assert all("rhythm_clarity" in p["measured"] for p in res["per_prompt"])  # NaN: no onsets (the tiny model)
    assert [c["score_note_density"] for c in res["reference_clips"]] == [3.1] * 4
    printed = capsys.readouterr().out
    assert "comb figure within the reference clips' range" in printed and "model accuracy / reference" in printed
    assert main(argv[:-2] + ["--out", str(tmp_path / "r.json"), "--split", "test"]) == 2
    assert 'has "split": "test"' in capsys.readouterr().err


def test_attribute_probe_takes_real_clips_of_a_rendered_manifest(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attribute_probe.py"
    spec = importlib.util.spec_from_file_location("attribute_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    clips = probe.ManifestClips(_tiny_render_manifest(tmp_path).parent)
    assert [e.attributes["split"] for e in clips.entries[:4]] == ["val"] * 4  # held-out works first
    waves = clips.waves({"instrument": "harp"}, 5)
    assert len(waves) == 2 and all(len(w) == int(1.28 * SR) for w in waves)  # clips 1 and 5
    with pytest.raises(FluxMusicError, match="no manifest clip has"):
        clips.waves({"instrument": "brass"}, 1)
    for _attr, metric, (_pa, a), (_pb, b) in probe.RENDER_PAIRS:  # every pair speaks the render vocabulary
        for attrs in (a, b):
            assert attrs["instrument"] in R.INSTRUMENTS and attrs.get("tempo", "slow") in R.TEMPO_WORDS
        assert metric in ("onset_rate", "note_density", "centroid", "clap_b_minus_a")
