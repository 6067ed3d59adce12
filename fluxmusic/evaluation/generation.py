"""Generation for evaluation: the pipeline's CFG solve, stopped at the latent (the steps sweep compares
solvers in latent space before decoding), and an untrained twin of a pipeline."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError
from fluxmusic.pipeline import FluxMusicPipeline

#: Sampling options beyond (steps, solver, shift, guidance), with their "off" values.
PLAIN_OPTIONS = {"guidance_interval": (0.0, 1.0), "cache_threshold": 0.0, "guidance_schedule": "constant"}


@torch.no_grad()
def solve_with_stats(pipe: FluxMusicPipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int, solver: str,
                     shift: float | None, guidance: float, on_step: Callable[[], None] | None = None,
                     **options) -> tuple[Tensor, dict[str, float]]:
    """Final scaled latents [B, C, H, W] of a full-length generation through the pipeline's own solve
    (:meth:`FluxMusicPipeline.sample_latents`: same noise per seed, batched CFG with the "" null condition), and
    its per-waveform counts (``evaluations``, ``cache_skipped``, ``cfg_evaluations``). ``shift`` None is the
    uniform schedule; ``options`` are ``guidance_interval``, ``cache_threshold``, ``guidance_schedule`` (absent:
    off, never the model's defaults)."""
    unknown = set(options) - set(PLAIN_OPTIONS)
    if unknown:
        raise FluxMusicError(f"unknown sampling option(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(PLAIN_OPTIONS)}")
    req = pipe.request(list(prompts), seed=list(seeds), steps=steps, solver=solver,
                       shift=1.0 if shift is None else shift, guidance=float(guidance), negative_prompt="",
                       **{**PLAIN_OPTIONS, **options})
    cond = pipe.conditioning([it.prompt for it in req.items])
    uncond = pipe.conditioning([""] * len(req.items))
    x, stats = pipe.sample_latents(req, cond, uncond, (lambda i, n: on_step()) if on_step else None)
    return x.cpu(), stats


def solve_latents(pipe: FluxMusicPipeline, prompts: Sequence[str], seeds: Sequence[int], steps: int, solver: str,
                  shift: float | None, guidance: float, on_step: Callable[[], None] | None = None,
                  **options) -> Tensor:
    """The latents of :func:`solve_with_stats`; ``decode_full`` turns them into audio."""
    return solve_with_stats(pipe, prompts, seeds, steps, solver, shift, guidance, on_step, **options)[0]


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
    twin._probe = None  # the step cache's probe must read the twin's first block, not the trained one's
    return twin
