"""Rectified flow: loss, schedules, batched classifier-free guidance and the solvers."""

import pytest
import torch

from fluxmusic.config import CONFIGS
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning, cfg_velocity, flow_loss, function_evaluations, sample, timesteps
from fluxmusic.latent import LatentGeometry, patchify, unpatchify
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.rope import music_ids, text_ids

TXT_LEN, GH, GW = 5, 4, 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(1)
    cfg = CONFIGS["tiny"]
    model = FluxMusicTransformer(cfg).eval()
    for p in model.parameters():  # non-trivial outputs (zero-ish init would hide bugs)
        torch.nn.init.normal_(p, std=0.05)
    b = 3
    cond = Conditioning(torch.randn(b, TXT_LEN, cfg.context_in_dim), torch.randn(b, cfg.vec_in_dim))
    null = Conditioning(torch.randn(b, TXT_LEN, cfg.context_in_dim), torch.randn(b, cfg.vec_in_dim))
    x = torch.randn(b, GH * GW, cfg.in_channels)
    return model, cond, null, x


def two_pass_velocity(model, cond, null, guidance):
    """The unoptimized official way: two forwards per step and RoPE recomputed from ids every call."""
    b = cond.txt.shape[0]
    img_ids, txt_ids = music_ids(b, GH, GW), text_ids(b, TXT_LEN)

    def v(x, t):
        vc = model(x, t, cond.txt, cond.y, img_ids=img_ids, txt_ids=txt_ids)
        vu = model(x, t, null.txt, null.y, img_ids=img_ids, txt_ids=txt_ids)
        return vu + guidance.view(-1, 1, 1) * (vc - vu)

    return v


@torch.no_grad()
def test_batched_cfg_equals_two_passes(setup):
    model, cond, null, x = setup
    g = torch.tensor([1.0, 3.5, 7.0])
    fast = cfg_velocity(model, cond, null, g, model.rope_for(TXT_LEN, GH, GW))
    slow = two_pass_velocity(model, cond, null, g)
    t = torch.full((3,), 0.7)
    assert (fast(x, t) - slow(x, t)).abs().max().item() <= 1e-5
    a = sample(fast, x, 6)
    b = sample(slow, x, 6)
    assert (a - b).abs().max().item() <= 1e-5


@torch.no_grad()
def test_per_sample_guidance_equals_each_alone(setup):
    model, cond, null, x = setup
    g = torch.tensor([0.0, 2.0, 9.0])
    rope = model.rope_for(TXT_LEN, GH, GW)
    together = sample(cfg_velocity(model, cond, null, g, rope), x, 5, solver="heun")
    for i in range(3):
        sl = slice(i, i + 1)
        alone = sample(
            cfg_velocity(model, Conditioning(cond.txt[sl], cond.y[sl]), Conditioning(null.txt[sl], null.y[sl]),
                         g[sl], rope),
            x[sl], 5, solver="heun",
        )
        assert (together[sl] - alone).abs().max().item() <= 1e-5


def test_rope_tables_computed_once_per_shape(setup):
    model = FluxMusicTransformer(CONFIGS["tiny"])
    a = model.rope_for(TXT_LEN, GH, GW)
    b = model.rope_for(TXT_LEN, GH, GW)
    assert a is b and len(model.rope_cache) == 1
    model.rope_for(TXT_LEN, GH + 1, GW)
    assert len(model.rope_cache) == 2


def test_official_schedule_and_shift():
    assert timesteps(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = timesteps(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert all(s >= u for s, u in zip(shifted, timesteps(4)))  # shift > 1 spends more steps at high noise
    with pytest.raises(FluxMusicError, match="steps 0"):
        timesteps(0)
    with pytest.raises(FluxMusicError, match="shift"):
        timesteps(4, shift=-1.0)


def test_solvers_integrate_a_known_flow():
    """For v = eps - x0 with a constant x0 the exact solution from x(1) = eps lands on x0."""
    x0 = torch.randn(2, 6, 4)
    eps = torch.randn(2, 6, 4)
    v = lambda x, t: eps - x0  # noqa: E731
    for solver in ("euler", "heun"):
        assert torch.allclose(sample(v, eps.clone(), 3, solver=solver), x0, atol=1e-5)
    # A time-dependent field: dx/dt = x (exact: x(0) = x(1) / e); Heun is far more accurate than Euler.
    x1 = torch.ones(1, 1, 1)
    euler = sample(lambda x, t: x, x1, 10).item()
    heun = sample(lambda x, t: x, x1, 10, solver="heun").item()
    exact = 1 / torch.e
    assert abs(heun - exact) < abs(euler - exact) / 10
    assert function_evaluations(10, "heun") == 19


def test_callback_reports_every_step():
    seen = []
    sample(lambda x, t: x, torch.ones(1, 1, 1), 7, callback=lambda i, n, x: seen.append((i, n)))
    assert seen == [(i, 7) for i in range(1, 8)]
    with pytest.raises(FluxMusicError, match="unknown solver 'rk4'"):
        sample(lambda x, t: x, torch.ones(1, 1, 1), 2, solver="rk4")


def test_flow_loss_zero_for_perfect_velocity():
    x0, eps, t = torch.randn(4, 8, 2), torch.randn(4, 8, 2), torch.rand(4)
    assert flow_loss(lambda z, t: eps - x0, x0, eps, t).item() == 0.0
    assert flow_loss(lambda z, t: torch.zeros_like(z), x0, eps, t).item() > 0.1


def test_patchify_round_trip_and_geometry():
    lat = torch.randn(2, 8, 256, 16)
    x = patchify(lat)
    assert x.shape == (2, 1024, 32)
    assert torch.equal(unpatchify(x, 128, 8), lat)
    geo = LatentGeometry()
    assert geo.latent_shape(10.24) == (8, 256, 16)
    assert geo.grid(256) == (128, 8)
    assert geo.latent_frames(1.0) == 26  # 25 latent frames round up to the 2x2 patch grid
    assert geo.num_samples(10.24) == 163840
    for bad in (0, -1, 10.25, float("nan")):
        with pytest.raises(FluxMusicError, match=r"duration .* \(0, 10.24\]"):
            geo.check_duration(bad)
