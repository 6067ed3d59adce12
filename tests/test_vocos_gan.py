"""The iSTFT-head vocoder, the discriminators and their losses, and the adversarial vocoder trainer
(learning, export through the strict loader, kill-free resume equal step for step)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxmusic.audio import MelConfig, log_mel
from fluxmusic.data.synth import synth_clip
from fluxmusic.training.audio_data import ClipBank, WaveMelCropDataset
from fluxmusic.training.checkpointing import CHECKPOINT_NAME
from fluxmusic.training.config import TrainConfig
from fluxmusic.training.discriminators import (
    Discriminators,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)
from fluxmusic.training.loop import train
from fluxmusic.training.vocoder_task import VocoderConfig, VocoderTask
from fluxmusic.vocos import InverseSTFT, VocosConfig, VocosVocoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_VOCOS = dict(kind="vocos", vocos_hidden=32, vocos_intermediate=64, vocos_layers=2, disc_periods=(2, 3),
                  disc_ffts=(256,))


@pytest.fixture(scope="module")
def bank() -> ClipBank:
    clips = [synth_clip(i, seconds=2.0) for i in range(4)]
    waves = torch.from_numpy(np.stack([c[0] for c in clips]))
    return ClipBank(waves, log_mel(waves), [c[2] for c in clips], [c[1] for c in clips], MelConfig())


@pytest.mark.parametrize(("n_fft", "hop"), [(640, 160), (512, 128)])
def test_inverse_stft_inverts_torch_stft(n_fft, hop):
    x = torch.randn(2, 40 * hop)
    spec = torch.stft(x, n_fft, hop, n_fft, torch.hann_window(n_fft), center=True, return_complex=True)[..., :40]
    y = InverseSTFT(n_fft, hop)(spec.real, spec.imag)
    assert y.shape == (2, 40 * hop)
    inner = slice(0, 40 * hop - n_fft)  # the last frames lack their overlapping successors
    assert float((y[:, inner] - x[:, inner]).abs().max()) < 1e-4


def test_vocos_shapes_and_round_trip_through_the_strict_loader(tmp_path):
    from fluxmusic.components import load_vocoder
    from fluxmusic.modeldir import geometry_from_components

    model = VocosVocoder(VocosConfig(hidden_size=32, intermediate_size=64, num_layers=2)).eval()
    mel = torch.randn(3, 25, 64)
    assert model(mel).shape == (3, 25 * 160) and model(mel[0]).shape == (25 * 160,)
    model.save_pretrained(str(tmp_path / "voc"))
    loaded = load_vocoder(tmp_path / "voc")
    assert type(loaded).__name__ == "VocosVocoder"
    with torch.no_grad():
        assert torch.equal(loaded(mel), model(mel))
    cfg = loaded.config.to_dict()
    vae_cfg = {"latent_channels": 8, "block_out_channels": [8, 8, 8]}
    assert geometry_from_components(vae_cfg, cfg).hop_length == 160


def test_vocoder_folder_of_unknown_class_is_one_clear_error(tmp_path):
    from fluxmusic.components import load_vocoder
    from fluxmusic.errors import FluxMusicError

    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "config.json").write_text('{"model_type": "wavenet"}')
    with pytest.raises(FluxMusicError, match="model_type 'wavenet'.*allowed"):
        load_vocoder(tmp_path / "voc")


def test_discriminator_losses_have_the_lsgan_optima():
    torch.manual_seed(0)
    disc = Discriminators(periods=(2, 3), ffts=(256,), period_channels=(4, 8), spec_channels=4)
    wave = torch.randn(2, 4000)
    out = disc(wave)
    assert len(out) == 3 and all(s.dim() == 2 and len(f) >= 3 for s, f in out)
    ones = [(torch.ones(2, 5), []) for _ in range(3)]
    zeros = [(torch.zeros(2, 5), []) for _ in range(3)]
    assert float(discriminator_loss(ones, zeros)) == 0.0  # D perfect: real -> 1, fake -> 0
    assert float(discriminator_loss(zeros, ones)) == 2.0
    assert float(generator_loss(ones)) == 0.0 and float(generator_loss(zeros)) == 1.0
    assert float(feature_matching_loss(out, out)) == 0.0
    other = disc(torch.randn(2, 4000))
    assert float(feature_matching_loss(out, other)) > 0


def test_adversarial_update_gives_each_side_only_its_own_gradient(bank):
    task = VocoderTask(WaveMelCropDataset(bank, 16), config=VocoderConfig(adversarial=True, **TINY_VOCOS))
    model = task.build_model()
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    g = torch.Generator().manual_seed(0)
    # The full loss's discriminator gradient equals that of the discriminator loss alone (no generator term
    # leaks into D), and the generator's equals that of its terms alone (the D loss uses detached audio).
    loss, logs = task.loss(model, batch, g)
    loss.backward()
    d_full = [p.grad.clone() for p in model.discriminators.parameters()]
    g_full = [p.grad.clone() for p in model.generator.parameters()]
    model.zero_grad()
    pred = model(batch["mel"])[:, : batch["wave"].shape[1]]
    d_only = discriminator_loss(model.discriminators(batch["wave"]), model.discriminators(pred.detach()))
    d_only.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(d_full, model.discriminators.parameters()))
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in model.generator.parameters())
    assert any(float(a.abs().max()) > 0 for a in g_full)
    assert {"g_adv", "fm", "d", "mel_l1"} <= set(logs)


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, lr=1e-3, ema_decay=0.9, ema_every=1, log_every=1, ckpt_every=3,
                       device="cpu", grad_clip=0.0, seed=5)


def test_adversarial_vocoder_learns_exports_and_resumes_exactly(bank, tmp_path):
    from fluxmusic.components import load_vocoder

    def task():
        return VocoderTask(WaveMelCropDataset(bank, 16, seed=1), WaveMelCropDataset(bank, 16, seed=2),
                           config=VocoderConfig(adversarial=True, **TINY_VOCOS))

    devnull = open("/dev/null", "w")  # noqa: SIM115
    ref = train(task(), _cfg(6), tmp_path / "ref", stream=devnull)
    # Interrupted after 3 steps (its checkpoint), then resumed to 6: the same weights, bit for bit.
    train(task(), _cfg(3), tmp_path / "run", stream=devnull)
    resumed = train(task(), _cfg(6), tmp_path / "run", resume=True, stream=devnull)
    a = torch.load(tmp_path / "ref" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "run" / CHECKPOINT_NAME, weights_only=True)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert any(k.startswith("discriminators.") for k in a["model"])  # the discriminators are checkpointed too
    # The export is the generator alone, loadable by the model directory's strict loader.
    voc = load_vocoder(resumed.export)
    assert type(voc).__name__ == "VocosVocoder" and voc(bank.mels[:1, :10]).shape == (1, 1600)
    assert ref.val_loss is not None and np.isfinite(ref.val_loss)


def test_second_phase_starts_from_the_first_phase_ema_with_comb_resolving_losses(bank, tmp_path):
    from fluxmusic.training.vocoder_task import COMB_RESOLUTIONS

    devnull = open("/dev/null", "w")  # noqa: SIM115
    cfg = VocoderConfig(adversarial=True, **TINY_VOCOS)
    train(VocoderTask(WaveMelCropDataset(bank, 16), config=cfg), _cfg(2), tmp_path / "one", stream=devnull)
    ckpt = tmp_path / "one" / CHECKPOINT_NAME
    polish = VocoderTask(WaveMelCropDataset(bank, 40), config=cfg, stft_weight=15.0,
                         stft_resolutions=COMB_RESOLUTIONS, init_checkpoint=ckpt)
    start = polish.build_model()
    ema = torch.load(ckpt, weights_only=True)["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in start.state_dict().items())
    batch = polish.collate([polish.train_dataset()[i] for i in range(2)])
    loss, logs = polish.loss(start, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and polish.fingerprint()["stft"]["weight"] == 15.0


@pytest.mark.parametrize("integrate", [False, True])
def test_a_steady_tone_between_bin_centres_needs_integrated_phase(integrate):
    """The best frame-invariant head output (what a convolutional net gives on a steady note) for a 1010 Hz tone
    (between the 25 Hz bins of n_fft 640): with integrated phase it is the tone's exact STFT and resynthesises it
    without a hop-rate comb; with bin-relative phases no constant output can follow the tone's phase ramp."""
    from fluxmusic.evaluation.signal_features import comb_figure

    sr, n_fft, hop, frames = 16000, 640, 160, 200
    voc = VocosVocoder(VocosConfig(n_fft=n_fft, hidden_size=8, intermediate_size=8, num_layers=1,
                                   phase_advance=True, phase_integrate=integrate)).eval()
    tone = np.sin(2 * np.pi * 1010.0 * np.arange(frames * hop) / sr).astype(np.float32)
    spec = torch.stft(torch.from_numpy(tone), n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
    t0 = frames // 2  # a frame far from the edges: the steady state
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64)
    bin_step = 2 * np.pi * k * hop / n_fft
    mag = spec[:, t0].abs().double().clamp_min(1e-6)
    step = torch.angle(spec[:, t0 + 1]).double() - torch.angle(spec[:, t0]).double() - bin_step
    # phase at frame t: offset + (t + 1) * step (integrated) + t * bin_step; chosen to equal the STFT's at t0
    offset = torch.angle(spec[:, t0]).double() - t0 * bin_step - (t0 + 1) * step * integrate
    bias = [mag.log(), offset] + ([step] if integrate else [])
    with torch.no_grad():
        voc.head.weight.zero_()
        voc.head.bias.copy_(torch.cat(bias).float())
        out = voc(torch.zeros(1, frames, 64))[0].numpy()
    mid = slice(40 * hop, 160 * hop)
    comb = comb_figure(out[mid], sr)
    if integrate:
        assert np.abs(out[mid] - tone[mid]).max() < 1e-3
        assert comb < 3.0
    else:
        assert comb > 30.0


def test_runs_started_before_integrated_phase_existed_still_resume():
    """A field added later is left out of the resume fingerprint at its old-behaviour default."""
    plain = VocoderTask([], config=VocoderConfig(kind="vocos")).fingerprint()["vocoder_config"]
    integrated = VocoderTask([], config=VocoderConfig(kind="vocos", vocos_phase_integrate=True)).fingerprint()
    assert "vocos_phase_integrate" not in plain
    assert integrated["vocoder_config"]["vocos_phase_integrate"] is True


def test_integrated_phase_run_starts_as_the_phase_advance_model_it_is_initialised_from(tmp_path):
    import dataclasses

    base = VocoderConfig(kind="vocos", adversarial=True, vocos_hidden=8, vocos_intermediate=8, vocos_layers=1,
                         vocos_phase_advance=True, disc_periods=(2,), disc_ffts=(64,))
    first = VocoderTask([], config=base).build_model()
    torch.save({"ema": first.state_dict()}, tmp_path / "ckpt.pt")
    grown = VocoderTask([], config=dataclasses.replace(base, vocos_phase_integrate=True),
                        init_checkpoint=tmp_path / "ckpt.pt").build_model()
    mel = torch.randn(1, 30, 64) - 4
    with torch.no_grad():
        assert torch.equal(first(mel), grown(mel))
    assert grown.generator.head.weight.shape[0] == first.generator.head.weight.shape[0] * 3 // 2


def test_phase_dither_replaces_only_quiet_bins_with_a_fixed_table():
    from fluxmusic.vocos import PhaseTable

    table = PhaseTable(321)
    a, b = table.phases(1500, torch.device("cpu")), PhaseTable(321).phases(1500, torch.device("cpu"))
    assert torch.equal(a, b) and a.shape == (321, 1500)  # a fixed table: no RNG state
    assert torch.equal(a[:, 1024:], a[:, : 1500 - 1024])  # period 1024 frames
    assert float(a.min()) >= 0 and float(a.max()) < 2 * np.pi and abs(float(a.mean()) - np.pi) < 0.05

    cfg = dict(hidden_size=16, intermediate_size=16, num_layers=1, phase_advance=True)
    plain = VocosVocoder(VocosConfig(**cfg)).eval()
    dithered = VocosVocoder(VocosConfig(**cfg, phase_dither_db=-20.0)).eval()
    dithered.load_state_dict(plain.state_dict())
    mel = torch.randn(1, 40, 64) - 4
    with torch.no_grad():
        plain.head.bias[:321] = -10.0  # every bin quiet ...
        plain.head.bias[100] = 5.0  # ... but one
        dithered.head.bias.copy_(plain.head.bias)
        x, y = plain(mel), dithered(mel)
        assert torch.equal(dithered(mel), y)  # deterministic
    # the loud bin's tone is untouched: the difference is the quiet bins' share only
    assert float((x - y).pow(2).mean()) < 1e-3 * float(x.pow(2).mean())


@pytest.mark.parametrize(("mel_match", "momentum"), [(0, 0.0), (2, 0.0), (3, 0.6)])
def test_vocos_with_integrated_phase_and_dither_exports_to_onnx_with_parity(tmp_path, mel_match, momentum):
    """A model directory whose vocoder is an integrated-phase, dithered Vocos (with and without the mel-match
    projection, with and without its momentum) exports and runs in onnxruntime."""
    import onnxruntime as ort
    from fluxmusic.export.onnx_export import export_onnx

    from fluxmusic.tiny import build_tiny_model_dir

    model_dir = build_tiny_model_dir(tmp_path / "model")
    voc = VocosVocoder(VocosConfig(hidden_size=16, intermediate_size=16, num_layers=1, phase_advance=True,
                                   phase_integrate=True, phase_dither_db=-20.0,
                                   mel_match_iterations=mel_match, mel_match_momentum=momentum)).eval()
    with torch.no_grad():
        voc.head.weight.normal_(0, 0.05)  # non-zero increments, so the cumulative sum is exercised
    import shutil

    shutil.rmtree(model_dir / "vocoder")
    voc.save_pretrained(str(model_dir / "vocoder"))
    manifest = export_onnx(model_dir, tmp_path / "onnx", components=["vocoder"], progress=None)
    path = tmp_path / "onnx" / manifest["components"]["vocoder"]["variants"]["fp32"]["file"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mel = (torch.randn(2, 300, 64) - 4).numpy()  # 300 frames: longer than the export's example input
    got = sess.run(None, {sess.get_inputs()[0].name: mel})[0]
    with torch.no_grad():
        want = voc(torch.from_numpy(mel)).numpy()
    assert got.shape == want.shape
    snr = 10 * np.log10((want ** 2).sum() / ((got - want) ** 2).sum())
    assert snr > 60, snr


def _tiny_vocos(**extra) -> VocosVocoder:
    torch.manual_seed(0)
    return VocosVocoder(VocosConfig(hidden_size=16, intermediate_size=16, num_layers=1, phase_advance=True,
                                    phase_integrate=True, phase_dither_db=-20.0, **extra)).eval()


def test_mel_match_pulls_the_output_log_mel_onto_the_input(bank):
    """An untrained vocoder's output is far from its input mel; each projection round brings the output's
    log-mel (the very log_mel the input came from) closer, and a few rounds most of the way."""
    mel = bank.mels[:2, :150]
    errors = []
    for iterations in (0, 1, 2, 6):
        voc = _tiny_vocos(mel_match_iterations=iterations)
        with torch.no_grad():
            wave = voc(mel)
        assert wave.shape == (2, 150 * 160)
        errors.append(float((log_mel(wave) - mel).abs().mean()))
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4, errors
    assert errors[-1] < 0.3 * errors[0], errors


def test_mel_match_off_is_the_old_model_and_on_keeps_weights_and_gradients(tmp_path):
    plain, matched = _tiny_vocos(), _tiny_vocos(mel_match_iterations=3)
    assert plain.config.mel_match_iterations == 0  # the default: vocoders saved before the option are unchanged
    matched.load_state_dict(plain.state_dict())  # no parameters or buffers of its own
    matched.save_pretrained(str(tmp_path / "voc"))
    config = (tmp_path / "voc" / "config.json").read_text()
    assert '"mel_match_iterations": 3' in config
    mel = (torch.randn(1, 40, 64) - 4).requires_grad_()
    wave = VocosVocoder.from_pretrained(str(tmp_path / "voc")).eval()(mel)
    with torch.no_grad():
        assert torch.equal(wave, matched(mel))
        assert not torch.allclose(wave, plain(mel))
    wave.pow(2).sum().backward()
    assert torch.isfinite(mel.grad).all() and float(mel.grad.abs().sum()) > 0


def test_mel_match_fft_and_matrix_implementations_agree(monkeypatch, bank):
    """The export path (DFT as a strided convolution, matrix inverse STFT) equals the eager FFT path."""
    import fluxmusic.vocos as vocos

    voc = _tiny_vocos(mel_match_iterations=3, mel_match_momentum=0.6)
    mel = bank.mels[:1, :120]
    with torch.no_grad():
        fast = voc(mel)
        monkeypatch.setattr(vocos, "_exporting", lambda: True)
        exact = voc(mel)
    assert float((fast - exact).abs().max()) < 1e-4 * float(fast.abs().max())


@pytest.mark.parametrize(("field", "value"), [("mel_match_iterations", -1), ("mel_match_iterations", 1.5),
                                              ("mel_match_iterations", True), ("mel_match_n_fft", 1023),
                                              ("mel_match_n_fft", 64), ("mel_match_momentum", -0.1),
                                              ("mel_match_momentum", 1.5), ("mel_match_momentum", True),
                                              ("mel_match_momentum", "0.5")])
def test_bad_mel_match_settings_are_one_clear_error(field, value):
    from fluxmusic.errors import FluxMusicError

    with pytest.raises(FluxMusicError, match=f"{field} {value!r} must be"):
        VocosConfig(**{field: value})


def _reference_mel_match(wave: torch.Tensor, mel: torch.Tensor, iterations: int, momentum: float) -> torch.Tensor:
    """The projection written the plain way (what ``MelMatch`` computed before it was made faster): torch.stft /
    complex frames in [B, bins, T] / irfft / overlap-add by ``fold`` with the envelope rebuilt every round; the
    momentum as in fast Griffin-Lim, on the complex spectra themselves (t_n = c_n + alpha (c_n - c_{n-1}),
    c_0 the STFT of the network's waveform)."""
    from fluxmusic.audio import mel_filterbank

    cfg = MelConfig()
    fb = torch.from_numpy(mel_filterbank(cfg)).float()
    weight = fb.sum(0)
    spread = fb.t() / weight.clamp_min(1e-30)[:, None]
    seen = torch.nonzero(weight > 0).flatten()
    for k in torch.nonzero(weight <= 0).flatten():
        spread[k] = spread[seen[(seen - k).abs().argmin()]]
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=torch.float64).float()
    length, hop, n_fft = wave.shape[-1], cfg.hop_length, cfg.n_fft

    def stft(y):
        padded = torch.nn.functional.pad(y[:, None], (cfg.pad, cfg.pad), mode="reflect")[:, 0]
        return torch.stft(padded, n_fft, hop, n_fft, window, center=False, return_complex=True)

    def istft(spec):
        frames = torch.fft.irfft(spec, n_fft, dim=1) * window[:, None]
        count = frames.shape[-1]
        size = (1, (count - 1) * hop + n_fft)
        ola = torch.nn.functional.fold(frames, size, (1, n_fft), stride=(1, hop))[:, 0, 0]
        env = torch.nn.functional.fold((window * window)[None, :, None].expand(1, n_fft, count), size,
                                       (1, n_fft), stride=(1, hop))[0, 0, 0]
        return ola[:, cfg.pad: cfg.pad + length] / env[cfg.pad: cfg.pad + length].clamp_min(1e-8)

    target = torch.exp(mel.transpose(1, 2))
    previous = t = stft(wave)
    for _ in range(iterations):
        spec = stft(istft(t))
        mag = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-12)
        c = spec * (spread @ (target / (fb @ mag).clamp_min(cfg.clamp_min)))
        t = c + momentum * (c - previous)
        previous = c
    return istft(t)


@pytest.mark.parametrize("momentum", [0.0, 0.6])
def test_mel_match_equals_the_plain_reference_within_fp32_rounding(bank, momentum):
    """The time-major FFT path (one FFT each way, fused overlap-add, envelope once per call) and the momentum as a
    waveform extrapolation compute what the plain spectral-domain algorithm computes."""
    from fluxmusic.vocos import MelMatch

    wave = synth_clip(7, seconds=2.0)[0][None] * 0.5
    wave = torch.from_numpy(wave) + 0.01 * torch.randn(1, wave.shape[-1], generator=torch.Generator().manual_seed(0))
    wave = wave[:, : wave.shape[-1] // 160 * 160]
    mel = log_mel(torch.from_numpy(synth_clip(8, seconds=2.0)[0][None]))[:, : wave.shape[-1] // 160]
    with torch.no_grad():
        got = MelMatch(16000, 160, 1024, 64, 3, momentum)(wave, mel)
        want = _reference_mel_match(wave, mel, 3, momentum)
    assert got.shape == want.shape == wave.shape
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())


def test_mel_match_momentum_zero_is_bit_exact_and_old_configs_load_unchanged(tmp_path):
    import json

    plain, zero = _tiny_vocos(mel_match_iterations=3), _tiny_vocos(mel_match_iterations=3, mel_match_momentum=0.0)
    on = _tiny_vocos(mel_match_iterations=3, mel_match_momentum=0.6)
    plain.save_pretrained(str(tmp_path / "voc"))
    config = json.loads((tmp_path / "voc" / "config.json").read_text())
    del config["mel_match_momentum"]  # a vocoder saved before the option existed
    (tmp_path / "voc" / "config.json").write_text(json.dumps(config))
    old = VocosVocoder.from_pretrained(str(tmp_path / "voc")).eval()
    assert old.config.mel_match_momentum == 0.0
    mel = torch.randn(1, 60, 64) - 4
    with torch.no_grad():
        assert torch.equal(zero(mel), plain(mel)) and torch.equal(old(mel), plain(mel))
        assert not torch.allclose(on(mel), plain(mel))


def test_mel_match_momentum_converges_faster_on_a_real_example():
    """The bundled vocoder on a synthesised musical clip (real notes, not noise): at equal rounds, momentum leaves
    a lower log-mel error than the plain iteration, and 3 rounds with it beat 4 without."""
    from pathlib import Path

    import fluxmusic

    wave = torch.from_numpy(synth_clip(3, seconds=3.0)[0])[None]
    mel = log_mel(wave[:, : wave.shape[-1] // 160 * 160])
    directory = Path(fluxmusic.__file__).parent / "default_model" / "vocoder"
    errors = {}
    for momentum, rounds in ((0.0, 2), (0.0, 3), (0.0, 4), (0.6, 2), (0.6, 3)):
        voc = VocosVocoder.from_pretrained(str(directory), mel_match_iterations=rounds,
                                           mel_match_momentum=momentum).eval()
        with torch.no_grad():
            errors[momentum, rounds] = float((log_mel(voc(mel)) - mel).abs().mean())
    assert errors[0.6, 2] < errors[0.0, 2] and errors[0.6, 3] < errors[0.0, 3], errors
    assert errors[0.6, 3] < errors[0.0, 4], errors
