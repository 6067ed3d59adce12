"""Evaluation metrics on known cases, attribute estimators on synthetic clips with known attributes, the CLAP
score against the bundled default's CLAP, and ``fluxmusic eval`` end to end on a tiny model directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxmusic.data.synth import synth_clip
from fluxmusic.evaluation import metrics as M
from fluxmusic.evaluation.attributes import measure, parse_attributes
from fluxmusic.pipeline import default_model_dir

SR = 16000


# --------------------------------------------------------------------------------------------- metrics
def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)) @ rng.normal(size=(8, 8))  # correlated, full rank
    assert M.frechet_distance(x, x) < 1e-8
    noise = rng.normal(size=x.shape)
    d = [M.frechet_distance(x, x + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(d, d[1:])), d
    # Singular covariances (fewer samples than dimensions) still give a finite, ~0 self-distance.
    small = rng.normal(size=(5, 16))
    assert M.frechet_distance(small, small) < 1e-6


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    rng = np.random.default_rng(1)
    mu = np.array([1.0, -2.0, 0.5])
    a = rng.normal(size=(20000, 3))
    b = rng.normal(size=(20000, 3)) * 2.0 + mu  # N(mu, 4I): |mu|^2 + 3 (1 + 4 - 2 * 2) = |mu|^2 + 3
    assert M.frechet_distance(a, b) == pytest.approx(mu @ mu + 3.0, rel=0.03)


def test_kl_and_inception_score_sanity():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert np.allclose(M.kl_divergence(p, p), 0.0)
    assert (M.kl_divergence(p, p[::-1]) > 0).all()
    assert M.paired_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    assert M.marginal_kl(p, p[::-1]) == pytest.approx(0.0, abs=1e-12)  # same marginal, different pairs
    assert M.paired_kl(p, p[::-1]) > 0.5
    same = np.tile([0.2, 0.3, 0.5], (10, 1))
    assert M.inception_score(same) == pytest.approx(1.0)
    onehot = np.eye(4)[np.arange(12) % 4]
    assert M.inception_score(onehot) == pytest.approx(4.0, rel=1e-6)
    assert 1.0 < M.inception_score(0.5 * onehot + 0.125) < 4.0


def test_clap_score_and_derangement():
    a = np.eye(3)
    assert M.clap_score(a, 2 * a) == pytest.approx(1.0)
    assert M.clap_score(a, a[[1, 2, 0]]) == pytest.approx(0.0)
    for n in (2, 3, 10):
        perm = M.derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and not (perm == np.arange(n)).any()
    assert (M.derangement(10, 0) == M.derangement(10, 0)).all()


# --------------------------------------------------------------------------------------------- attributes
@pytest.mark.parametrize("seed", [1, 2])
def test_tempo_estimator_tells_fast_from_slow(seed):
    slow, a_slow, _ = synth_clip(seed, {"tempo": "slow", "register": "mid"})
    fast, a_fast, _ = synth_clip(seed, {"tempo": "fast", "register": "mid"})
    m_slow, m_fast = measure(slow, SR), measure(fast, SR)
    assert (m_slow["tempo"], m_fast["tempo"]) == ("slow", "fast")
    assert m_slow["tempo_bpm"] == pytest.approx(a_slow["tempo_bpm"], rel=0.05)
    assert m_fast["tempo_bpm"] == pytest.approx(a_fast["tempo_bpm"], rel=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_register_estimator_tells_high_from_low(seed):
    low, _, _ = synth_clip(seed, {"register": "low"})
    high, _, _ = synth_clip(seed, {"register": "high"})
    m_low, m_high = measure(low, SR), measure(high, SR)
    assert (m_low["register"], m_high["register"]) == ("low", "high")
    assert m_high["melody_midi"] - m_low["melody_midi"] > 20


def test_estimators_beat_chance_on_random_corpus_clips():
    clips = [synth_clip(np.random.SeedSequence([11, i])) for i in range(10)]
    meas = [measure(w, SR) for w, _, _ in clips]
    tempo = np.mean([m["tempo"] == a["tempo"] for m, (_, a, _) in zip(meas, clips)])
    register = np.mean([m["register"] == a["register"] for m, (_, a, _) in zip(meas, clips)])
    assert tempo >= 0.6 and register >= 0.7, (tempo, register)  # chance is 1/3


def test_parse_attributes_reads_the_corpus_vocabulary():
    got = parse_attributes("A slow, sad string pad tune in a high register, softly played, with no percussion.")
    assert got == {"instrument": "synth pad", "tempo": "slow", "register": "high", "mode": "minor",
                   "dynamics": "soft", "drums": "false"}
    _, attrs, caption = synth_clip(5)
    got = parse_attributes(caption)
    for k in ("instrument", "tempo", "register", "mode", "dynamics"):
        assert got[k] == attrs[k], (caption, k)


# --------------------------------------------------------------------------------------------- CLAP score
def test_clap_score_ranks_the_matching_caption_first_above_chance(tmp_path):
    """The bundled default's CLAP was trained on rendered real music: on freshly rendered clips (music21 scores
    through FluidSynth, captions from the renderer) the matching caption ranks far above chance."""
    import json

    pytest.importorskip("music21", reason="music21 is not installed (pip install -e '.[render]')")
    from fluxmusic.audio import read_audio
    from fluxmusic.data import render as R
    from fluxmusic.errors import FluxMusicError
    from fluxmusic.evaluation.embedders import model_dir_embedder

    try:
        manifest = R.render_corpus(tmp_path / "c", max_works=10, seed=11, clips_per_work=2, progress=False)
    except FluxMusicError as e:
        pytest.skip(f"no FluidSynth + GM SoundFont here: {e}")
    rows = [json.loads(x) for x in manifest.read_text().splitlines()][:16]
    n = len(rows)
    emb = model_dir_embedder(default_model_dir())
    audio = emb.embed_audio([read_audio(tmp_path / "c" / r["path"], SR) for r in rows], SR)
    text = emb.embed_text([r["caption"] for r in rows])
    sim = audio @ text.T  # unit rows: cosines
    top1 = float(np.mean(sim.argmax(1) == np.arange(n)))
    rank = np.mean([(sim[i] > sim[i, i]).sum() for i in range(n)])  # 0 is first; chance averages (n - 1) / 2
    assert n >= 12 and top1 >= 3 / n and rank < (n - 1) / 4, (n, top1, rank)  # chance: top-1 1/n
    assert M.clap_score(text, audio) > M.clap_score(text[M.derangement(n, 0)], audio)


def test_clap_embedder_feeds_the_audio_tower_what_the_recipe_trained_it_on(tmp_path):
    """The default's CLAP is trained on the log-mel 4x4-pooled (``text_task.clap_audio_input``); the embedder
    must give the same embeddings from waveforms."""
    import torch.nn.functional as F

    from fluxmusic.audio import log_mel
    from fluxmusic.evaluation.embedders import ClapEmbedder
    from fluxmusic.tiny import TINY_WORDS, build_word_tokenizer
    from fluxmusic.training.text_task import TextEncodersConfig, clap_audio_input

    tok = build_word_tokenizer(TINY_WORDS, tmp_path / "tok")
    cfg = TextEncodersConfig(clap_hidden=32, clap_layers=1, clap_heads=2, projection_dim=16, audio_patch_hidden=16,
                             audio_depths=(1, 1), audio_heads=(1, 2))
    cfg.build_clap(len(tok)).save_pretrained(str(tmp_path / "clap"))
    emb = ClapEmbedder(tmp_path / "clap", tmp_path / "tok", max_length=16)
    waves = [synth_clip(s)[0] for s in (0, 1)]
    got = emb.embed_audio(waves, SR)
    with torch.no_grad():
        x = clap_audio_input(log_mel(torch.from_numpy(np.stack(waves))))
        ref = emb.model.audio_projection(emb.model.audio_model(input_features=x).pooler_output)
    np.testing.assert_allclose(got, F.normalize(ref, dim=-1).numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(emb.embed_text(["a fast piano melody", "a slow organ tune"]), axis=1), 1.0)


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def eval_model_dir(tmp_path_factory) -> Path:
    from fluxmusic.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("eval") / "model")


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    from fluxmusic.data.synth import make_corpus

    return make_corpus(tmp_path_factory.mktemp("corpus"), hours=4 * 10.24 / 3600, seed=3, progress=False)


def test_solve_latents_reproduces_the_pipeline(eval_model_dir):
    from fluxmusic.evaluation.generation import decode_full, solve_latents, untrained_twin
    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(eval_model_dir)
    prompts = ["a fast piano melody", "a slow organ tune"]
    lat = solve_latents(pipe, prompts, [5, 6], 3, "heun", None, 3.0)
    assert torch.equal(lat, solve_latents(pipe, prompts, [5, 6], 3, "heun", None, 3.0))
    ref = pipe(prompts, steps=3, solver="heun", guidance=3.0, seed=5)
    for got, want in zip(decode_full(pipe, lat), ref.audio):
        np.testing.assert_allclose(got, want, atol=1e-5)
    twin = untrained_twin(pipe, seed=0)
    assert not torch.allclose(solve_latents(twin, prompts, [5, 6], 3, "heun", None, 3.0), lat)
    assert torch.equal(solve_latents(pipe, prompts, [5, 6], 3, "heun", None, 3.0), lat)  # original untouched


def test_eval_cli_end_to_end(eval_model_dir, tiny_corpus, tmp_path, capsys):
    from fluxmusic.cli import main

    out = tmp_path / "res.json"
    base = ["eval", "--model", str(eval_model_dir), "--prompts", str(tiny_corpus), "--reference",
            str(tiny_corpus.parent), "--quiet", "--steps", "1"]
    sweep_args = ["--sweep", "--sweep-prompts", "2", "--sweep-steps", "1,2,4", "--sweep-target", "4",
                  "--sweep-reference-steps", "8", "--sweep-shift", "3", "--sweep-intervals", "0.5:1",
                  "--sweep-caches", "0.2", "--sweep-schedules", "linear"]
    assert main(base + ["--out", str(out)] + sweep_args + ["--steps", "4"]) == 0
    res = json.loads(out.read_text())
    assert res["paired"] and res["n_prompts"] == 4 and res["half_sizes"] == [2, 2]
    systems = res["systems"]
    assert set(systems) == {"reference", "model", "shuffled_prompts", "untrained"}
    for key in ("model", "untrained"):
        s = systems[key]
        assert np.isfinite([s["fad"], s["fad_full"], s["clap_score"], s["kl"]["paired"]["mean"]]).all()
        assert 1.0 <= s["inception_score"]["instrument"] <= 7.0
        assert set(s["attribute_accuracy"]) == {"tempo", "register", "instrument", "mean"}
    assert systems["reference"]["attribute_accuracy"]["register"] is not None
    assert res["attribute_space"] == "synth"  # a `data synth` manifest keeps the synthetic vocabularies
    assert systems["model"]["comb_check"]["fraction_within"] is not None
    assert {"comb", "note_density"} <= set(res["per_prompt"][0]["measured"])
    sweep = res["steps_sweep"]
    grid = [r for r in sweep["rows"] if r["kind"] == "grid"]
    assert len(grid) == 2 * 4 * 3  # time schedules x solvers (euler, heun, ab2, ab3) x steps
    by = {(r["solver"], r["steps"], r["shift"]): r for r in grid}
    assert by[("heun", 4, None)]["latent_distance"] < by[("euler", 1, None)]["latent_distance"]
    assert by[("ab2", 4, None)]["latent_distance"] < by[("euler", 4, None)]["latent_distance"]
    assert by[("heun", 4, None)]["cost"] == 7 and by[("ab2", 4, None)]["cost"] == 4
    # the options, each alone on the evaluated setting (euler 4, uniform) and on the cheapest grid setting that
    # matches: interval, cache, schedule
    options = [r for r in sweep["rows"] if r["kind"] == "option"]
    assert sweep["bases"][0] == "euler 4, uniform" and len(options) == 3 * len(sweep["bases"])
    on_default = {r["label"]: r for r in options if r["label"].startswith("euler 4, uniform")}
    iv = on_default["euler 4, uniform, interval [0.5, 1]"]
    assert (iv["nfe"], iv["cost"]) == (4, 3.5)  # t = 0.25 runs the cond half only: half an evaluation
    assert iv["latent_distance"] != by[("euler", 4, None)]["latent_distance"]
    cache = on_default["euler 4, uniform, cache 0.2"]
    assert cache["nfe"] == cache["cost"] <= 4
    linear = on_default["euler 4, uniform, linear guidance"]
    assert linear["latent_distance"] != by[("euler", 4, None)]["latent_distance"]
    assert set(sweep["noise"]) >= {"fad", "clap_score"}
    fewest = sweep["fewest"]
    assert fewest["target"]["steps"] == 4 and fewest["latent"] is not None
    assert fewest["both"] is None or fewest["both"]["cost"] >= max(fewest["latent"]["cost"], fewest["metrics"]["cost"])
    assert Path(sweep["plot"]).stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| model |" in printed and "fewest steps matching 4-step Euler (both)" in printed

    # Deterministic: the same seeds give the same metrics (without the sweep and baseline, to stay fast).
    again = tmp_path / "again.json"
    assert main(base + ["--out", str(again), "--no-untrained", "--steps", "4"]) == 0
    assert json.loads(again.read_text())["systems"]["model"] == systems["model"]


def _row(solver, steps, shift, dist, fad, clap, cost=None, **options):
    from fluxmusic.evaluation.generation import PLAIN_OPTIONS
    from fluxmusic.evaluation.sweep import setting_label

    r = {"solver": solver, "steps": steps, "shift": shift, **{**PLAIN_OPTIONS, **options}}
    nfe = 2 * steps - 1 if solver == "heun" else steps
    return {**r, "label": setting_label(r), "nfe": nfe, "cost": nfe if cost is None else cost,
            "latent_distance": dist, "fad": fad, "clap_score": clap}


def test_fewest_matching_needs_both_criteria_within_the_measured_noise():
    from fluxmusic.evaluation.sweep import fewest_matching

    rows = [
        _row("euler", 50, None, 0.20, 1.00, 0.500),
        _row("ab2", 4, 3.0, 0.30, 0.90, 0.600),  # cheapest by the metrics, too far by latent distance
        _row("ab2", 8, 3.0, 0.10, 1.08, 0.495),  # close enough in latents; FAD worse by 0.08
        _row("heun", 8, 3.0, 0.05, None, None),  # matches in latents, never scored (lazy sweep): no metric match
        _row("ab2", 12, 3.0, 0.08, 1.01, 0.499),
        _row("ab2", 12, 3.0, 0.09, 1.02, 0.500, cost=9.5, guidance_interval=(0.3, 1.0)),
    ]
    quiet = fewest_matching(rows, 50, {"fad": 0.01, "clap_score": 0.001})
    assert quiet["tolerance"] == {"fad": 0.05, "clap_score": 0.005}  # the floors: the measured noise is smaller
    assert quiet["latent"]["label"] == "ab2 8, shift 3"
    assert quiet["metrics"]["label"] == "ab2 4, shift 3"
    assert quiet["both"]["label"] == "ab2 12, shift 3, interval [0.3, 1]" and quiet["both"]["cost"] == 9.5
    noisy = fewest_matching(rows, 50, {"fad": 0.1, "clap_score": 0.02})  # FAD +0.08 is within this noise
    assert noisy["tolerance"]["fad"] == 0.1 and noisy["both"]["label"] == "ab2 8, shift 3"
    # the target is the plain official sampler: an optioned Euler-50 row is not it
    assert fewest_matching(rows[1:] + [_row("euler", 50, None, 0.2, 1.0, 0.5, cache_threshold=0.1)], 50) == {}


class _SpectrumEmbedder:
    """A cheap deterministic embedder (normalised coarse magnitude spectrum) that counts the clips it embeds."""

    name = "spectrum"

    def __init__(self) -> None:
        self.clips = 0

    def embed_audio(self, waves, sr):
        self.clips += len(waves)
        out = [np.abs(np.fft.rfft(w))[:64] + 1e-9 for w in waves]
        return np.stack([e / np.linalg.norm(e) for e in out])

    def embed_text(self, texts):
        return np.stack([np.roll(np.eye(64)[0], len(t) % 64) for t in texts])


def test_lazy_sweep_scores_only_what_the_answer_needs(eval_model_dir):
    from fluxmusic.evaluation.sweep import steps_sweep
    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(eval_model_dir)
    prompts = ["a fast piano melody", "a slow organ tune"]
    emb = _SpectrumEmbedder()
    text = emb.embed_text(prompts)
    ref_emb = np.random.default_rng(0).normal(size=(6, 64))
    kw = dict(guidance=3.0, steps=(1, 2, 3), shifts=(None,), solvers=("euler", "ab2"), intervals=((0.5, 1.0),),
              cache_thresholds=(), schedules=(), base={"solver": "euler", "steps": 3, "shift": None},
              target_steps=3, reference_steps=6, progress=False)
    lazy = steps_sweep(pipe, prompts, text, ref_emb, emb, score_all=False, **kw)
    scored = [r for r in lazy["rows"] if r["fad"] is not None]
    target = next(r for r in lazy["rows"] if (r["solver"], r["steps"]) == ("euler", 3) and r["kind"] == "grid")
    assert target in scored
    # every scored row matches the target by latent distance; rows farther away are never decoded
    assert all(r["latent_distance"] <= target["latent_distance"] for r in scored)
    assert any(r["fad"] is None for r in lazy["rows"])
    # decoded: the scored rows, the target's second seed set, the reference solution (2 clips each)
    assert emb.clips == 2 * (len(scored) + 2)
    both = lazy["fewest"]["both"]
    assert both is not None and both["cost"] <= target["cost"]
    full = steps_sweep(pipe, prompts, text, ref_emb, emb, score_all=True, **kw)
    assert all(r["fad"] is not None for r in full["rows"])
    assert full["fewest"]["both"]["label"] == both["label"]  # the lazy answer is the full sweep's answer


def test_eval_cli_rejects_bad_input_with_one_message(eval_model_dir, tiny_corpus, tmp_path, capsys):
    from fluxmusic.cli import main

    one = tmp_path / "one.txt"
    one.write_text("only one prompt\n")
    base = ["eval", "--model", str(eval_model_dir), "--reference", str(tiny_corpus), "--quiet"]
    assert main(base + ["--prompts", str(one), "--out", str(tmp_path / "r.json")]) == 2
    assert "at least 2 are needed" in capsys.readouterr().err
    assert main(base + ["--prompts", str(tiny_corpus), "--out", str(tmp_path / "r.txt")]) == 2
    assert "must end in .json" in capsys.readouterr().err
    sweep = base + ["--prompts", str(tiny_corpus), "--out", str(tmp_path / "r.json"), "--sweep"]
    for extra, message in ((["--sweep-caches", "2"], "--sweep-caches: cache_threshold 2.0 is invalid"),
                           (["--sweep-schedules", "exp"], "--sweep-schedules: guidance_schedule 'exp' is invalid"),
                           (["--sweep-intervals", "0.5"], "--sweep-intervals '0.5' must be T_MIN:T_MAX"),
                           (["--sweep-intervals", "0.6:0.2"], "guidance_interval (0.6, 0.2) is invalid"),
                           (["--sweep-solvers", "rk4"], "--sweep-solvers: solver 'rk4' is invalid")):
        assert main(sweep + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
