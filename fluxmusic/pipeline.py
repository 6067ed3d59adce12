"""Text to music: encode prompts, integrate the flow with batched CFG, decode to a waveform.

Requests are resolved and validated by :mod:`fluxmusic.sampling` (:meth:`FluxMusicPipeline.request`);
:meth:`FluxMusicPipeline.generate` runs a resolved request as it is.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fluxmusic.backend import make_backend, parse_dtype
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning, GuidedVelocity, StepCache, sample
from fluxmusic.latent import patchify, unpatchify
from fluxmusic.modeldir import ModelIndex, read_index, read_null_embeddings
from fluxmusic.sampling import (  # noqa: F401 (re-exported: the public names of a generation)
    MAX_SEED,
    OFFICIAL_NEGATIVE_PROMPT,
    GenerationItem,
    GenerationRequest,
    Limits,
    SamplingSettings,
    build_request,
)
from fluxmusic.text import TextEncoders

#: Per-step progress: (step, total steps). Raising inside it aborts the generation (used for cancellation).
ProgressFn = Callable[[int, int], None]


@dataclass
class GenerationResult:
    audio: list[np.ndarray]  # float32 mono waveforms, one per item, trimmed to their durations
    sample_rate: int
    seeds: list[int]
    prompts: list[str]
    settings: SamplingSettings | None = None
    #: seconds per stage: text_encode, sampling, decode
    timings: dict[str, float] = field(default_factory=dict)
    #: model evaluations per waveform actually run, and those the step cache answered instead
    evaluations: float = 0.0
    cache_skipped: float = 0.0


def default_model_dir() -> Path:
    """The bundled default model, shipped inside the package."""
    return Path(__file__).resolve().parent / "default_model"


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

    def __init__(
        self,
        backend,
        index: ModelIndex,
        null: Conditioning,
        tokenizers: tuple,
        cache_size: int = 256,
        probe_loader: Callable[[], object] | None = None,
    ):
        self.backend = backend
        #: builds the step cache's probe when a request first asks for caching (None: from the torch backend's
        #: transformer if it has one, else caching is unavailable)
        self.probe_loader = probe_loader
        self._probe = None
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
        def probe_loader():
            from fluxmusic.step_cache import FirstBlockProbe

            return FirstBlockProbe.from_dir(model_dir / "transformer", getattr(be, "device", "cpu"))

        return cls(be, index, read_null_embeddings(model_dir), tokenizers, probe_loader=probe_loader)

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
    def request(self, prompt: str | Sequence[str], **options) -> GenerationRequest:
        """Resolve and validate a request against this model's defaults and geometry
        (:func:`fluxmusic.sampling.build_request`; the same call every front end makes)."""
        return build_request(self.defaults, self.geometry, prompt, **options)

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | None = None,
        duration: float | None = None,
        steps: int | None = None,
        guidance: float | Sequence[float] | None = None,
        solver: str | None = None,
        shift: float | str | None = None,
        seed: int | Sequence[int] | None = None,
        num_waveforms_per_prompt: int = 1,
        progress: ProgressFn | None = None,
        preset: str | None = None,
        guidance_interval: tuple[float, float] | None = None,
        cache_threshold: float | None = None,
    ) -> GenerationResult:
        """Generate. Absent values come from the model directory's defaults, or from ``preset``
        ("official": exactly the official sampler); ``shift=1.0`` is no time shift; seed None or -1 is random."""
        req = self.request(
            prompt, negative_prompt=negative_prompt, duration=duration, steps=steps, guidance=guidance,
            solver=solver, shift=shift, seed=seed, num_waveforms=num_waveforms_per_prompt, preset=preset,
            guidance_interval=guidance_interval, cache_threshold=cache_threshold,
        )
        return self.generate(req, progress)

    def generate(self, request: GenerationRequest, progress: ProgressFn | None = None) -> GenerationResult:
        """One batched CFG solve of a resolved request (its items share a latent length; their prompts,
        negative prompts, guidance, seeds and durations may differ). Reports seconds per stage."""
        items, st = request.items, request.settings
        geo = self.geometry
        t0 = time.perf_counter()
        cond = self.conditioning([it.prompt for it in items])
        uncond = self.conditioning([it.negative_prompt for it in items])
        t1 = time.perf_counter()
        x, stats = self.sample_latents(request, cond, uncond, progress)
        t2 = time.perf_counter()
        wave = self.decode(x)
        audio = [wave[i, : geo.num_samples(it.duration)].cpu().numpy().astype(np.float32) for i, it in enumerate(items)]
        t3 = time.perf_counter()
        return GenerationResult(
            audio, geo.sample_rate, [it.seed for it in items], [it.prompt for it in items], st,
            {"text_encode": t1 - t0, "sampling": t2 - t1, "decode": t3 - t2}, **stats,
        )

    def sample_latents(
        self,
        request: GenerationRequest,
        cond: Conditioning,
        uncond: Conditioning,
        progress: ProgressFn | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Noise -> final scaled latents [B, C, H, W] through :func:`fluxmusic.flow.sample`, and the
        per-waveform evaluation counts."""
        items, st = request.items, request.settings
        geo = self.geometry
        shape = (geo.latent_channels, request.latent_frames, geo.latent_width)
        grid_h, grid_w = geo.grid(shape[1])
        device = getattr(self.backend, "device", torch.device("cpu"))
        x = patchify(torch.stack([noise_for(it.seed, shape) for it in items])).to(device)
        guidance = torch.tensor([it.guidance for it in items], dtype=torch.float32, device=device)
        rope = self.backend.rope(cond.txt.shape[1], grid_h, grid_w)
        cond = Conditioning(cond.txt.to(device), cond.y.to(device))
        uncond = Conditioning(uncond.txt.to(device), uncond.y.to(device))
        velocity = GuidedVelocity(self.backend.velocity, cond, uncond, guidance, rope, st.guidance_interval)
        cb = (lambda i, n, _x: progress(i, n)) if progress else None
        step_fn, cache, fn = None, None, velocity
        if st.cache_threshold > 0:
            probe = self.cache_probe()
            cache = fn = StepCache(velocity, lambda xx, tt: probe(xx, tt, cond.y), st.cache_threshold)
        elif st.solver == "euler" and velocity.full and getattr(self.backend, "has_step_graph", False):
            # The fused step graph runs a whole Euler CFG step in one call: the same update, one graph.
            def step_fn(xx: Tensor, tt: Tensor, dt: Tensor) -> Tensor:
                velocity.batch_sizes.append(2 * xx.shape[0])
                return self.backend.euler_step(  # by name: the inputs of the euler_step export contract
                    x=xx, t=tt, dt=dt, txt=cond.txt, y=cond.y, null_txt=uncond.txt, null_y=uncond.y,
                    guidance=guidance, rope=rope,
                )

        x = sample(fn, x, st.steps, solver=st.solver, shift=st.shift, callback=cb, step_fn=step_fn)
        n = len(items)
        if cache is not None:
            stats = {"evaluations": cache.evaluated / n, "cache_skipped": cache.skipped / n}
        else:
            stats = {"evaluations": float(len(velocity.batch_sizes)), "cache_skipped": 0.0}
        return unpatchify(x, grid_h, grid_w), stats

    def cache_probe(self):
        """The step cache's probe (the first block's modulated input), built once: the live transformer's
        modules on the torch backend, otherwise its few weights read from the model directory."""
        if self._probe is None:
            from fluxmusic.step_cache import FirstBlockProbe

            transformer = getattr(self.backend, "transformer", None)
            if transformer is not None:
                self._probe = FirstBlockProbe.from_transformer(transformer)
            elif self.probe_loader is not None:
                self._probe = self.probe_loader()
            else:
                raise FluxMusicError(
                    f"step caching (cache_threshold > 0) is not available on the {getattr(self.backend, 'name', '?')} "
                    "backend here: it needs the transformer's first-block weights; use cache_threshold 0"
                )
        return self._probe

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
