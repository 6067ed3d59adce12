"""Audio in beyond torch: the VAE encoder exported to ONNX (parity with PyTorch), the onnx backend's audio in, and
the encoder in the Triton model repository."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

SR = 16000


@pytest.fixture(scope="module")
def encoder_dir(tiny_model_dir, tmp_path_factory):
    from fluxmusic.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "enc"
    export_onnx(tiny_model_dir, out, encoder=True, progress=None)
    return out


def _wave(seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 330 * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def test_onnx_encoder_matches_pytorch(tiny_model_dir, encoder_dir, one_torch_thread):
    """Max-abs and cosine of the ONNX encoder's latent against the torch VAE's posterior mean (times the scale)."""
    from fluxmusic.export.onnx_export import read_manifest

    from fluxmusic.pipeline import FluxMusicPipeline

    manifest = read_manifest(encoder_dir)
    assert "vae_encoder" in manifest["components"] and (encoder_dir / "vae_encoder.onnx").is_file()
    ref = FluxMusicPipeline.from_pretrained(tiny_model_dir)
    onnx = FluxMusicPipeline.from_pretrained(tiny_model_dir, backend="onnx", onnx_dir=encoder_dir)
    assert "vae_encoder" in onnx.backend.graphs and "vae_encoder" not in onnx.backend.fallback
    wave = np.zeros((2, int(10.24 * SR)), dtype=np.float32)
    wave[0, : 3 * SR] = _wave()
    wave[1] = np.random.default_rng(0).normal(0, 0.1, wave.shape[1])
    a, b = ref.encode_audio(wave), onnx.encode_audio(wave)
    assert a.shape == b.shape == (2, ref.geometry.latent_channels, ref.geometry.max_latent_frames,
                                  ref.geometry.latent_width)
    max_abs = float((a - b).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    assert max_abs < 1e-4 and cos > 0.99999, (max_abs, cos)


def test_onnx_backend_continues_audio(tiny_model_dir, encoder_dir, one_torch_thread):
    from fluxmusic.pipeline import FluxMusicPipeline

    ref = FluxMusicPipeline.from_pretrained(tiny_model_dir)
    onnx = FluxMusicPipeline.from_pretrained(tiny_model_dir, backend="onnx", onnx_dir=encoder_dir)
    a = ref("calm piano", audio=_wave(), keep="0:2", duration=3.84, seed=0).audio[0]
    b = onnx("calm piano", audio=_wave(), keep="0:2", duration=3.84, seed=0).audio[0]
    assert a.shape == b.shape
    from fluxmusic.export.validate import snr_db

    assert snr_db(a, b) >= 40
    with pytest.raises(Exception, match="posterior mean only"):
        onnx.backend.vae_encode(torch.zeros(1, 256, onnx.geometry.mel_bins), sample=True)


@pytest.fixture(scope="module")
def repo(tiny_model_dir, encoder_dir, tmp_path_factory):
    from fluxmusic.export.triton_repo import build_repository

    return build_repository(tiny_model_dir, encoder_dir, tmp_path_factory.mktemp("triton") / "repo")


def test_triton_repository_holds_the_encoder(repo):
    from fluxmusic.export.triton_check import check_repository

    assert (repo / "vae_encoder" / "config.pbtxt").is_file() and (repo / "vae_encoder" / "1" / "model.onnx").is_file()
    checked = check_repository(repo)
    assert any(c.startswith("vae_encoder: tensors agree") for c in checked)
    assert any(c.startswith("vae_encoder: accepts what the BLS model sends") for c in checked)
    text = (repo / "vae_encoder" / "config.pbtxt").read_text()
    assert 'name: "mel"' in text and 'name: "latent"' in text
    bls_cfg = (repo / "fluxmusic" / "config.pbtxt").read_text()
    assert 'name: "audio"' in bls_cfg and 'name: "keep"' in bls_cfg


def test_bls_continues_given_audio_like_the_pipeline(repo, tiny_model_dir, one_torch_thread):
    from fluxmusic.export.spec import COMPONENT_NAMES
    from fluxmusic.export.validate import snr_db
    from fluxmusic.runtime.triton_bls import FluxMusicBls, OnnxRuntimeInfer

    from fluxmusic.errors import FluxMusicError
    from fluxmusic.pipeline import FluxMusicPipeline

    names = (*COMPONENT_NAMES, "vae_encoder")
    bls = FluxMusicBls(repo / "fluxmusic" / "1", OnnxRuntimeInfer({c: repo / c / "1" / "model.onnx" for c in names}))
    assert bls.backend.has_encoder
    wave = _wave()
    req = {"prompt": np.array([b"calm piano"], dtype=object), "audio": wave, "keep": np.array([b"0:2"], dtype=object),
           "duration": np.array([3.84], np.float32), "seed": np.array([0], np.int64), "steps": np.array([2], np.int32)}
    out = bls.execute(req)
    ref = FluxMusicPipeline.from_pretrained(tiny_model_dir)("calm piano", audio=wave, keep="0:2", duration=3.84,
                                                            seed=0, steps=2)
    assert out["audio"].shape == ref.audio[0].shape and bls.backend.calls["vae_encoder"] == 1
    assert snr_db(ref.audio[0], out["audio"]) >= 40
    # the same clip at 8 kHz is resampled to the model's rate
    out8 = bls.execute({**req, "audio": wave[::2].copy(), "audio_sample_rate": np.array([8000], np.int32)})
    assert out8["audio"].shape == out["audio"].shape
    with pytest.raises(FluxMusicError, match="input 'audio' must be a non-empty mono float32 waveform"):
        bls.execute({**req, "audio": np.zeros((2, 100), np.float32)})
    with pytest.raises(FluxMusicError, match="keep"):
        bls.execute({**req, "keep": np.array([b"0:99"], dtype=object)})
    bls.backend.has_encoder = False
    with pytest.raises(FluxMusicError, match="needs the vae_encoder model in the Triton repository"):
        bls.execute(req)
