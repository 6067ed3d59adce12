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


def test_triton_repository_holds_the_encoder(tiny_model_dir, encoder_dir, tmp_path):
    from fluxmusic.export.triton_check import check_repository
    from fluxmusic.export.triton_repo import build_repository

    repo = build_repository(tiny_model_dir, encoder_dir, tmp_path / "repo")
    assert (repo / "vae_encoder" / "config.pbtxt").is_file() and (repo / "vae_encoder" / "1" / "model.onnx").is_file()
    assert any(c.startswith("vae_encoder: tensors agree") for c in check_repository(repo))
    text = (repo / "vae_encoder" / "config.pbtxt").read_text()
    assert 'name: "mel"' in text and 'name: "latent"' in text
