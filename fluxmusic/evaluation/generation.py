"""Generation for evaluation: the pipeline's CFG solve, stopped at the latent (the steps sweep compares
solvers in latent space before decoding), and an untrained twin of a pipeline."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning, cfg_velocity, sample
from fluxmusic.latent import patchify, unpatchify
from fluxmusic.pipeline import FluxMusicPipeline, noise_for


@torch.no_grad()
def solve_latents(pipe: FluxMusicPipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int, solver: str,
                  shift: float | None, guidance: float, on_step: Callable[[], None] | None = None) -> Tensor:
    """Final scaled latents [B, C, H, W] of a full-length generation, exactly as ``generate_items`` computes
    them (same noise per seed, batched CFG with the "" null condition); ``decode_full`` turns them into audio."""
    geo = pipe.geometry
    shape = geo.latent_shape(geo.max_duration)
    grid_h, grid_w = geo.grid(shape[1])
    cond = pipe.conditioning(list(prompts))
    uncond = pipe.conditioning([""] * len(prompts))
    device = getattr(pipe.backend, "device", torch.device("cpu"))
    x = patchify(torch.stack([noise_for(s, shape) for s in seeds])).to(device)
    g = torch.full((len(prompts),), float(guidance), dtype=torch.float32, device=device)
    velocity = cfg_velocity(pipe.backend.velocity, Conditioning(cond.txt.to(device), cond.y.to(device)),
                            Conditioning(uncond.txt.to(device), uncond.y.to(device)), g,
                            pipe.backend.rope(cond.txt.shape[1], grid_h, grid_w))
    cb = (lambda i, n, _x: on_step()) if on_step else None
    x = sample(velocity, x, steps, solver=solver, shift=shift, callback=cb)
    return unpatchify(x, grid_h, grid_w).cpu()


@torch.no_grad()
def decode_full(pipe: FluxMusicPipeline, latents: Tensor, batch_size: int = 4) -> list[np.ndarray]:
    """Scaled latents -> float32 waveforms of the model's full duration."""
    n = pipe.geometry.num_samples(pipe.geometry.max_duration)
    out = []
    for i in range(0, latents.shape[0], batch_size):
        wave = pipe.decode(latents[i : i + batch_size])
        out += [w[:n].cpu().numpy().astype(np.float32) for w in wave]
    return out


def untrained_twin(pipe: FluxMusicPipeline, seed: int) -> FluxMusicPipeline:
    """The same pipeline with the transformer replaced by a freshly initialised one of the same config (its
    constructor's initialisation, seeded): the text encoders, VAE and vocoder stay trained, so the baseline
    isolates what training the transformer bought. Shares the original's modules; builds nothing on disk."""
    from fluxmusic.model import FluxMusicTransformer

    backend = pipe.backend
    if not hasattr(backend, "transformer"):
        raise FluxMusicError(f"the untrained baseline needs the torch backend, not {getattr(backend, 'name', '?')}")
    trained = backend.transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = FluxMusicTransformer(trained.config)
    param = next(trained.parameters())
    fresh = fresh.to(device=param.device, dtype=param.dtype).eval()
    twin_backend = copy.copy(backend)
    twin_backend.transformer = fresh
    twin = copy.copy(pipe)
    twin.backend = twin_backend
    return twin
