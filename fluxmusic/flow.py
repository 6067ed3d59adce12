"""Rectified flow: the training objective, time schedules, and Euler/Heun samplers with batched CFG."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError

#: v = f(x, t) for a batch of states x [B, L, C] at per-sample times t [B].
VelocityFn = Callable[[Tensor, Tensor], Tensor]
#: Called after every step with (step index from 1, total steps, current x).
StepCallback = Callable[[int, int, Tensor], None]

SOLVERS = ("euler", "heun")


# --------------------------------------------------------------------------------------------- training
def sample_t(batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Logit-normal times: t = sigmoid(n), n ~ N(0, 1)."""
    return torch.sigmoid(torch.randn(batch, generator=generator, device=device))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 - t) x0 + t eps."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def flow_loss(velocity: VelocityFn, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """MSE between the predicted velocity at z_t and the target eps - x0, over all elements."""
    pred = velocity(interpolate(x0, noise, t), t)
    return torch.mean((pred.float() - (noise - x0).float()) ** 2)


# --------------------------------------------------------------------------------------------- schedules
def timesteps(steps: int, shift: float | None = None) -> list[float]:
    """N + 1 times from 1 down to 0.

    Unshifted, t_i = i / N exactly as the official sampler. ``shift`` s > 0 warps them as
    t' = s t / (1 + (s - 1) t) (the SD3 resolution shift): s > 1 spends more steps at high noise.
    """
    if not isinstance(steps, int) or steps < 1:
        raise FluxMusicError(f"steps {steps!r} must be an integer >= 1")
    ts = [i / steps for i in range(steps, -1, -1)]
    if shift is not None:
        if not (math.isfinite(shift) and shift > 0):
            raise FluxMusicError(f"time shift {shift!r} must be a finite number > 0")
        ts = [shift * t / (1 + (shift - 1) * t) for t in ts]
    return ts


# --------------------------------------------------------------------------------------------- guidance
@dataclass
class Conditioning:
    """Text conditioning of a batch: T5 tokens [B, Lt, Dt] and the pooled CLAP vector [B, Dy]."""

    txt: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.txt.shape[0] != self.y.shape[0]:
            raise ValueError(f"txt batch {self.txt.shape[0]} != y batch {self.y.shape[0]}")


def cfg_velocity(
    model: Callable[..., Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    guidance: Tensor,
    rope: Tensor,
) -> VelocityFn:
    """A velocity function doing classifier-free guidance in ONE batched forward per call.

    ``guidance`` is per sample [B]; v = v_u + g (v_c - v_u). ``model(x, t, txt, y, rope)`` is the transformer.
    """
    txt = torch.cat((cond.txt, uncond.txt), dim=0)
    y = torch.cat((cond.y, uncond.y), dim=0)
    g = guidance.view(-1, 1, 1)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v = model(torch.cat((x, x), dim=0), torch.cat((t, t), dim=0), txt, y, rope)
        v_c, v_u = v.chunk(2, dim=0)
        return v_u + g.to(v.dtype) * (v_c - v_u)

    return velocity


# --------------------------------------------------------------------------------------------- solvers
def sample(
    velocity: VelocityFn,
    x: Tensor,
    steps: int,
    solver: str = "euler",
    shift: float | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data).

    Euler with the unshifted schedule reproduces the official sampler exactly: x <- x - (1/N) v(x, i/N).
    Heun (2nd order) corrects each step with the slope at its end, except the last (t = 0).
    """
    if solver not in SOLVERS:
        raise FluxMusicError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    ts = timesteps(steps, shift)
    uniform = shift is None
    batch = x.shape[0]
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = (1.0 / steps) if uniform else (t_cur - t_next)
        t_vec = torch.full((batch,), t_cur, dtype=x.dtype, device=x.device)
        v = velocity(x, t_vec)
        if solver == "heun" and t_next > 0:
            x_pred = x - dt * v
            v_next = velocity(x_pred, torch.full_like(t_vec, t_next))
            x = x - dt * 0.5 * (v + v_next)
        else:
            x = x - dt * v
        if callback is not None:
            callback(i + 1, steps, x)
    return x


def function_evaluations(steps: int, solver: str) -> int:
    """Model calls a solve costs (each one batched cond + uncond)."""
    return steps if solver == "euler" else 2 * steps - 1
