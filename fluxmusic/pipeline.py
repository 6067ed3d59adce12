"""Text to music: encode prompts, integrate the flow with batched CFG, decode to a waveform.

Requests are resolved and validated by :mod:`fluxmusic.sampling` (:meth:`FluxMusicPipeline.request`);
:meth:`FluxMusicPipeline.generate` runs a resolved request as it is.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fluxmusic.backend import ContextBackend, fused_step, make_backend, parse_dtype
from fluxmusic.continuation import DEFAULT_BLEND, AudioContext, kept_mel_snr, kept_snr, soft_mask
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning, GuidedVelocity, KnownRegion, StepCache, sample
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
    #: transformer rows run per waveform in units of one batched cond+uncond evaluation (an evaluation
    #: outside the guidance interval counts 0.5): the cost of a clip in evaluations
    cfg_evaluations: float = 0.0
    #: given audio (continuation / infilling): per waveform, the SNR in dB of the output's kept region against
    #: the given audio, and of the model's own decoding of it (what the output holds without splicing)
    kept_snr_db: list[float] | None = None
    decoded_kept_snr_db: list[float] | None = None
    #: long form: the windows solved
    windows: int = 1
    #: given audio: mel-magnitude SNR (dB) of the model's own decoding of the kept region (phase-free fidelity)
    decoded_kept_mel_snr_db: list[float] | None = None


@dataclass
class StreamChunk:
    """One finished window of a (long-form) generation: its index of ``windows``, where its audio starts
    (samples) and the audio per waveform; timings and counts so far (evaluations per waveform, summed over the
    windows)."""

    window: int
    windows: int
    start: int
    audio: list[np.ndarray]
    timings: dict[str, float]
    evaluations: float = 0.0
    cache_skipped: float = 0.0
    kept_snr_db: list[float] | None = None
    decoded_kept_snr_db: list[float] | None = None
    windows_done: int = 1
    decoded_kept_mel_snr_db: list[float] | None = None
    #: transformer rows run per waveform so far, in batched cond+uncond evaluations (summed over the windows;
    #: see :attr:`GenerationResult.cfg_evaluations`)
    cfg_evaluations: float = 0.0


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
        media_loader: Callable[[], object] | None = None,
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
        #: image / story conditioning (issue 18): the model directory's adapters, loaded at the first request
        #: that needs them (None: a directory without adapters/, or a pipeline built without a directory)
        self.model_dir: Path | None = None
        self._media = None
        #: builds the image / story encoder instead of the model directory's torch modules (the Triton BLS model
        #: passes one over its repository's image_encoder / image_adapter / story_adapter models)
        self.media_loader = media_loader

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype = "auto",
        backend: str = "torch",
        **backend_options,
    ) -> FluxMusicPipeline:
        from fluxmusic.components import load_tokenizer

        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        index = read_index(model_dir)
        # "auto" means native bf16 for eager torch only: the exported-graph backends run at their graphs' precision
        if dtype == "auto" and backend != "torch":
            dtype = torch.float32
        be = make_backend(backend, model_dir, index, device, parse_dtype(dtype, device), **backend_options)
        tokenizers = (
            load_tokenizer(model_dir / "tokenizer", "T5 tokenizer"),
            load_tokenizer(model_dir / "clap_tokenizer", "CLAP tokenizer"),
        )
        def probe_loader():
            from fluxmusic.step_cache import FirstBlockProbe

            return FirstBlockProbe.from_dir(model_dir / "transformer", be.device)

        pipe = cls(be, index, read_null_embeddings(model_dir), tokenizers, probe_loader=probe_loader)
        pipe.model_dir = model_dir
        return pipe

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

    def media_encoder(self):
        """The image / story encoder of this model directory (loaded once); a clear error when it has none."""
        if self._media is None and self.media_loader is not None:
            self._media = self.media_loader()  # raises its own error when it has none
        if self._media is None:
            from fluxmusic.adapters import MediaEncoder, has_media

            if self.model_dir is None or not has_media(self.model_dir):
                where = f"model directory {self.model_dir}" if self.model_dir is not None else "this pipeline"
                raise FluxMusicError(
                    f"{where} has no image / story adapters (adapters/, image_encoder/, image_processor/); image and "
                    "story conditioning need a model directory that has them (the bundled default does)"
                )
            device = getattr(self.backend, "device", "cpu")
            self._media = MediaEncoder.from_model_dir(self.model_dir, device)
        return self._media

    def media_conditioning(self, media) -> list[tuple[Conditioning, float]]:
        """The request's image / story as weighted conditionings [1, ...] (see :func:`fluxmusic.adapters.mix`)."""
        enc = self.media_encoder()
        parts = []
        if media.image is not None:
            parts.append((enc.encode_image(media.image), media.image_weight))
        if media.story is not None:
            parts.append((enc.encode_story(media.story, self.encoders), media.story_weight))
        return parts

    def _conditioning(self, prompts: Sequence[str], media_parts: list | None) -> Conditioning:
        """Prompt conditioning, mixed with the image / story ones when the request has them (an empty prompt
        then weighs 0: the image / story alone)."""
        cond = self.conditioning(prompts)
        if not media_parts:
            return cond
        from fluxmusic.adapters import mix

        txt, y = [], []
        for i, p in enumerate(prompts):
            parts = ([(Conditioning(cond.txt[i : i + 1], cond.y[i : i + 1]), 1.0)] if p else []) + media_parts
            c = mix(parts)
            txt.append(c.txt)
            y.append(c.y)
        return Conditioning(torch.cat(txt), torch.cat(y))

    # ------------------------------------------------------------------------------------ generation
    def request(self, prompt: str | Sequence[str], **options) -> GenerationRequest:
        """Resolve and validate a request against this model's defaults and geometry
        (:func:`fluxmusic.sampling.build_request`; the same call every front end makes)."""
        return build_request(self.defaults, self.geometry, prompt, **options)

    def __call__(
        self,
        prompt: str | Sequence[str] = "",
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
        image: object = None,
        story: str | None = None,
        image_weight: float | None = None,
        story_weight: float | None = None,
        guidance_schedule: str | None = None,
        **audio_options,
    ) -> GenerationResult:
        """Generate. Absent values come from the model directory's defaults, or from ``preset``
        ("official": exactly the official sampler); ``shift=1.0`` is no time shift; seed None or -1 is random.

        ``audio_options``: continuation / infilling and long form (``audio=``, ``keep=``, ``regenerate=``,
        ``mode=``, ``blend=``, ``resample=``, ``splice=``, ``overlap=``, ``crossfade=``, ``sections=``; see
        :func:`fluxmusic.sampling.build_request`); ``duration`` may exceed the model's window (long form).

        ``image`` (path, bytes, PIL image, RGB array) and ``story`` (text) condition through the model's adapters,
        mixed with ``prompt`` (which may then be "") by ``image_weight`` / ``story_weight`` (the prompt weighs 1)."""
        req = self.request(
            prompt, negative_prompt=negative_prompt, duration=duration, steps=steps, guidance=guidance,
            solver=solver, shift=shift, seed=seed, num_waveforms=num_waveforms_per_prompt, preset=preset,
            guidance_interval=guidance_interval, cache_threshold=cache_threshold, guidance_schedule=guidance_schedule,
            image=image, story=story, image_weight=image_weight, story_weight=story_weight, **audio_options,
        )
        return self.generate(req, progress)

    def generate(self, request: GenerationRequest, progress: ProgressFn | None = None,
                 on_chunk: Callable[[StreamChunk], None] | None = None) -> GenerationResult:
        """One batched CFG solve of a resolved request (its items share a latent length; their prompts,
        negative prompts, guidance, seeds and durations may differ). Reports seconds per stage.

        With given audio the kept latent frames stay on the flow's path of that audio (continuation,
        infilling); a long-form request runs window by window (:meth:`generate_stream`) and is joined here,
        handing each finished window to ``on_chunk`` first (streaming front ends; not called without long form)."""
        if request.long_form is not None:
            return self._join_stream(request, progress, on_chunk)
        items, st = request.items, request.settings
        geo = self.geometry
        t0 = time.perf_counter()
        media = self.media_conditioning(request.media) if request.media is not None else None
        cond = self._conditioning([it.prompt for it in items], media)
        uncond = self.conditioning([it.negative_prompt for it in items])
        t1 = time.perf_counter()
        x, stats = self.sample_latents(request, cond, uncond, progress)
        t2 = time.perf_counter()
        wave = self.decode(x)
        audio = [wave[i, : geo.num_samples(it.duration)].cpu().numpy().astype(np.float32) for i, it in enumerate(items)]
        snr = {}
        if request.audio is not None:
            audio, snr = self._splice(request.audio, audio)
        t3 = time.perf_counter()
        return GenerationResult(
            audio, geo.sample_rate, [it.seed for it in items], [it.prompt for it in items], st,
            {"text_encode": t1 - t0, "sampling": t2 - t1, "decode": t3 - t2}, **stats, **snr,
        )

    # ------------------------------------------------------------------------------------ audio in
    def _splice(self, ctx: AudioContext, audio: list[np.ndarray]) -> tuple[list[np.ndarray], dict]:
        """Put the given audio itself into the kept region (when ``ctx.splice``) with a short fade on the kept
        side of each seam, and measure the kept region's SNR before and after."""
        geo = self.geometry
        out, decoded_snr, decoded_mel, snr = [], [], [], []
        for a in audio:
            decoded_snr.append(kept_snr(ctx, geo, a))
            decoded_mel.append(kept_mel_snr(ctx, geo, a))
            if ctx.splice:
                n = min(len(a), len(ctx.wave))
                w = ctx.sample_weights(geo, len(a))[:n]
                a = a.copy()
                a[:n] = w * ctx.wave[:n] + (1.0 - w) * a[:n]
            out.append(a.astype(np.float32))
            snr.append(kept_snr(ctx, geo, a))
        return out, {"kept_snr_db": snr, "decoded_kept_snr_db": decoded_snr, "decoded_kept_mel_snr_db": decoded_mel}

    def context_latent(self, ctx: AudioContext, latent_frames: int) -> tuple[Tensor, Tensor]:
        """The given audio's scaled VAE latent (posterior mean) on a grid of ``latent_frames`` [1, C, F, W] and
        its soft frame mask [F] (the audio is zero-padded or cut to the grid; only kept frames are used)."""
        geo = self.geometry
        if not hasattr(self.backend, "vae_encode"):
            raise FluxMusicError(f"audio in (continuation, infilling) needs a VAE encoder; the "
                                 f"{self.backend.name} backend has none: use the torch backend")
        samples = latent_frames * geo.hop_length * geo.vae_downsample
        wave = np.zeros(samples, dtype=np.float32)
        n = min(samples, len(ctx.wave))
        wave[:n] = ctx.wave[:n]
        z = self.encode_audio(wave[None])
        if z.shape[2] != latent_frames:
            raise FluxMusicError(
                f"the VAE encoded {samples} samples to {z.shape[2]} latent frames, not {latent_frames}"
            )
        return z, torch.from_numpy(ctx.frame_mask(geo, latent_frames))

    def _known_region(self, x: Tensor, latent: Tensor, mask: Tensor, items, resample: int) -> KnownRegion:
        """The :class:`KnownRegion` of a solve starting from tokens ``x``: ``latent`` [1 or B, C, F, W] known,
        ``mask`` [F] per latent frame (the same for every item)."""
        from fluxmusic.continuation import RESAMPLE_T_MIN

        b, c, f, w = len(items), latent.shape[1], latent.shape[2], latent.shape[3]
        device, dtype = x.device, x.dtype
        x0 = patchify(latent.to(device, dtype).expand(b, c, f, w).contiguous())
        m = patchify(mask.to(device, dtype).view(1, 1, f, 1).expand(1, c, f, w).contiguous())
        # re-noise draws from generators of their own per item (seeded from the item's seed), so the initial
        # noise and every item's result are independent of the batch.
        gens = [torch.Generator().manual_seed((it.seed ^ 0x5EED) & (2**63 - 1)) for it in items] if resample else None
        return KnownRegion(x0, m, x.clone(), resample, RESAMPLE_T_MIN, gens)

    # ------------------------------------------------------------------------------------ long form
    def _join_stream(self, request: GenerationRequest, progress: ProgressFn | None,
                     on_chunk: Callable[[StreamChunk], None] | None = None) -> GenerationResult:
        parts: list[list[np.ndarray]] = [[] for _ in request.items]
        last = None
        for chunk in self.generate_stream(request, progress):
            for i, a in enumerate(chunk.audio):
                parts[i].append(a)
            last = chunk
            if on_chunk is not None:
                on_chunk(chunk)
        audio = [np.concatenate(p).astype(np.float32) for p in parts]
        return GenerationResult(
            audio, self.sample_rate, [it.seed for it in request.items], [it.prompt for it in request.items],
            request.settings, dict(last.timings), evaluations=last.evaluations, cache_skipped=last.cache_skipped,
            cfg_evaluations=last.cfg_evaluations, kept_snr_db=last.kept_snr_db,
            decoded_kept_snr_db=last.decoded_kept_snr_db, windows=last.windows,
            decoded_kept_mel_snr_db=last.decoded_kept_mel_snr_db,
        )

    def generate_stream(self, request: GenerationRequest, progress: ProgressFn | None = None) -> Iterator[StreamChunk]:
        """Yield the audio of a request window by window, as each is finished (a request without long form is
        one chunk). Each window keeps the previous window's last ``overlap`` latent frames as known context
        (continuation in the one sampler loop), uses a seed derived from the item's seed and the window index
        (:func:`fluxmusic.continuation.window_seed`) and the prompt of the section its new part starts in; the
        decoded windows are joined by a crossfade centred in the overlap. The concatenated chunks are exactly
        :meth:`generate`'s audio."""
        lf = request.long_form
        if lf is None:
            r = self.generate(request, progress)
            yield StreamChunk(0, 1, 0, r.audio, r.timings, r.evaluations, r.cache_skipped, r.kept_snr_db,
                              r.decoded_kept_snr_db, 1, r.decoded_kept_mel_snr_db, r.cfg_evaluations)
            return
        from fluxmusic.continuation import window_seed

        geo = self.geometry
        spf = geo.hop_length * geo.vae_downsample  # samples per latent frame
        total = geo.num_samples(lf.duration)
        windows = lf.windows(geo)
        xf = int(round(lf.crossfade * geo.sample_rate))
        items, st = request.items, request.settings
        timings = {"text_encode": 0.0, "sampling": 0.0, "decode": 0.0}
        evals = skipped = cfg_evals = 0.0
        snr: dict = {}
        emitted = 0
        pending: list[np.ndarray] = []  # per item: audio from sample ``emitted`` on, not yet final
        prev_latent: Tensor | None = None
        blend = request.audio.blend if request.audio is not None else DEFAULT_BLEND
        media = self.media_conditioning(request.media) if request.media is not None else None
        steps_done = 0
        n_steps = st.steps * len(windows)
        # One beat grid for the whole song: on the given audio's beat, in every window (later windows are given
        # the previous window's tail, not the audio, and would otherwise restart the grid at phase 0).
        beat_t0 = self.beat_phases(request) if self.beat_channels else None

        def seam_start(k: int) -> int:
            """First sample of the crossfade between window k - 1 and window k."""
            w = windows[k]
            return (w.start + w.context // 2) * spf - xf // 2

        for w in windows:
            new_from = (w.start + w.context) * geo.seconds_per_latent_frame
            prompts = [lf.prompt_at(new_from) or it.prompt for it in items]
            sub = GenerationRequest(
                tuple(GenerationItem(p, it.negative_prompt, it.guidance, window_seed(it.seed, w.index),
                                     w.frames * geo.seconds_per_latent_frame, it.bpm, it.register)
                      for p, it in zip(prompts, items)),
                st, w.frames, request.audio if w.index == 0 else None, conditioning=request.conditioning,
                controls=request.controls,
            )
            t0 = time.perf_counter()
            cond = self._conditioning(prompts, media)
            uncond = self.conditioning([it.negative_prompt for it in items])
            t1 = time.perf_counter()
            known = None
            if w.index > 0:
                mask = soft_mask(w.frames, [(0, w.context)], round(blend / geo.seconds_per_latent_frame))
                ctx = torch.zeros(len(items), prev_latent.shape[1], w.frames, prev_latent.shape[3])
                ctx[:, :, : w.context] = prev_latent[:, :, -w.context:].cpu()
                known = (ctx, torch.from_numpy(mask))

            def step_progress(i: int, n: int, base: int = steps_done) -> None:
                if progress is not None:
                    progress(base + i, n_steps)

            x, stats = self.sample_latents(sub, cond, uncond, step_progress, known=known,
                                           beat_start=w.start * geo.seconds_per_latent_frame, beat_t0=beat_t0)
            steps_done += st.steps
            t2 = time.perf_counter()
            prev_latent = x
            wave = self.decode(x).cpu().numpy().astype(np.float32)
            audio = [wave[i, : w.frames * spf] for i in range(len(items))]
            if w.index == 0 and request.audio is not None:
                audio, snr = self._splice(request.audio, audio)
            t3 = time.perf_counter()
            timings["text_encode"] += t1 - t0
            timings["sampling"] += t2 - t1
            timings["decode"] += t3 - t2
            evals += stats["evaluations"]
            skipped += stats["cache_skipped"]
            cfg_evals += stats["cfg_evaluations"]
            g0 = w.start * spf
            if w.index == 0:
                pending = audio
            else:
                a = seam_start(w.index)
                ramp = (np.arange(xf, dtype=np.float32) + 0.5) / max(xf, 1)
                merged = []
                for old, new in zip(pending, audio):
                    head = old[: a - emitted]
                    fade = old[a - emitted : a - emitted + xf] * (1 - ramp) + new[a - g0 : a - g0 + xf] * ramp
                    merged.append(np.concatenate([head, fade, new[a - g0 + xf :]]))
                pending = merged
            last = w.index == len(windows) - 1
            until = total if last else seam_start(w.index + 1)
            out = [p[: until - emitted] for p in pending]
            pending = [p[until - emitted :] for p in pending]
            emitted = until
            yield StreamChunk(w.index, len(windows), emitted - len(out[0]), out, dict(timings), evals, skipped,
                              snr.get("kept_snr_db"), snr.get("decoded_kept_snr_db"), w.index + 1,
                              snr.get("decoded_kept_mel_snr_db"), cfg_evals)

    def sample_latents(
        self,
        request: GenerationRequest,
        cond: Conditioning,
        uncond: Conditioning,
        progress: ProgressFn | None = None,
        known: tuple[Tensor, Tensor] | None = None,
        beat_start: float = 0.0,
        beat_t0: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Noise -> final scaled latents [B, C, H, W] through :func:`fluxmusic.flow.sample`, and the
        per-waveform evaluation counts. ``known`` (latent [1 or B, C, F, W], frame mask [F]) overrides the
        request's given audio (long form passes the previous window's tail); ``beat_start``: the time of this
        window's first frame in the song, and ``beat_t0`` its beats' phase (:meth:`with_controls`): a beat grid
        continues across long-form windows."""
        items, st = request.items, request.settings
        geo = self.geometry
        shape = (geo.latent_channels, request.latent_frames, geo.latent_width)
        grid_h, grid_w = geo.grid(shape[1])
        device = self.backend.device
        x = patchify(torch.stack([noise_for(it.seed, shape) for it in items])).to(device)
        guidance = torch.tensor([it.guidance for it in items], dtype=torch.float32, device=device)
        rope = self.backend.rope(cond.txt.shape[1], grid_h, grid_w)
        cond = Conditioning(cond.txt.to(device), cond.y.to(device))
        uncond = Conditioning(uncond.txt.to(device), uncond.y.to(device))
        region = None
        if known is None and request.audio is not None:
            known = self.context_latent(request.audio, request.latent_frames)
        if known is not None:
            resample = request.audio.resample if request.audio is not None else 0
            region = self._known_region(x, known[0], known[1], items, resample)
        context = self.trained_context(request, region)
        self.check_controls(request)
        beat_ch, register_ch = self.control_channels
        if beat_ch or register_ch:
            context = self.with_controls(request, context, x, grid_h, grid_w, beat_start, beat_t0)
        model_fn = self.backend.velocity
        if context is not None:
            from fluxmusic.beat import without_controls

            # CFG runs [cond; uncond] as one batch: both halves see the same known audio; the uncond half is not
            # given the beat grid or the register hint (guidance toward them, fluxmusic.beat.without_controls).
            pair = torch.cat((context, without_controls(context, beat_ch + register_ch)))

            def model_fn(xx: Tensor, tt: Tensor, txt: Tensor, y: Tensor, rope_: Tensor) -> Tensor:
                c = context if xx.shape[0] == context.shape[0] else pair
                return self.backend.velocity(xx, tt, txt, y, rope_, context=c)
        velocity = GuidedVelocity(model_fn, cond, uncond, guidance, rope, st.guidance_interval,
                                  st.guidance_schedule)
        cb = (lambda i, n, _x: progress(i, n)) if progress else None
        step_fn, cache, fn = None, None, velocity
        if st.cache_threshold > 0:
            if beat_ch or register_ch:
                raise FluxMusicError("step caching (cache_threshold > 0) does not combine with this model's beat "
                                     "grid / register hint (beat_channels / register_channels in its config.json); "
                                     "use cache_threshold 0")
            if context is not None:
                raise FluxMusicError("step caching (cache_threshold > 0) does not combine with trained "
                                     "conditioning; use cache_threshold 0 or conditioning 'replace'")
            probe = self.cache_probe()
            cache = fn = StepCache(velocity, lambda xx, tt: probe(xx, tt, cond.y), st.cache_threshold)
        elif st.solver == "euler" and velocity.plain and fused_step(self.backend) is not None:
            # The fused step graph runs a whole Euler CFG step in one call: the same update, one graph. On a
            # context model it takes the trained context too (one row per item; the graph repeats it for uncond).
            extra = {} if context is None else {"context": context.expand(len(items), -1, -1)}

            def step_fn(xx: Tensor, tt: Tensor, dt: Tensor) -> Tensor:
                velocity.batch_sizes.append(2 * xx.shape[0])
                return self.backend.euler_step(  # by name: the inputs of the euler_step export contract
                    x=xx, t=tt, dt=dt, txt=cond.txt, y=cond.y, null_txt=uncond.txt, null_y=uncond.y,
                    guidance=guidance, rope=rope, **extra,
                )

        x = sample(fn, x, st.steps, solver=st.solver, shift=st.shift, callback=cb, step_fn=step_fn, known=region)
        n = len(items)
        if cache is not None:
            stats = {"evaluations": cache.evaluated / n, "cache_skipped": cache.skipped / n}
        else:
            stats = {"evaluations": float(len(velocity.batch_sizes)), "cache_skipped": 0.0}
        # Transformer rows run, per waveform, in units of one batched cond+uncond evaluation (2 rows): what a
        # clip costs once the guidance interval (B-row calls) and the cache (row subsets) are counted.
        stats["cfg_evaluations"] = sum(velocity.batch_sizes) / (2 * n)
        return unpatchify(x, grid_h, grid_w), stats

    @property
    def takes_context(self) -> bool:
        """Whether this model has trained masked conditioning (a transformer with ``context_channels``)."""
        return isinstance(self.backend, ContextBackend) and self.backend.takes_context

    @property
    def control_channels(self) -> tuple[int, int]:
        """The transformer's (beat-grid, register-hint) channels (``beat_channels``, ``register_channels`` in its
        config; 0: not taken)."""
        cfg = getattr(self.backend, "transformer_config", None)
        if cfg is None:
            cfg = getattr(getattr(self.backend, "transformer", None), "config", None)
        return (int(getattr(cfg, "beat_channels", 0) or 0), int(getattr(cfg, "register_channels", 0) or 0))

    def check_controls(self, request: GenerationRequest) -> None:
        """An explicitly set control (``bpm``, ``register``) needs a transformer that takes it: one clear error, not
        a setting silently ignored (the same words in a prompt condition through the text)."""
        for name, channels, what in zip(("bpm", "register"), self.control_channels,
                                        ("beat grid (beat_channels)", "register hint (register_channels)")):
            if name in request.controls and not channels:
                raise FluxMusicError(f"{name} is set, but this model's transformer takes no {what}; leave {name} "
                                     "unset (the prompt's words still condition it through the text)")

    @property
    def beat_channels(self) -> int:
        """The transformer's beat-grid channels (0: no beat-grid conditioning)."""
        return self.control_channels[0]

    def beat_phases(self, request: GenerationRequest) -> Tensor:
        """Per item, the time in seconds of a beat of its grid: 0 (the song starts on a beat), or, when audio is
        given, the beat of that audio at the item's tempo (estimated once per distinct tempo)."""
        from fluxmusic.beat import estimate_beat_phase

        if request.audio is None:
            return torch.zeros(len(request.items))
        phase = {b: estimate_beat_phase(request.audio.wave, self.sample_rate, b)[0]
                 for b in {it.bpm for it in request.items if it.bpm is not None}}
        return torch.tensor([0.0 if it.bpm is None else phase[it.bpm] for it in request.items])

    def with_controls(self, request: GenerationRequest, context: Tensor | None, x: Tensor, grid_h: int,
                      grid_w: int, start: float, beat_t0: Tensor | None = None) -> Tensor:
        """The context input of a model with controls: [masked latent, mask] (zeros when nothing is known), then
        each item's beat tokens at its ``bpm`` (:func:`fluxmusic.beat.beat_features`) and / or its register hint
        (:func:`fluxmusic.register.register_features`), as the model takes them. The grid's beats fall at
        ``beat_t0`` (default :meth:`beat_phases`) plus whole beat periods; ``start`` is the time of the first
        frame in the song."""
        from fluxmusic.beat import beat_features
        from fluxmusic.register import register_features, register_midi

        n, length, channels = x.shape
        beat_ch, register_ch = self.control_channels
        parts = [x.new_zeros(n, length, 2 * channels) if context is None else context.to(x).expand(n, -1, -1)]
        if beat_ch:
            bpm = torch.tensor([float("nan") if it.bpm is None else it.bpm for it in request.items])
            t0 = self.beat_phases(request) if beat_t0 is None else beat_t0
            parts.append(beat_features(bpm, t0, grid_h * self.geometry.patch, grid_w,
                                       self.geometry.seconds_per_latent_frame, start).to(x))
        if register_ch:
            midi = torch.tensor([register_midi(it.register) for it in request.items])
            parts.append(register_features(midi, grid_h, grid_w, self.sample_rate).to(x))
        return torch.cat(parts, dim=-1)

    def trained_context(self, request: GenerationRequest, region: KnownRegion | None) -> Tensor | None:
        """The context input [B, L, 2C] of a solve with known frames when it uses trained conditioning
        (``request.conditioning`` "trained", or "auto" on a model that has it), else None (replace only)."""
        if region is None or request.conditioning == "replace":
            return None
        if not self.takes_context:
            if request.conditioning == "trained":
                raise FluxMusicError("conditioning 'trained' needs a transformer with trained masked "
                                     "conditioning (context_channels in its config.json); this model has none: "
                                     "use 'replace' or 'auto'")
            return None
        from fluxmusic.model import masked_context

        # The soft seam ramp belongs to the replacement; the model is told which frames are known (>= half).
        hard = (region.mask >= 0.5).to(region.x0.dtype)
        return masked_context(region.x0, hard)

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
                    f"step caching (cache_threshold > 0) is not available on the {self.backend.name} "
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
