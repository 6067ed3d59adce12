"""Text to music: encode prompts, integrate the flow with batched CFG, decode to a waveform."""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fluxmusic.backend import make_backend, parse_dtype
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import SOLVERS, Conditioning, cfg_velocity, sample
from fluxmusic.latent import patchify, unpatchify
from fluxmusic.modeldir import ModelIndex, read_index, read_null_embeddings
from fluxmusic.text import TextEncoders, check_prompts

#: Per-step progress: (step, total steps). Raising inside it aborts the generation (used for cancellation).
ProgressFn = Callable[[int, int], None]
MAX_SEED = 2**63 - 1
OFFICIAL_NEGATIVE_PROMPT = "low quality, gentle"


@dataclass
class GenerationItem:
    """One waveform to make: its prompt, negative prompt, guidance, seed and duration."""

    prompt: str
    negative_prompt: str
    guidance: float
    seed: int
    duration: float


@dataclass
class GenerationResult:
    audio: list[np.ndarray]  # float32 mono waveforms, one per item, trimmed to their durations
    sample_rate: int
    seeds: list[int]
    prompts: list[str]


def default_model_dir() -> Path:
    """The bundled default model, shipped inside the package."""
    return Path(__file__).resolve().parent / "default_model"


def check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise FluxMusicError(f"steps {steps!r} must be an integer >= 1")
    return steps


def check_guidance(g: object) -> float:
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
        raise FluxMusicError(f"guidance {g!r} must be a finite number")
    return float(g)


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise FluxMusicError(f"seed {seed!r} must be an integer in [0, {MAX_SEED}]")
    return seed


def noise_for(seed: int, shape: tuple[int, ...]) -> Tensor:
    """Initial noise of one item, from its own generator on the CPU: the same seed gives the same noise
    alone or in any batch, on any device."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class FluxMusicPipeline:
    """Generate music from text with a model directory, on a chosen backend.

    >>> pipe = FluxMusicPipeline.from_pretrained()          # the bundled default
    >>> out = pipe("a slow soft piano melody", seed=0)
    >>> out.audio[0].shape, out.sample_rate
    """

    def __init__(self, backend, index: ModelIndex, null: Conditioning, tokenizers: tuple, cache_size: int = 256):
        self.backend = backend
        self.index = index
        self.geometry = index.geometry
        self.null = null
        self.encoders = TextEncoders(
            tokenizers[0],
            tokenizers[1],
            backend.t5_encode,
            backend.clap_encode,
            index.t5_max_length,
            index.clap_max_length,
        )
        self._cache: OrderedDict[str, Conditioning] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype = torch.float32,
        backend: str = "torch",
        **backend_options,
    ) -> FluxMusicPipeline:
        from fluxmusic.components import load_tokenizer

        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        index = read_index(model_dir)
        be = make_backend(backend, model_dir, index, device, parse_dtype(dtype), **backend_options)
        tokenizers = (
            load_tokenizer(model_dir / "tokenizer", "T5 tokenizer"),
            load_tokenizer(model_dir / "clap_tokenizer", "CLAP tokenizer"),
        )
        return cls(be, index, read_null_embeddings(model_dir), tokenizers)

    # ------------------------------------------------------------------------------------ conditioning
    @property
    def sample_rate(self) -> int:
        return self.geometry.sample_rate

    @property
    def defaults(self) -> dict:
        return self.index.defaults

    def encode_text(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts with both encoders (no cache)."""
        return self.encoders.encode(list(prompts))

    def conditioning(self, prompts: Sequence[str]) -> Conditioning:
        """Conditioning for each prompt; "" comes from the precomputed null embeddings (no encoder runs),
        others from an LRU cache or one batched encoder call for the ones not cached."""
        todo = sorted({p for p in prompts if p and p not in self._cache})
        if todo:
            enc = self.encoders.encode(todo)
            for i, p in enumerate(todo):
                self._cache[p] = Conditioning(enc.txt[i : i + 1], enc.y[i : i + 1])
        parts = []
        for p in prompts:
            if not p:
                parts.append(self.null)
            else:
                self._cache.move_to_end(p)
                parts.append(self._cache[p])
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return Conditioning(torch.cat([c.txt for c in parts]), torch.cat([c.y for c in parts]))

    # ------------------------------------------------------------------------------------ generation
    def make_items(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str = "",
        duration: float | None = None,
        guidance: float | Sequence[float] | None = None,
        seed: int | Sequence[int] | None = None,
        num_waveforms_per_prompt: int = 1,
    ) -> list[GenerationItem]:
        """Validate a request and expand it into items, one per waveform; seeds S, S+1, ... when one is given."""
        prompts = check_prompts(prompt)
        if not isinstance(negative_prompt, str):
            raise FluxMusicError(f"negative prompt {negative_prompt!r} must be a string ('' for none)")
        if (
            isinstance(num_waveforms_per_prompt, bool)
            or not isinstance(num_waveforms_per_prompt, int)
            or (num_waveforms_per_prompt < 1)
        ):
            raise FluxMusicError(f"waveforms per prompt {num_waveforms_per_prompt!r} must be an integer >= 1")
        expanded = [p for p in prompts for _ in range(num_waveforms_per_prompt)]
        n = len(expanded)
        duration = self.geometry.check_duration(self.geometry.max_duration if duration is None else duration)
        g = self.defaults.get("guidance", 7.0) if guidance is None else guidance
        gs = [check_guidance(x) for x in (g if isinstance(g, (list, tuple)) else [g] * n)]
        if seed is None:
            seed = secrets.randbelow(MAX_SEED - n)
        if isinstance(seed, (list, tuple)):
            seeds = [check_seed(s) for s in seed]
        else:
            base = check_seed(seed)
            seeds = [check_seed(base + i) for i in range(n)]
        if len(gs) != n or len(seeds) != n:
            raise FluxMusicError(f"got {len(gs)} guidance values and {len(seeds)} seeds for {n} waveforms")
        return [GenerationItem(p, negative_prompt, gi, s, duration) for p, gi, s in zip(expanded, gs, seeds)]

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str = "",
        duration: float | None = None,
        steps: int | None = None,
        guidance: float | Sequence[float] | None = None,
        solver: str | None = None,
        shift: float | None = None,
        seed: int | Sequence[int] | None = None,
        num_waveforms_per_prompt: int = 1,
        progress: ProgressFn | None = None,
    ) -> GenerationResult:
        """Generate. Defaults come from the model directory (the official ones are 50 Euler steps, guidance 7,
        negative prompt "low quality, gentle"; pass them explicitly for the official behaviour)."""
        items = self.make_items(prompt, negative_prompt, duration, guidance, seed, num_waveforms_per_prompt)
        return self.generate_items(items, steps, solver, shift, progress)

    def generate_items(
        self,
        items: Sequence[GenerationItem],
        steps: int | None = None,
        solver: str | None = None,
        shift: float | None = None,
        progress: ProgressFn | None = None,
    ) -> GenerationResult:
        """One batched CFG solve for items sharing a latent length (their durations may differ within it)."""
        steps = check_steps(self.defaults.get("steps", 50) if steps is None else steps)
        solver = self.defaults.get("solver", "euler") if solver is None else solver
        if solver not in SOLVERS:
            raise FluxMusicError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
        shift = self.defaults.get("shift") if shift is None else shift
        geo = self.geometry
        frames = {geo.latent_frames(it.duration) for it in items}
        if len(frames) != 1:
            raise FluxMusicError(f"items in one batch must share a latent length; got frames {sorted(frames)}")
        shape = (geo.latent_channels, frames.pop(), geo.latent_width)
        grid_h, grid_w = geo.grid(shape[1])

        cond = self.conditioning([it.prompt for it in items])
        uncond = self.conditioning([it.negative_prompt for it in items])
        device = getattr(self.backend, "device", torch.device("cpu"))
        x = patchify(torch.stack([noise_for(it.seed, shape) for it in items])).to(device)
        guidance = torch.tensor([it.guidance for it in items], dtype=torch.float32, device=device)
        rope = self.backend.rope(cond.txt.shape[1], grid_h, grid_w)
        velocity = cfg_velocity(
            self.backend.velocity,
            Conditioning(cond.txt.to(device), cond.y.to(device)),
            Conditioning(uncond.txt.to(device), uncond.y.to(device)),
            guidance,
            rope,
        )
        cb = (lambda i, n, _x: progress(i, n)) if progress else None
        fused = callable(getattr(self.backend, "sample_euler", None)) and getattr(self.backend, "has_step_graph", False)
        if fused and solver == "euler" and shift is None:
            # A backend with the fused step graph runs each whole Euler CFG step in one call.
            x = self.backend.sample_euler(x, cond.txt, cond.y, uncond.txt, uncond.y, guidance, rope, steps, cb)
        else:
            x = sample(velocity, x, steps, solver=solver, shift=shift, callback=cb)
        wave = self.decode(unpatchify(x, grid_h, grid_w))
        audio = [wave[i, : geo.num_samples(it.duration)].cpu().numpy().astype(np.float32) for i, it in enumerate(items)]
        return GenerationResult(audio, geo.sample_rate, [it.seed for it in items], [it.prompt for it in items])

    def encode_audio(self, wave: Tensor | np.ndarray, sample: bool = False) -> Tensor:
        """Waveform [B, T] at the model's sample rate -> scaled VAE latent [B, C, frames, width] (for training).

        T should be a whole number of hops times the VAE downsampling; the posterior mean unless ``sample``.
        """
        from fluxmusic.audio import MelConfig, log_mel

        mel_cfg = MelConfig(
            sample_rate=self.geometry.sample_rate, hop_length=self.geometry.hop_length, n_mels=self.geometry.mel_bins
        )
        mel = log_mel(torch.as_tensor(np.asarray(wave), dtype=torch.float32), mel_cfg)
        return self.backend.vae_encode(mel, sample=sample)

    def decode(self, latent: Tensor) -> Tensor:
        """Scaled latent [B, C, H, W] -> waveform [B, samples]."""
        return self.backend.vocode(self.backend.vae_decode(latent))
