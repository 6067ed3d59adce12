"""Rectified flow: the training objective, time schedules, batched CFG, and the one sampler loop.

Every generation path (CLI, Python, gRPC, Triton BLS, evaluation) integrates through :func:`sample`.
Backends plug in a velocity function (or, for Euler, a fused step function); the CFG combine is
:func:`cfg_combine`, written once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError

#: v = f(x, t) for a batch of states x [B, L, C] at per-sample times t [B].
VelocityFn = Callable[[Tensor, Tensor], Tensor]
#: x_next = f(x, t, dt): one whole Euler step (e.g. the fused ONNX CFG step graph); dt > 0 per sample [B].
StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]
#: Called after every step with (step index from 1, total steps, current x).
StepCallback = Callable[[int, int, Tensor], None]

#: euler: 1 evaluation per step (the official sampler); heun: 2nd order, 2 per step (1 on the last);
#: ab2: 2nd-order Adams-Bashforth in t reusing the previous step's velocity, 1 per step (first step Euler);
#: ab3: 3rd-order Adams-Bashforth reusing the two previous velocities, 1 per step (first Euler, second AB2).
#: Allowed time-shift factors (1 = no shift). Bounded away from 0 so 1 + (s - 1) t never nears 0.
SHIFT_RANGE = (0.01, 100.0)

SOLVERS = ("euler", "heun", "ab2", "ab3")

#: How many velocities each multistep solver combines (its order).
MULTISTEP_ORDER = {"ab2": 2, "ab3": 3}

#: Per-step guidance schedules: the scale at time t is g * w(t). constant: w = 1 (the official sampler);
#: linear: w = 2 (1 - t); cosine: w = 1 + cos(pi t). Both ramps rise from 0 at the noise end (t = 1) to 2 at
#: the data end (t = 0) and average 1 over t in [0, 1], so g keeps its meaning as the mean scale. Rising
#: schedules are the ones Wang et al. (2024, "Analysis of classifier-free guidance weight schedulers") found
#: to help: little guidance while the layout forms, more while details form.
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")


def guidance_weight(schedule: str, t: float) -> float:
    """w(t) of a guidance schedule (see :data:`GUIDANCE_SCHEDULES`); t in [0, 1]."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 2.0 * (1.0 - t)
    if schedule == "cosine":
        return 1.0 + math.cos(math.pi * t)
    raise FluxMusicError(f"unknown guidance schedule {schedule!r}; allowed: {', '.join(GUIDANCE_SCHEDULES)}")


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
        # The denominator lies between 1 and s; a tiny s underflows it (issue 17: s = 1e-300).
        if not (math.isfinite(shift) and SHIFT_RANGE[0] <= shift <= SHIFT_RANGE[1]):
            lo, hi = SHIFT_RANGE
            raise FluxMusicError(f"time shift {shift!r} is outside the allowed range [{lo}, {hi}]")
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


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, guidance: Tensor) -> Tensor:
    """Classifier-free guidance: v_u + g (v_c - v_u), ``guidance`` per sample [B]. The only copy of this formula."""
    return v_uncond + guidance.view(-1, *([1] * (v_cond.dim() - 1))).to(v_cond.dtype) * (v_cond - v_uncond)


class GuidedVelocity:
    """A velocity function doing classifier-free guidance in ONE batched forward per call.

    ``model(x, t, txt, y, rope)`` is the transformer. Inside the guidance interval ``[t_min, t_max]`` the
    batch is [cond; uncond] (2B rows) and combined with :func:`cfg_combine`; outside it only the conditional
    half runs (B rows) and v = v_cond. ``schedule`` scales the guidance per step (:func:`guidance_weight`; the
    only place a schedule is applied). ``rows`` evaluates a subset of the batch (used by :class:`StepCache`).
    ``batch_sizes`` records the rows of every model call (tests and cost accounting).
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        cond: Conditioning,
        uncond: Conditioning,
        guidance: Tensor,
        rope: Tensor,
        interval: tuple[float, float] = (0.0, 1.0),
        schedule: str = "constant",
    ) -> None:
        self.model, self.cond, self.uncond, self.guidance, self.rope = model, cond, uncond, guidance, rope
        self.interval = interval
        self.full = interval[0] <= 0.0 and interval[1] >= 1.0
        guidance_weight(schedule, 1.0)  # validates the name
        self.schedule = schedule
        #: full-interval constant guidance: what a fused CFG step graph computes
        self.plain = self.full and schedule == "constant"
        self._both = (torch.cat((cond.txt, uncond.txt)), torch.cat((cond.y, uncond.y)))
        self.batch_sizes: list[int] = []

    def guided_at(self, t: float) -> bool:
        # Slack for float32 times: a boundary given as 0.8 still includes the grid time 0.8 (0.80000001 in fp32).
        return self.full or self.interval[0] - 1e-6 <= t <= self.interval[1] + 1e-6

    def __call__(self, x: Tensor, t: Tensor, rows: Tensor | None = None) -> Tensor:
        cond, uncond, g = self.cond, self.uncond, self.guidance
        if self.schedule != "constant":
            g = g * guidance_weight(self.schedule, float(t[0]))
        if rows is not None:
            cond = Conditioning(cond.txt[rows], cond.y[rows])
            uncond = Conditioning(uncond.txt[rows], uncond.y[rows])
            g = g[rows]
        if not self.guided_at(float(t[0])):
            self.batch_sizes.append(x.shape[0])
            return self.model(x, t, cond.txt, cond.y, self.rope)
        if rows is None:
            txt, y = self._both
        else:
            txt, y = torch.cat((cond.txt, uncond.txt)), torch.cat((cond.y, uncond.y))
        self.batch_sizes.append(2 * x.shape[0])
        v = self.model(torch.cat((x, x)), torch.cat((t, t)), txt, y, self.rope)
        b = x.shape[0]
        return cfg_combine(v[:b], v[b:], g)


def cfg_velocity(
    model: Callable[..., Tensor],
    cond: Conditioning,
    uncond: Conditioning,
    guidance: Tensor,
    rope: Tensor,
    interval: tuple[float, float] = (0.0, 1.0),
    schedule: str = "constant",
) -> GuidedVelocity:
    """The batched CFG velocity (see :class:`GuidedVelocity`)."""
    return GuidedVelocity(model, cond, uncond, guidance, rope, interval, schedule)


# --------------------------------------------------------------------------------------------- step caching
#: probe(x, t) -> a per-sample tensor [B, ...] that tracks how much the model's input changed (the
#: modulated input of the first transformer block, see :class:`fluxmusic.step_cache.FirstBlockProbe`).
ProbeFn = Callable[[Tensor, Tensor], Tensor]


class StepCache:
    """TeaCache-style reuse of the velocity across consecutive evaluations.

    Before each evaluation the cheap ``probe`` is computed; per sample, the relative L1 change of the probe
    since the previous evaluation is accumulated, and while the sum stays below ``threshold`` the sample's
    last velocity is reused instead of running the model. A sample that is evaluated resets its sum. The
    decision is per sample (only the rows that need it are evaluated), so a sample gives the same result alone
    or in any batch. ``threshold`` 0 evaluates everything.
    """

    def __init__(self, velocity: Callable[..., Tensor], probe: ProbeFn, threshold: float) -> None:
        self.velocity, self.probe, self.threshold = velocity, probe, float(threshold)
        self.prev: Tensor | None = None
        self.acc: Tensor | None = None
        self.v: Tensor | None = None
        self.evaluated = 0  # sample-evaluations run
        self.skipped = 0  # sample-evaluations answered from the cache

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        p = self.probe(x, t).float()
        b = x.shape[0]
        if self.prev is None or self.v is None:
            need = torch.ones(b, dtype=torch.bool, device=x.device)
            self.acc = torch.zeros(b, device=x.device)
        else:
            dims = tuple(range(1, p.dim()))
            rel = (p - self.prev).abs().mean(dims) / self.prev.abs().mean(dims).clamp_min(1e-12)
            self.acc = self.acc + rel
            need = self.acc >= self.threshold
        self.prev = p
        n = int(need.sum())
        if n == b:
            v = self.velocity(x, t)
        else:
            v = self.v.clone()
            if n:
                rows = need.nonzero().squeeze(1)
                v[rows] = self.velocity(x[rows], t[rows], rows=rows).to(v.dtype)
        self.acc = torch.where(need, torch.zeros_like(self.acc), self.acc)
        self.v = v
        self.evaluated += n
        self.skipped += b - n
        return v


# --------------------------------------------------------------------------------------------- known region
@dataclass
class KnownRegion:
    """Latent content held on the flow's path (training-free continuation and infilling, RePaint-style).

    ``x0`` [B, L, C] is the known clean latent, ``mask`` (broadcastable to it; 1 = known, 0 = generated,
    fractions blend the two for a soft seam), ``noise`` the same eps the solve starts from. After every step to
    time t the known part of the state is set to z_t = (1 - t) x0 + t eps; at t = 0 that is x0 itself, so the
    kept latent frames come out exactly as given. ``resample`` > 0 re-noises each step's result back to the
    step's start time (fresh noise from ``generators``, one per sample, so an item is the same alone or in a
    batch) and repeats the step that many times while t > ``resample_t_min``: the generated part gets more
    chances to agree with the known one, at (1 + resample) times the evaluations of those steps.
    """

    x0: Tensor
    mask: Tensor
    noise: Tensor
    resample: int = 0
    resample_t_min: float = 0.3
    generators: list[torch.Generator] | None = None

    def impose(self, x: Tensor, t: float) -> Tensor:
        z_t = (1.0 - t) * self.x0 + t * self.noise
        return self.mask * z_t + (1.0 - self.mask) * x  # exactly z_t where the mask is 1

    def renoise(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """A sample of z_{t_to} given z_{t_from} (t_from < t_to) on the rectified-flow path:
        z_to = a z_from + s n with a = (1 - t_to) / (1 - t_from), s^2 = t_to^2 - a^2 t_from^2."""
        a = (1.0 - t_to) / (1.0 - t_from)
        s = math.sqrt(max(t_to**2 - (a * t_from) ** 2, 0.0))
        gens = self.generators or [None] * x.shape[0]
        n = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in gens])
        return a * x + s * n.to(x.device, x.dtype)


# --------------------------------------------------------------------------------------------- solvers
def sample(
    velocity: VelocityFn,
    x: Tensor,
    steps: int,
    solver: str = "euler",
    shift: float | None = None,
    callback: StepCallback | None = None,
    step_fn: StepFn | None = None,
    known: KnownRegion | None = None,
) -> Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data): the one sampler loop.

    Euler with the unshifted schedule reproduces the official sampler exactly: x <- x - (1/N) v(x, i/N).
    Heun (2nd order) corrects each step with the slope at its end, except the last (t = 0). AB2 (2nd-order
    Adams-Bashforth for variable steps h) extrapolates with the previous velocity:
    x <- x - h ((1 + r/2) v_n - (r/2) v_{n-1}), r = h_n / h_{n-1}; one evaluation per step, the first is Euler.
    AB3 integrates the quadratic through the last three velocities over the step (see
    :func:`adams_bashforth_weights`); its first two steps are Euler and AB2.
    ``step_fn`` (Euler only) replaces "evaluate, then step" by one call, e.g. a fused ONNX step graph.
    ``known`` holds part of the latent on the flow's path of given content (see :class:`KnownRegion`): it is
    imposed after every step (and on Heun's predictor before its second evaluation).
    """
    if solver not in SOLVERS:
        raise FluxMusicError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
    if step_fn is not None and solver != "euler":
        raise FluxMusicError(f"a fused step function runs Euler steps only, not {solver!r}")
    ts = timesteps(steps, shift)
    uniform = shift is None
    batch = x.shape[0]
    order = MULTISTEP_ORDER.get(solver, 1)
    history: list[tuple[Tensor, float]] = []  # (velocity, step size) of the previous steps, newest first
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        h = (1.0 / steps) if uniform else (t_cur - t_next)
        t_vec = torch.full((batch,), t_cur, dtype=x.dtype, device=x.device)
        repeats = 1
        if known is not None and known.resample and t_next > 0 and t_cur > known.resample_t_min:
            repeats += known.resample
        for rep in range(repeats):
            if rep:  # RePaint resampling: back to t_cur on the path, known part re-imposed, the step again
                x = known.impose(known.renoise(x, t_next, t_cur), t_cur)
            if step_fn is not None:
                x = step_fn(x, t_vec, torch.full_like(t_vec, h))
            else:
                v = velocity(x, t_vec)
                if solver == "heun" and t_next > 0:
                    pred = x - h * v
                    if known is not None:
                        pred = known.impose(pred, t_next)
                    v_next = velocity(pred, torch.full_like(t_vec, t_next))
                    x = x - h * 0.5 * (v + v_next)
                elif order > 1 and history:
                    past = history[: order - 1]
                    w = adams_bashforth_weights(h, [hp for _, hp in past])
                    x = x - (w[0] * v + sum(wj * vp for wj, (vp, _) in zip(w[1:], past)))
                else:
                    x = x - h * v
                v_step = v
            if known is not None:
                x = known.impose(x, t_next)
        if order > 1 and step_fn is None:
            history = [(v_step, h)] + history[: order - 2]
        if callback is not None:
            callback(i + 1, steps, x)
    return x


def adams_bashforth_weights(h: float, past_steps: list[float]) -> list[float]:
    """Weights of the variable-step Adams-Bashforth update ``x <- x - sum_j w_j v_j`` over a step of size ``h``.

    ``v_0`` is the velocity at the current time and ``v_j`` the one ``past_steps[0] + ... + past_steps[j-1]``
    earlier (in the direction the solve came from); ``w_j`` integrates the Lagrange basis polynomial of node j
    over the step, so the update is exact for velocities polynomial in t of degree ``len(past_steps)``. With
    one past step of size ``h_1`` this is AB2: ``w = h (1 + r/2), -h r/2`` with ``r = h / h_1``; with equal
    steps and two past steps the classical ``h (23, -16, 5) / 12``.
    """
    # Nodes in "progress" s (s = 0 now, s = h at the step's end; past nodes at negative s).
    nodes = [0.0]
    for hp in past_steps:
        nodes.append(nodes[-1] - hp)
    weights = []
    for j, sj in enumerate(nodes):
        others = [sk for k, sk in enumerate(nodes) if k != j]
        # L_j(s) = prod (s - s_k) / (s_j - s_k): integrate its expanded coefficients from 0 to h.
        coeffs = [1.0]  # polynomial in s, lowest degree first
        denom = 1.0
        for sk in others:
            coeffs = [a - sk * b for a, b in zip([0.0] + coeffs, coeffs + [0.0])]
            denom *= sj - sk
        weights.append(sum(c * h ** (d + 1) / (d + 1) for d, c in enumerate(coeffs)) / denom)
    return weights


def function_evaluations(steps: int, solver: str) -> int:
    """Model calls a solve costs (each one batched cond + uncond), before any step caching."""
    return 2 * steps - 1 if solver == "heun" else steps
