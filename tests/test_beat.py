"""Beat-grid conditioning (fluxmusic.beat) and the register hint (fluxmusic.register): the features, the tempo and
register read from a prompt, the phase read from audio, the zero-initialised control columns, the fine-tune that
trains them, and generation that feeds them (torch, ONNX, gRPC)."""

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from fluxmusic.beat import (
    BEAT_CHANNELS,
    beat_features,
    bpm_from_prompt,
    estimate_beat_phase,
    prompt_bpm,
)
from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer, add_context_input, masked_context
from fluxmusic.register import REGISTER_CHANNELS, register_features, register_from_prompt

SR = 16000


def click_track(bpm: float, t0: float, seconds: float = 6.0) -> np.ndarray:
    """Decaying 1 kHz clicks on every beat of ``bpm`` from ``t0``, over low noise."""
    n = int(seconds * SR)
    x = 0.01 * np.random.default_rng(0).standard_normal(n)
    click = np.sin(2 * np.pi * 1000 * np.arange(800) / SR) * np.exp(-np.arange(800) / 120)
    for t in np.arange(t0, seconds, 60.0 / bpm):
        i = int(t * SR)
        x[i : i + 800] += click[: n - i]
    return x.astype(np.float32)


def test_features_put_phase_zero_on_the_beats_and_zeros_without_one():
    spf = 0.08
    f = beat_features(torch.tensor([120.0, float("nan")]), torch.tensor([0.04, 0.0]), 8, 3, spf)
    assert f.shape == (2, 4 * 3, BEAT_CHANNELS)
    assert torch.all(f[1] == 0)  # no beat given: flag 0 and no phase
    assert torch.all(f[0, :, 0] == 1)
    rows = f[0].reshape(4, 3, BEAT_CHANNELS)
    assert torch.equal(rows[:, 0], rows[:, 2])  # every frequency token of a time step carries the same grid
    # frame 0's centre (0.04 s) is the beat: cos 1 for both harmonics; 120 BPM = 0.5 s = 6.25 frames a beat
    assert rows[0, 0, 1] == pytest.approx(1.0) and rows[0, 0, 3] == pytest.approx(1.0)
    frame5 = rows[2, 0, 1 + 4]  # token 2, its second frame (frame 5): phase 5 * 0.08 / 0.5 = 0.8 beats
    assert frame5 == pytest.approx(math.cos(2 * math.pi * 0.8), abs=1e-6)
    later = beat_features(torch.tensor([120.0]), torch.tensor([0.04]), 8, 1, spf, start_s=0.5)
    assert torch.allclose(later[0], rows[:, 0], atol=1e-6)  # one beat later the grid repeats
    with pytest.raises(FluxMusicError, match="multiple of the patch size"):
        beat_features(torch.tensor([120.0]), torch.tensor([0.0]), 7, 1, spf)


@pytest.mark.parametrize("prompt, bpm", [
    ("Loud piece for woodwinds in D major, 104 beats per minute", 104.0), ("a jig at 132.5 BPM", 132.5),
    ("A slow Bach chorale on church organ", 77.0), ("an allegro for strings", 140.0), ("fast reel", 152.0),
    ("calm piano", None), ("12 bars", None),
])
def test_tempo_is_read_from_the_prompt(prompt, bpm):
    assert bpm_from_prompt(prompt) == bpm


def test_bpm_checks(tiny_pipe):
    assert prompt_bpm("a march at 1000 bpm") is None and bpm_from_prompt("a march at 1000 bpm") == 1000.0
    assert tiny_pipe.request("calm piano", bpm=96).items[0].bpm == 96.0
    assert tiny_pipe.request("calm piano").items[0].bpm is None
    assert tiny_pipe.request("a slow piece at 1000 bpm").items[0].bpm is None  # out of range: not a tempo
    for bad in (0, 1000, float("nan"), "fast", True):
        with pytest.raises(FluxMusicError, match=r"bpm .* is invalid; allowed: a number in \[20, 400\]"):
            tiny_pipe.request("calm piano", bpm=bad)
    with pytest.raises(FluxMusicError, match=r"bpm 0 is invalid"):
        estimate_beat_phase(np.zeros(SR, dtype=np.float32), SR, 0)


def test_long_form_keeps_the_given_audios_beat_in_every_window(beat_model_dir, monkeypatch, one_torch_thread):
    """A long-form song continued from audio: every window's grid is the one grid of the song, on the given
    audio's beat (later windows get the previous window's tail, not the audio, and must not restart the grid
    at phase 0)."""
    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(beat_model_dir)
    grids: list[torch.Tensor] = []
    real = pipe.backend.velocity

    def spy(x, t, txt, y, rope, context=None):
        grid = context[0, :, -BEAT_CHANNELS:].clone()  # the cond row's beat tokens
        if not grids or not torch.equal(grids[-1], grid):
            grids.append(grid)
        return real(x, t, txt, y, rope, context=context)

    monkeypatch.setattr(pipe.backend, "velocity", spy)
    wave = click_track(100.0, 0.2, 3.0)
    kw = dict(audio=wave, keep="0:2", duration=20.0, overlap=5.12, seed=0, bpm=100, steps=2)
    song = pipe("music", **kw)
    geo = pipe.geometry
    windows = pipe.request("music", **kw).long_form.windows(geo)
    assert song.windows == len(windows) == len(grids) >= 3
    t0 = torch.tensor([estimate_beat_phase(wave, SR, 100.0)[0]])
    assert 0.15 < float(t0) < 0.25
    for w, grid in zip(windows, grids):
        expected = beat_features(torch.tensor([100.0]), t0, w.frames, geo.latent_width // geo.patch,
                                 geo.seconds_per_latent_frame, w.start * geo.seconds_per_latent_frame)[0]
        torch.testing.assert_close(grid, expected.to(grid), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bpm, t0", [(120.0, 0.13), (75.0, 0.5), (170.0, 0.02)])
def test_phase_is_read_from_audio(bpm, t0):
    est, lock = estimate_beat_phase(click_track(bpm, t0), SR, bpm)
    period = 60.0 / bpm
    err = (est - t0 + period / 2) % period - period / 2
    assert 0.0 <= err < 0.03 and lock > 3.0  # the onset envelope peaks 15-20 ms after an attack
    _, noise_lock = estimate_beat_phase(0.1 * np.random.default_rng(1).standard_normal(6 * SR).astype(np.float32),
                                        SR, bpm)
    assert noise_lock < lock / 2


def _tiny_cfg(**kw) -> FluxMusicConfig:
    return FluxMusicConfig(in_channels=32, vec_in_dim=16, context_in_dim=24, hidden_size=32, num_heads=2, depth=1,
                           depth_single_blocks=1, axes_dim=(4, 6, 6), **kw)


def test_config_and_zero_initialised_beat_columns():
    cfg = _tiny_cfg(context_channels=64 + BEAT_CHANNELS, beat_channels=BEAT_CHANNELS)
    assert FluxMusicConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["beat_channels"] == BEAT_CHANNELS
    assert "beat_channels" not in _tiny_cfg(context_channels=64).to_dict()
    with pytest.raises(FluxMusicError, match=r"context_channels = 64 \(with beat_channels 9 and register_channels 0: "
                       r"2 x in_channels \+ both = 73"):
        _tiny_cfg(context_channels=64, beat_channels=BEAT_CHANNELS)
    with pytest.raises(FluxMusicError, match=r"beat_channels = 4 \(0: no beat grid, or 9\)"):
        _tiny_cfg(context_channels=68, beat_channels=4)

    torch.manual_seed(0)
    masked = add_context_input(FluxMusicTransformer(_tiny_cfg()))
    with torch.no_grad():
        masked.context_in.weight.normal_()  # a trained-looking masked model
    beat = add_context_input(masked, BEAT_CHANNELS).eval()
    assert beat.takes_beat and not masked.takes_beat
    g = torch.Generator().manual_seed(0)
    x, t, txt, y = torch.randn(2, 8, 32, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 24), \
        torch.randn(2, 16)
    rope = masked.rope_for(5, 4, 2)
    ctx = masked_context(torch.randn_like(x), (torch.arange(8) < 3).float()[None, :, None])
    grid = beat_features(torch.tensor([100.0, 140.0]), torch.zeros(2), 8, 2, 0.08)
    with torch.no_grad():
        ref = masked.eval()(x, t, txt, y, rope, context=ctx)
        assert torch.equal(beat(x, t, txt, y, rope, context=torch.cat((ctx, grid), -1)), ref)  # step 0 = the base
    with pytest.raises(ValueError, match="already takes a context input"):
        add_context_input(beat, BEAT_CHANNELS)


@pytest.fixture(scope="module")
def beat_cache(tmp_path_factory, tiny_model_dir):
    """A tiny embedding cache whose items come from click-track clips of a manifest, with the beat phases added
    by the real CLI."""
    from fluxmusic.pipeline import FluxMusicPipeline
    from fluxmusic.training.beat_phases import main
    from fluxmusic.training.cache import write_cache

    root = tmp_path_factory.mktemp("beatcache")
    pipe = FluxMusicPipeline.from_pretrained(tiny_model_dir)
    geo = pipe.geometry
    seconds = geo.max_latent_frames * geo.seconds_per_latent_frame
    cond, null = pipe.conditioning(["slow", "fast"]), pipe.conditioning([""])
    rows, items = [], []
    for i in range(8):
        bpm, t0 = 80.0 + 15 * i, 0.05 * i
        path = root / f"clip{i}.wav"
        sf.write(path, click_track(bpm, t0, seconds), SR)
        meta = {"caption": f"clip {i}", "bpm": bpm, "work": f"w{i}", "transpose": 0, "note_density": 1.0 + i,
                "split": "val" if i % 4 == 0 else "train", "register": ("mid", "high")[i % 2]}
        rows.append({"path": str(path), **meta})
        wave = torch.from_numpy(click_track(bpm, t0, seconds))[None]
        items.append({"latent": pipe.encode_audio(wave)[0], "txt": cond.txt[i % 2], "y": cond.y[i % 2], **meta})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = write_cache(root / "cache", items, null_txt=null.txt[0], null_y=null.y[0])
    assert main(["--cache", str(cache), "--manifest", str(root / "manifest.jsonl"), "--seconds", str(seconds)]) == 0
    return cache


def test_phases_cli_writes_each_items_phase(beat_cache):
    from fluxmusic.training.cache import CachedEmbeddingDataset

    meta = [json.loads(line) for line in (beat_cache / "items.jsonl").read_text().splitlines()]
    for i, m in enumerate(meta):
        period = 60.0 / m["bpm"]
        err = (m["beat_t0"] - 0.05 * i + period / 2) % period - period / 2
        assert 0.0 <= err < 0.03
    ds = CachedEmbeddingDataset(beat_cache).with_beats()
    assert ds.seconds_per_frame > 0 and ds[3]["beat"][0] == pytest.approx(125.0)
    assert float(ds[3]["register"]) == 80.0 and float(ds[2]["register"]) == 66.0


def test_melody_pitch_becomes_the_register_target(tmp_path):
    """``beat_phases --melody`` measures each clip's melody pitch (the evaluation's estimator); the register hint
    then trains on that pitch instead of its register word's class centre."""
    from fluxmusic.training.beat_phases import main
    from fluxmusic.training.cache import CachedEmbeddingDataset, write_cache

    seconds, rows, items = 3.0, [], []
    null = torch.zeros(5, 4), torch.zeros(6)
    t = np.arange(int(seconds * SR)) / SR
    for i, midi in enumerate((62.0, 77.0, None)):
        path = tmp_path / f"tone{i}.wav"
        hz = 440.0 * 2 ** (((midi or 60.0) - 69) / 12)
        # a plucked tone every beat (so the clip also has a beat phase); the third clip is silent
        env = np.exp(-((t % 0.5) * 8.0)) if midi is not None else np.zeros_like(t)
        sf.write(path, (0.3 * env * np.sin(2 * np.pi * hz * t)).astype(np.float32), SR)
        meta = {"caption": f"tone {i}", "bpm": 120.0, "register": "mid", "work": f"w{i}", "split": "train"}
        rows.append({"path": str(path), **meta})
        items.append({"latent": torch.zeros(2, 4, 4), "txt": null[0], "y": null[1], **meta})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = write_cache(tmp_path / "cache", items, null_txt=null[0], null_y=null[1])
    args = ["--cache", str(cache), "--manifest", str(tmp_path / "manifest.jsonl"), "--seconds", str(seconds)]
    assert main([*args, "--melody", "--vocabulary", "nonesuch"]) == 2  # one clear error, nothing written
    assert "melody_midi" not in (cache / "items.jsonl").read_text()
    assert main([*args, "--melody"]) == 0
    meta = [json.loads(line) for line in (cache / "items.jsonl").read_text().splitlines()]
    assert abs(meta[0]["melody_midi"] - 62.0) <= 1 and abs(meta[1]["melody_midi"] - 77.0) <= 1
    assert meta[2]["melody_midi"] is None  # silence has no pitch
    targets = CachedEmbeddingDataset(cache).with_beats()._registers.tolist()
    assert targets[:2] == [meta[0]["melody_midi"], meta[1]["melody_midi"]]
    assert targets[2] == 66.0  # no measured pitch: the "mid" class centre


def test_cache_without_phases_says_how_to_add_them(tiny_model_dir, tmp_path):
    from fluxmusic.training.cache import CachedEmbeddingDataset, write_cache

    null = torch.zeros(5, 4), torch.zeros(6)
    cache = write_cache(tmp_path / "c", [{"latent": torch.zeros(2, 4, 4), "txt": null[0], "y": null[1],
                                          "caption": "x", "bpm": 90}], null_txt=null[0], null_y=null[1])
    with pytest.raises(FluxMusicError, match="no beat phases .* fluxmusic.training.beat_phases"):
        CachedEmbeddingDataset(cache).with_beats()


def test_beat_finetune_trains_the_beat_columns(tiny_model_dir, beat_cache, tmp_path, one_torch_thread):
    from fluxmusic.training.masked_finetune import main
    from fluxmusic.transformer_io import load_transformer

    def args(base, out, beat=True):
        return ["--transformer", str(base), "--cache", str(beat_cache), "--out", str(out), "--steps", "4",
                "--batch-size", "2", "--lr", "1e-3", "--val-items", "2", *(["--beat"] if beat else [])]

    out = tmp_path / "beat"
    assert main(args(tiny_model_dir / "transformer", out)) == 0
    model = load_transformer(out)
    assert model.takes_beat and model.config.context_channels == 2 * model.config.in_channels + BEAT_CHANNELS
    w = model.context_in.weight.detach()
    assert float(w[:, -BEAT_CHANNELS:].abs().sum()) > 0  # the zero-initialised beat columns were trained
    assert json.loads((out / "finetune.json").read_text())["beat"] is True
    # a beat model is trained further as it is, and refuses training without its beat grid
    assert main(args(out, tmp_path / "more")) == 0
    assert load_transformer(tmp_path / "more").takes_beat
    assert main(args(out, tmp_path / "nobeat", beat=False)) == 2
    assert not (tmp_path / "nobeat").exists()


@pytest.fixture(scope="module")
def beat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a beat-grid transformer whose beat columns are seeded, non-zero values."""
    from fluxmusic.transformer_io import load_transformer, save_transformer

    d = tmp_path_factory.mktemp("beatmodel") / "model"
    shutil.copytree(tiny_model_dir, d)
    ext = add_context_input(load_transformer(tiny_model_dir / "transformer"), BEAT_CHANNELS)
    with torch.no_grad():
        ext.context_in.weight[:, -BEAT_CHANNELS:].normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    shutil.rmtree(d / "transformer")
    save_transformer(ext, d / "transformer")
    return d


def test_generation_feeds_the_grid_from_the_prompt_or_bpm(beat_model_dir, monkeypatch, one_torch_thread):
    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(beat_model_dir)
    assert pipe.beat_channels == BEAT_CHANNELS
    seen = []
    real = pipe.backend.velocity

    def spy(x, t, txt, y, rope, context=None):
        seen.append(context)
        return real(x, t, txt, y, rope, context=context)

    monkeypatch.setattr(pipe.backend, "velocity", spy)
    slow = pipe("a slow chorale", duration=2.56, seed=0)
    assert seen and all(c is not None and c.shape[0] == 2 and c.shape[-1] == 64 + BEAT_CHANNELS for c in seen)
    assert torch.all(seen[0][..., :64] == 0)  # no known audio
    # beat guidance: the cond row gets the grid, the uncond row (null prompt) does not
    assert torch.all(seen[0][0, :, 64] == 1) and torch.all(seen[0][1, :, 64:] == 0)
    as_bpm = pipe("a slow chorale", duration=2.56, seed=0, bpm=77)
    np.testing.assert_array_equal(slow.audio[0], as_bpm.audio[0])  # "slow" = 77 BPM
    fast = pipe("a slow chorale", duration=2.56, seed=0, bpm=150)
    assert not np.array_equal(slow.audio[0], fast.audio[0])
    seen.clear()
    pipe("calm piano", duration=2.56, seed=0)
    assert torch.all(seen[0][..., 64] == 0)  # the prompt names no tempo: no grid
    long = pipe("a slow chorale", duration=12.0, overlap=2.56, seed=0)
    assert long.windows >= 2
    wave = click_track(100.0, 0.2, 3.0)
    cont = pipe("music at 100 BPM", audio=wave, keep="0:2", duration=2.56, seed=0)
    assert np.isfinite(cont.audio[0]).all()
    with pytest.raises(FluxMusicError, match=r"bpm 0 is invalid"):
        pipe.request("calm piano", bpm=0)
    with pytest.raises(FluxMusicError, match="step caching .* beat grid"):
        pipe("a slow chorale", duration=2.56, seed=0, cache_threshold=0.1)


@pytest.fixture(scope="module")
def control_model_dir(beat_model_dir, tmp_path_factory):
    """The beat model further extended with the register hint, its new columns seeded, non-zero values."""
    from fluxmusic.transformer_io import load_transformer, save_transformer

    d = tmp_path_factory.mktemp("ctlmodel") / "model"
    shutil.copytree(beat_model_dir, d)
    beat = load_transformer(beat_model_dir / "transformer")
    ext = add_context_input(beat, BEAT_CHANNELS, REGISTER_CHANNELS)
    assert torch.equal(ext.context_in.weight[:, :-REGISTER_CHANNELS], beat.context_in.weight)  # beat kept
    with torch.no_grad():
        ext.context_in.weight[:, -REGISTER_CHANNELS:].normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    shutil.rmtree(d / "transformer")
    save_transformer(ext, d / "transformer")
    return d


@pytest.mark.parametrize("prompt, word", [
    ("A medium major piece on harp, solo texture, mid register", "mid"), ("violin in a high register", "high"),
    ("a low-pitched drone", "low"), ("cello in the bass range", "low"), ("calm piano", None),
    ("high energy rock", None),
])
def test_register_is_read_from_the_prompt(prompt, word):
    assert register_from_prompt(prompt) == word


def test_register_hint_features_and_generation(control_model_dir, monkeypatch, one_torch_thread):
    from fluxmusic.pipeline import FluxMusicPipeline

    f = register_features(torch.tensor([80.0, 50.0, float("nan")]), 2, 4)
    assert f.shape == (3, 8, REGISTER_CHANNELS) and torch.all(f[2] == 0)
    assert torch.allclose(f[0, :, :2], torch.tensor([1.0, (80.0 - 66.0) / 12]).expand(8, -1))
    assert torch.equal(f[0, :4], f[0, 4:])  # the same on every time step
    band = f[0, :4, 2]  # token centre minus the pitch's place on the frequency axis: 80 (831 Hz) sits in token 1
    assert torch.allclose(band[1:] - band[:-1], torch.ones(3)) and -0.5 < float(band[1]) < 0.5
    assert float(f[1, 0, 2]) > float(band[0])  # MIDI 50 lies lower, so every token sits further above it
    pipe = FluxMusicPipeline.from_pretrained(control_model_dir)
    assert pipe.control_channels == (BEAT_CHANNELS, REGISTER_CHANNELS)
    seen = []
    real = pipe.backend.velocity
    monkeypatch.setattr(pipe.backend, "velocity", lambda *a, context=None: seen.append(context) or real(
        *a, context=context))
    high = pipe("a slow tune in a high register", duration=2.56, seed=0)
    c = seen[0]
    assert c.shape[-1] == 64 + BEAT_CHANNELS + REGISTER_CHANNELS
    assert torch.all(c[0, :, -3] == 1) and torch.allclose(c[0, :, -2], torch.tensor((80.0 - 66.0) / 12))
    assert torch.all(c[1, :, 64:] == 0)  # the uncond row gets neither control
    same = pipe("a slow tune in a high register", duration=2.56, seed=0, register="high")
    np.testing.assert_array_equal(high.audio[0], same.audio[0])
    low = pipe("a slow tune in a high register", duration=2.56, seed=0, register="low")  # explicit wins
    assert not np.array_equal(high.audio[0], low.audio[0])
    with pytest.raises(FluxMusicError, match=r"register 'soprano' is invalid; allowed: low, mid, high"):
        pipe.request("calm piano", register="soprano")


def test_register_finetune_keeps_the_beat_and_trains_the_hint(beat_model_dir, beat_cache, tmp_path,
                                                              one_torch_thread):
    from fluxmusic.training.masked_finetune import main
    from fluxmusic.transformer_io import load_transformer

    out = tmp_path / "reg"
    assert main(["--transformer", str(beat_model_dir / "transformer"), "--cache", str(beat_cache), "--out", str(out),
                 "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--val-items", "2", "--beat",
                 "--register"]) == 0
    model = load_transformer(out)
    assert model.control_channels == BEAT_CHANNELS + REGISTER_CHANNELS
    assert float(model.context_in.weight.detach()[:, -REGISTER_CHANNELS:].abs().sum()) > 0
    # without --register a register model is refused, not silently cut down
    assert main(["--transformer", str(out), "--cache", str(beat_cache), "--out", str(tmp_path / "x"), "--steps",
                 "2", "--beat"]) == 2


def test_generate_cli_takes_bpm(beat_model_dir, tmp_path, one_torch_thread):
    from fluxmusic.cli import main

    out = tmp_path / "a.wav"
    assert main(["generate", "calm piano", "-o", str(out), "--model", str(beat_model_dir), "--duration", "2.56",
                 "--bpm", "96", "--seed", "1", "--threads", "1"]) == 0
    assert out.is_file()
    assert main(["generate", "calm piano", "-o", str(tmp_path / "b.wav"), "--model", str(beat_model_dir),
                 "--bpm", "9999"]) != 0
    assert not (tmp_path / "b.wav").exists()


def test_onnx_control_model_equals_torch(control_model_dir, tmp_path, monkeypatch, one_torch_thread):
    """The beat grid rides in the graphs' context input: text-to-music on the onnx backend (velocity graph and
    fused step graph) gets the same context and ends at the same latents as torch fp32."""
    pytest.importorskip("onnxruntime")
    from fluxmusic.export.onnx_export import export_onnx, read_manifest

    from fluxmusic.pipeline import FluxMusicPipeline

    out = tmp_path / "onnx"
    export_onnx(control_model_dir, out, step_graph=True, progress=None)
    width = read_manifest(out)["components"]["transformer"]["inputs"][-1]["shape"][-1]
    assert width == 64 + BEAT_CHANNELS + REGISTER_CHANNELS
    ref = FluxMusicPipeline.from_pretrained(control_model_dir, dtype="fp32")
    onnx = FluxMusicPipeline.from_pretrained(control_model_dir, backend="onnx", onnx_dir=out)
    assert onnx.beat_channels == BEAT_CHANNELS
    latents: list = []
    for pipe in (ref, onnx):
        real_d = pipe.backend.vae_decode
        monkeypatch.setattr(pipe.backend, "vae_decode", lambda z, real_d=real_d: latents.append(z) or real_d(z))
    for fused in (True, False):
        if not fused:
            del onnx.backend.graphs["euler_step"]
        latents.clear()
        for pipe in (ref, onnx):
            pipe("a fast reel in a high register", seed=0, steps=4, solver="euler", duration=2.56)
        za, zb = latents
        assert float((za - zb).abs().max()) <= 1e-4 * float(za.abs().max()), fused


def test_grpc_takes_bpm_and_register(control_model_dir, beat_model_dir, one_torch_thread):
    pytest.importorskip("grpc_health")
    import grpc
    from fluxmusic.runtime.client import FluxMusicClient
    from fluxmusic.runtime.server import FluxMusicServer, ServerConfig

    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(control_model_dir)
    ref = FluxMusicPipeline.from_pretrained(control_model_dir)
    server = FluxMusicServer(pipe, ServerConfig(port=0)).start()
    try:
        with FluxMusicClient(server.target) as client:
            limits = client.model_info().limits
            assert limits.beat_grid and limits.register_hint
            kw = dict(duration=0.64, steps=2, seed=4)
            got = client.generate("calm piano", encoding="pcm_f32le", bpm=150, register="high", **kw).audio[0]
            np.testing.assert_array_equal(got, ref("calm piano", bpm=150, register="high", **kw).audio[0])
            assert not np.array_equal(got, ref("calm piano", **kw).audio[0])
            with pytest.raises(grpc.RpcError) as e:
                client.stub.Generate(client_request("calm piano", bpm=1000.0))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("bpm ")
            with pytest.raises(grpc.RpcError) as e:
                client.stub.Generate(client_request("calm piano", register="alto"))
            assert e.value.details().startswith("register ")
    finally:
        server.stop(grace=0)
    plain = FluxMusicServer(FluxMusicPipeline.from_pretrained(beat_model_dir), ServerConfig(port=0)).start()
    try:
        with FluxMusicClient(plain.target) as client:
            assert not client.model_info().limits.register_hint
            with pytest.raises(grpc.RpcError) as e:
                client.stub.Generate(client_request("calm piano", register="high"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "takes no register hint" in e.value.details()
    finally:
        plain.stop(grace=0)


def client_request(prompt: str, **kw):
    from fluxmusic.runtime.client import build_request

    return build_request(prompt, **kw)


def test_gpu_transformer_trains_the_beat_and_register_stages_too(beat_cache, tiny_model_dir, tmp_path,
                                                                 one_torch_thread):
    """benchmarks/gpu_transformer.py: the pack keeps the beat phases and melody pitches; its third stage trains the
    beat grid and its fourth the register hint, which refuses a pack without melody pitches."""
    import importlib.util
    import shutil
    from pathlib import Path

    from fluxmusic.pipeline import FluxMusicPipeline

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_transformer.py"
    spec = importlib.util.spec_from_file_location("gpu_transformer", path)
    gt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gt)
    config = tiny_model_dir / "transformer" / "config.json"
    gt.pack(beat_cache, tmp_path / "no_melody.npz", config)
    with pytest.raises(FluxMusicError, match="no melody pitches"):
        gt.train_on_device(tmp_path / "no_melody.npz", tmp_path / "x", 0.01, 0.01, 2, "cpu", tmp_path / "w0",
                           beat_minutes=0.01, register_minutes=0.01)
    cache = Path(shutil.copytree(beat_cache, tmp_path / "cache"))
    items = [json.loads(line) for line in (cache / "items.jsonl").read_text().splitlines()]
    (cache / "items.jsonl").write_text("".join(json.dumps({**m, "melody_midi": 55.0 + 3 * i}) + "\n"
                                               for i, m in enumerate(items)))
    gt.pack(cache, tmp_path / "p.npz", config)
    summary = gt.train_on_device(tmp_path / "p.npz", tmp_path / "out", 0.01, 0.01, 2, "cpu", tmp_path / "work",
                                 beat_minutes=0.01, register_minutes=0.01)
    assert [s["stage"] for s in summary["stages"]] == ["plain", "masked", "beat", "register"]
    pipe = FluxMusicPipeline.from_pretrained(gt.assemble(tmp_path / "out", tmp_path / "model", tiny_model_dir))
    assert pipe.control_channels == (BEAT_CHANNELS, REGISTER_CHANNELS)
    assert np.isfinite(pipe("a fast reel in a high register", steps=1, duration=1.0, seed=0).audio[0]).all()


def test_eval_sweep_on_a_control_model_skips_step_caching(control_model_dir, tmp_path, capsys, one_torch_thread):
    """`fluxmusic eval --sweep` on a model with a beat grid / register hint runs, without the step-cache variants
    (which the pipeline refuses on such a model)."""
    from fluxmusic.cli import main
    from fluxmusic.data.synth import make_corpus

    corpus = make_corpus(tmp_path / "corpus", hours=4 * 10.24 / 3600, seed=3, progress=False)
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(control_model_dir), "--prompts", str(corpus), "--reference",
                 str(corpus.parent), "--quiet", "--steps", "2", "--no-untrained", "--out", str(out), "--sweep",
                 "--sweep-prompts", "2", "--sweep-steps", "1,2", "--sweep-target", "2", "--sweep-reference-steps",
                 "4", "--sweep-caches", "0.2", "--sweep-solvers", "euler"]) == 0
    assert "no step-cache variants" in capsys.readouterr().err
    rows = json.loads(out.read_text())["steps_sweep"]["rows"]
    assert rows and not any(r.get("cache_threshold") for r in rows)


def test_triton_bls_request_takes_bpm_and_register(tiny_pipe):
    """The BLS model's bpm / register inputs reach the request as the gRPC fields and CLI options do."""
    from fluxmusic.runtime.triton_bls import parse_request

    from fluxmusic.sampling import build_request

    req = parse_request({"prompt": np.array([b"calm piano"], dtype=object), "bpm": np.array([96.0], np.float32),
                         "register": np.array([b"high"], dtype=object)})
    built = build_request(tiny_pipe.defaults, tiny_pipe.geometry, req.prompt, **req.options())
    assert (built.items[0].bpm, built.items[0].register) == (96.0, "high")
    plain = parse_request({"prompt": np.array([b"a slow tune in a low register"], dtype=object)})
    item = build_request(tiny_pipe.defaults, tiny_pipe.geometry, plain.prompt, **plain.options()).items[0]
    assert (item.bpm, item.register) == (77.0, "low")
    bad = parse_request({"prompt": np.array([b"x"], dtype=object), "register": np.array([b"alto"], dtype=object)})
    with pytest.raises(FluxMusicError, match="register 'alto' is invalid"):
        build_request(tiny_pipe.defaults, tiny_pipe.geometry, bad.prompt, **bad.options())


def test_explicit_controls_need_a_model_that_takes_them(tiny_pipe, beat_model_dir, one_torch_thread):
    """--bpm / --register on a model without the input is one clear error, not silently ignored; the same words in a
    prompt are fine (they condition through the text)."""
    from fluxmusic.pipeline import FluxMusicPipeline

    with pytest.raises(FluxMusicError, match="bpm is set, but this model's transformer takes no beat grid"):
        tiny_pipe("calm piano", duration=0.64, steps=1, bpm=90)
    tiny_pipe("calm piano at 90 BPM in a high register", duration=0.64, steps=1)
    beat = FluxMusicPipeline.from_pretrained(beat_model_dir)
    beat("calm piano", duration=0.64, steps=1, bpm=90)
    with pytest.raises(FluxMusicError, match="register is set, but this model's transformer takes no register hint"):
        beat("calm piano", duration=0.64, steps=1, register="high")
