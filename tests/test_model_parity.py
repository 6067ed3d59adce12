"""Parity with the official implementation on shared/testdata/official_tiny_a.npz (fp32)."""

import torch

from fluxmusic.config import FluxMusicConfig
from fluxmusic.flow import Conditioning, cfg_velocity, sample
from fluxmusic.latent import patchify
from fluxmusic.model import FluxMusicTransformer


def _official_model(case) -> FluxMusicTransformer:
    model = FluxMusicTransformer(FluxMusicConfig.from_dict(case["meta"]["config"]))
    model.load_state_dict(case["state"], strict=True)
    return model.eval()


def test_forward_matches_official(official_tiny):
    c = official_tiny
    model = _official_model(c)
    with torch.no_grad():
        out = model(c["x"], c["t"], c["txt"], c["y"], img_ids=c["img_ids"], txt_ids=c["txt_ids"])
    assert (out - c["out"]).abs().max().item() <= 1e-5


def test_cached_rope_equals_ids_path(official_tiny):
    c = official_tiny
    model = _official_model(c)
    h, w = c["latent"].shape[2] // 2, c["latent"].shape[3] // 2
    with torch.no_grad():
        a = model(c["x"], c["t"], c["txt"], c["y"], rope=model.rope_for(c["txt"].shape[1], h, w))
    assert (a - c["out"]).abs().max().item() <= 1e-5


def test_patchify_matches_official_layout(official_tiny):
    assert torch.equal(patchify(official_tiny["latent"]), official_tiny["x"])


def test_euler_cfg_matches_official_sampler(official_tiny):
    c = official_tiny
    meta = c["meta"]
    model = _official_model(c)
    h, w = c["latent"].shape[2] // 2, c["latent"].shape[3] // 2
    rope = model.rope_for(meta["txt_len"], h, w)
    guidance = torch.full((c["x"].shape[0],), float(meta["cfg"]))
    v = cfg_velocity(model, Conditioning(c["txt"], c["y"]), Conditioning(c["null_txt"], c["null_y"]), guidance, rope)
    with torch.no_grad():
        final = sample(v, c["x"], meta["steps"])
    assert (final - c["euler_final"]).abs().max().item() <= 1e-4
    assert (final - c["xps_final"]).abs().max().item() <= 1e-4
