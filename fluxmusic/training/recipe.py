"""``fluxmusic train --recipe default``: the bundled default model from scratch, on the CPU.

Stages (each skipped when its output exists in ``--out``, so an interrupted recipe continues; each trainer
also resumes from its own checkpoint):

1. ``corpus/``      the music corpus: ``default`` renders real scores (``fluxmusic data render``: music21 +
                    FluidSynth GM SoundFont), ``toy`` the procedural synth (``fluxmusic data synth``)
2. ``parts/tokenizer``, ``parts/clap_tokenizer``  word-level tokenizers from the training captions
3. ``parts/vae``    mel VAE, 8x down in time and frequency          (runs/vae)
4. ``parts/vocoder`` Vocos-style iSTFT vocoder with discriminators (default) or HiFi-GAN (toy), hop 160;
                    the default trains it in two phases (``runs/vocoder`` -> ``parts/vocoder_base``, then
                    ``runs/vocoder_polish``: long-window STFT losses that resolve a hop-rate comb)
5. ``parts/clap``, ``parts/text_encoder``  CLAP + T5, contrastive   (runs/text)
6. ``cache/``       scaled latents + T5 / CLAP embeddings of every clip
7. ``parts/transformer``  rectified flow on the cache               (runs/transformer)
8. ``parts/transformer_masked``  trained masked conditioning (continuation / infilling): the transformer with a
                    zero-initialised context input, fine-tuned with the masked flow loss (runs/transformer_masked);
                    recipes with ``masked_stage`` only
8b. ``parts/transformer_beat``  beat-grid conditioning (fluxmusic.beat): each clip's beat phase read from its
                    audio into the cache, then the masked transformer with zero-initialised beat columns,
                    fine-tuned the same way (runs/transformer_beat); recipes with ``beat_stage`` only
8c. ``parts/transformer_register``  the register hint (fluxmusic.register): the beat transformer with
                    zero-initialised register columns, fine-tuned the same way (runs/transformer_register); recipes
                    with ``register_stage`` only
9. ``model/``       the assembled model directory (DESIGN.md section 5), with its sampling defaults

Every stage runs on the shared training loop (``fluxmusic.training.loop.train``). ``--budget-minutes``
scales every stage's step count linearly from the recipe's nominal budget (measured on this machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxmusic.checkpoint import atomic_write_text
from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.training.config import TrainConfig
from fluxmusic.training.saving import atomic_save_dir
from fluxmusic.training.text_task import TextEncodersConfig
from fluxmusic.training.vae_task import VAEConfig
from fluxmusic.training.vocoder_task import VocoderConfig


@dataclass(frozen=True)
class Stage:
    """Optimisation settings of one trainer."""

    steps: int
    batch_size: int
    lr: float
    ema_decay: float = 0.99
    warmup_steps: int = 0
    bf16: bool = False

    grad_clip: float = 1.0
    schedule: str = "cosine"  # after warmup: cosine down to 0.1x, or constant
    val_at_start: bool = False  # validate the starting weights too (a fine-tune's baseline in log.jsonl)

    def train_config(self, scale: float, seed: int, log_every: int, device: str = "cpu") -> TrainConfig:
        steps = max(2, int(round(self.steps * scale)))
        return TrainConfig(
            steps=steps, batch_size=self.batch_size, lr=self.lr, ema_decay=self.ema_decay, ema_every=1,
            warmup_steps=min(self.warmup_steps, steps // 4), schedule=self.schedule, min_lr_ratio=0.1, bf16=self.bf16,
            log_every=min(log_every, steps), ckpt_every=max(50, steps // 8), seed=seed, device=device,
            grad_clip=self.grad_clip, val_at_start=self.val_at_start,
        )


@dataclass(frozen=True)
class VocoderPhase:
    """A further vocoder training phase, started from the previous phase's EMA weights (its checkpoint)."""

    name: str  # its run directory under runs/
    stage: Stage
    crop_frames: int = 100
    stft_weight: float = 15.0
    # the long (2048 / 4096-sample) STFT windows that resolve the lines of a hop-rate comb
    comb_losses: bool = True
    # phases relative to each bin's natural advance (VocosConfig.phase_advance): a convolutional net's
    # frame-invariant output is then a coherent tone at a bin centre, not a pulse at the hop rate
    phase_advance: bool = True
    phase_integrate: bool = False  # VocosConfig.phase_integrate (the head grows zero increment rows)
    phase_dither_db: float | None = None  # VocosConfig.phase_dither_db: trained with the quiet-bin dither on


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a default model: data size, component sizes, step budgets, sampling defaults."""

    hours: float  # synth corpus hours (toy); the rendered corpus is sized by render_works
    seed: int
    nominal_minutes: float  # wall time of the whole recipe with these steps on this machine (docs/default-model.md)
    vae: VAEConfig
    vae_stage: Stage
    vae_crop_frames: int
    vocoder: VocoderConfig
    vocoder_stage: Stage
    vocoder_crop_frames: int
    text: TextEncodersConfig
    text_stage: Stage
    transformer: FluxMusicConfig
    transformer_stage: Stage
    defaults: dict = field(default_factory=dict)
    name: str = "fluxmusic-default"
    log_every: int = 25
    corpus: str = "synth"  # "render": real scores through FluidSynth; "synth": the procedural corpus
    render_works: int = 1200  # corpus files rendered (render corpus)
    render_clips_per_work: int = 2
    half_storage: tuple[str, ...] = ()  # components whose weights are stored fp16 (loaders upcast): bundle size
    # components stored bf16 instead: rounded once, so a bf16 run computes with exactly the fp32 model's bf16
    # weights (fp16 storage then bf16 compute rounds twice; that moved two clips' comb figures out of range)
    bf16_storage: tuple[str, ...] = ()
    # The vocoder's STFT-loss weight, and whether its resolutions add the long (2048 / 4096) windows that resolve a
    # hop-rate comb (vocoder_task.COMB_RESOLUTIONS)
    vocoder_stft_weight: float = 1.0
    vocoder_comb_losses: bool = False
    # Vocoder phases after the first, each from the previous one's EMA weights (see VocoderPhase)
    vocoder_phases: tuple[VocoderPhase, ...] = ()
    # Trained masked conditioning: the trained transformer extended with the context input and fine-tuned
    # (MaskedFinetuneTask); None: the model directory gets the plain transformer (training-free continuation only)
    masked_stage: Stage | None = None
    masked_context_lr: float = 1e-3  # peak lr of the new, zero-initialised context input (the rest: the stage's)
    # Beat-grid conditioning: the masked transformer given the beat grid (fluxmusic.beat) and fine-tuned further
    # (needs masked_stage; its context input trains at masked_context_lr); None: no beat grid
    beat_stage: Stage | None = None
    # The register hint: the beat transformer given the melody's register (fluxmusic.register) and fine-tuned
    # further (needs beat_stage); None: no register hint
    register_stage: Stage | None = None
    register_context_lr: float | None = None  # its context input's peak lr (None: masked_context_lr)
    # Rounds of the vocoder's mel-match projection (VocosConfig.mel_match_iterations) and its momentum
    # (mel_match_momentum), set in the assembled model directory: parameter-free, so no stage trains it (0: off)
    vocoder_mel_match: int = 0
    vocoder_mel_match_momentum: float = 0.0

    def control_context_lr(self, register: bool) -> float | None:
        """The context input's peak lr of the beat stage, or with ``register`` of the register stage."""
        return (self.register_context_lr or self.masked_context_lr) if register else self.masked_context_lr


_DEFAULT_TRANSFORMER = FluxMusicConfig(
    in_channels=64, vec_in_dim=128, context_in_dim=128, hidden_size=256, num_heads=4, depth=2,
    depth_single_blocks=4, axes_dim=(16, 24, 24),
)

RECIPES: dict[str, Recipe] = {
    # Real music: ~1200 music21 scores rendered with FluidSynth; VAE 8x down with 16 latent channels
    # (256 transformer tokens for 10.24 s); Vocos vocoder trained with MPD + spectrogram discriminators.
    "default": Recipe(
        hours=1.0, seed=0, nominal_minutes=272.0, corpus="render",  # +80 min beat stage, +67 min register stage
        vae=VAEConfig(channels=(16, 32, 64, 128), latent_channels=16),
        vae_stage=Stage(steps=4000, batch_size=8, lr=1e-3, warmup_steps=50), vae_crop_frames=128,
        vocoder=VocoderConfig(kind="vocos", adversarial=True, vocos_hidden=192, vocos_intermediate=576,
                              vocos_layers=8, disc_ffts=(512,)),
        # No joint clipping: generator and discriminator gradients share one norm (Adam scales each anyway).
        vocoder_stage=Stage(steps=8000, batch_size=8, lr=5e-4, ema_decay=0.999, warmup_steps=50, grad_clip=0.0),
        vocoder_crop_frames=64,
        vocoder_phases=(
            VocoderPhase("vocoder_polish", Stage(steps=2000, batch_size=8, lr=2e-4, ema_decay=0.999, warmup_steps=20,
                                                 grad_clip=0.0)),
            # Integrated phase + quiet-bin phase dither, from the polish's EMA (the increment rows start at zero):
            # the generated clips' comb figure falls from 712 (max) to within real music's range on all 116
            # held-out prompts (docs/quality.md)
            VocoderPhase("vocoder_dither", Stage(steps=3750, batch_size=8, lr=2e-4, ema_decay=0.999, warmup_steps=50,
                                                 grad_clip=0.0, schedule="constant"),
                         phase_integrate=True, phase_dither_db=-20.0),
        ),
        text=TextEncodersConfig(), text_stage=Stage(steps=1500, batch_size=32, lr=5e-4, warmup_steps=50),
        transformer=_DEFAULT_TRANSFORMER,
        transformer_stage=Stage(steps=2500, batch_size=16, lr=5e-4, ema_decay=0.995, warmup_steps=100, bf16=True),
        # ~1 s per step here (fp32, one thread): 50 min; lr 1e-4 for the pretrained weights, 1e-3 for context_in
        masked_stage=Stage(steps=3000, batch_size=8, lr=1e-4, ema_decay=0.995, warmup_steps=150, val_at_start=True),
        # ~2 s per step here (one thread): 80 min; the bundled one stopped at a 58-minute limit (docs/default-model.md)
        beat_stage=Stage(steps=2400, batch_size=16, lr=2e-4, ema_decay=0.995, warmup_steps=120, val_at_start=True),
        # The register hint on each clip's measured melody pitch, 10x lr for its columns: ~0.9 steps/s here, 67 min.
        # The bundled one trained 1200 steps on register-word targets, then 2400 on melody pitch (docs/quality.md)
        register_stage=Stage(steps=3600, batch_size=16, lr=5e-4, ema_decay=0.995, warmup_steps=60, val_at_start=True),
        register_context_lr=5e-3,
        # AB2 14 / shift 3: the cheapest setting as accurate as the official Euler-50 (latent distance to a
        # Heun-40 solution 0.030 vs 0.037) with FAD/CLAP within their noise (fluxmusic eval --sweep,
        # docs/performance.md section 5); AB2 12 misses by 2-4%.
        defaults={"steps": 14, "guidance": 4.0, "solver": "ab2", "shift": 3.0},
        half_storage=("vae", "vocoder", "text_encoder", "clap"), bf16_storage=("transformer",),
        # 5 rounds with momentum 0.6: beats Griffin-Lim on held-out resynthesis (log-mel L1 0.082 vs 0.109, MR-STFT
        # 1.054 vs 1.284) for ~0.03 s per clip (docs/vocoder.md)
        vocoder_mel_match=5, vocoder_mel_match_momentum=0.6,
    ),
    # A toy of the same pipeline for tests: minutes of audio, a handful of steps, tiny widths.
    "toy": Recipe(
        hours=0.012, seed=0, nominal_minutes=1.0,
        vae=VAEConfig(channels=(8, 8, 8, 8), latent_channels=8, norm_groups=4),
        vae_stage=Stage(steps=3, batch_size=4, lr=1e-3), vae_crop_frames=64,
        vocoder=VocoderConfig(initial_channels=32, resblock_kernels=(3,), resblock_dilations=((1,),)),
        vocoder_stage=Stage(steps=3, batch_size=2, lr=1e-3), vocoder_crop_frames=16,
        # a second phase, so the phase chain (init from the previous EMA, parts/vocoder_base) runs in the tests
        vocoder_phases=(VocoderPhase("vocoder_polish", Stage(steps=2, batch_size=2, lr=1e-3), crop_frames=16,
                                     comb_losses=False),),
        text=TextEncodersConfig(t5_d_model=32, t5_heads=2, t5_layers=1, clap_hidden=32, clap_layers=1,
                                clap_heads=2, projection_dim=16, audio_patch_hidden=16, audio_depths=(1, 1),
                                audio_heads=(1, 2)),
        text_stage=Stage(steps=3, batch_size=4, lr=1e-3),
        transformer=FluxMusicConfig(in_channels=32, vec_in_dim=32, context_in_dim=32, hidden_size=32, num_heads=2,
                                    depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6)),
        transformer_stage=Stage(steps=3, batch_size=4, lr=1e-3),
        masked_stage=Stage(steps=3, batch_size=4, lr=1e-3, val_at_start=True),
        beat_stage=Stage(steps=2, batch_size=4, lr=1e-3),
        register_stage=Stage(steps=2, batch_size=4, lr=1e-3),
        defaults={"steps": 2, "guidance": 3.0, "solver": "euler", "shift": None}, name="fluxmusic-toy", log_every=1,
    ),
}


def _round_up(n: int, k: int = 8) -> int:
    return k * math.ceil(n / k)


class RecipeRun:
    """Runs the stages of a recipe in ``out``; each stage's output is its completion marker."""

    def __init__(self, recipe: Recipe, out: str | Path, budget_minutes: float | None = None,
                 hours: float | None = None, stream=None, device: str = "cpu", soundfont: str | None = None) -> None:
        self.r = recipe
        self.device, self.soundfont = device, soundfont
        self.out = Path(out)
        self.hours = recipe.hours if hours is None else hours
        if budget_minutes is not None and not (budget_minutes > 0 and math.isfinite(budget_minutes)):
            raise FluxMusicError(f"--budget-minutes must be a positive number, got {budget_minutes}")
        self.scale = 1.0 if budget_minutes is None else budget_minutes / recipe.nominal_minutes
        if recipe.beat_stage is not None and recipe.masked_stage is None:
            raise FluxMusicError(f"recipe {recipe.name}: beat_stage fine-tunes the masked transformer; it needs "
                                 "masked_stage")
        if recipe.register_stage is not None and recipe.beat_stage is None:
            raise FluxMusicError(f"recipe {recipe.name}: register_stage fine-tunes the beat transformer; it needs "
                                 "beat_stage")
        self.stream = stream or sys.stderr
        self.parts = self.out / "parts"
        self.timings: dict[str, float] = {}

    def say(self, msg: str) -> None:
        print(f"recipe: {msg}", file=self.stream, flush=True)

    def _stage(self, name: str, done: Path, fn) -> None:
        if done.exists():
            self.say(f"{name}: done already ({done})")
            return
        self.say(f"{name}: starting")
        t0 = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - t0
        self.say(f"{name}: {self.timings[name]:.0f} s")

    def _train(self, task, stage: Stage, run: str, export: Path) -> None:
        from fluxmusic.training.loop import train

        cfg = stage.train_config(self.scale, self.r.seed, self.r.log_every, self.device)
        train(task, cfg, self.out / "runs" / run, resume=True, export_dir=export, stream=self.stream)

    # ------------------------------------------------------------------------------------------ stages
    def run(self) -> Path:
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        manifest = self.out / "corpus" / "manifest.jsonl"
        self._stage("corpus", manifest, lambda: self.corpus(manifest))
        self._stage("tokenizers", self.parts / "clap_tokenizer", lambda: self.tokenizers(manifest))
        self._bank: dict[str, Any] = {}
        # The vocoder depends only on the corpus: it trains in a second process alongside the chain
        # VAE -> text encoders -> precompute -> transformer (one thread each: see --threads).
        vocoder = None if (self.parts / "vocoder").exists() else self._start_vocoder()
        self._stage("vae", self.parts / "vae", lambda: self.train_vae(manifest))
        self._stage("text_encoders", self.parts / "text_encoder", lambda: self.train_text(manifest))
        self._stage("precompute", self.out / "cache" / "cache.json", lambda: self.precompute(manifest))
        self._stage("transformer", self.parts / "transformer", self.train_transformer)
        if self.r.masked_stage is not None:
            self._stage("transformer_masked", self.parts / "transformer_masked", self.train_transformer_masked)
        if self.r.beat_stage is not None:
            self._stage("transformer_beat", self.parts / "transformer_beat", lambda: self.train_transformer_beat(
                manifest))
        if self.r.register_stage is not None:
            self._stage("transformer_register", self.parts / "transformer_register",
                        lambda: self.train_transformer_beat(manifest, register=True))
        if vocoder is not None:
            self._join_vocoder(vocoder)
        model = self.out / "model"
        stale = self.out / ".model.plain"  # a model assembled before this recipe had its masked stage
        shutil.rmtree(stale, ignore_errors=True)
        if model.exists() and _transformer_stage(model / "transformer") != self.final_transformer.name:
            self.say(f"assemble: model/ holds a transformer from before the {self.final_transformer.name} stage; "
                     "again")
            model.rename(stale)
        self._stage("assemble", model, lambda: self.assemble(model))
        shutil.rmtree(stale, ignore_errors=True)
        total = time.perf_counter() - t0
        report = {"recipe": self.r.name, "scale": self.scale, "hours": self.hours, "total_s": total,
                  "stages_s": self.timings}
        atomic_write_text(self.out / "recipe_run.json", json.dumps(report, indent=2) + "\n")
        self.say(f"model directory {model} ({total / 60:.1f} min this run)")
        return model

    def _start_vocoder(self):
        import multiprocessing as mp

        other = _live_pid(self.out / "runs" / "vocoder.pid")
        if other is not None:  # an earlier, interrupted recipe run left its vocoder process training
            self.say(f"vocoder: already training in process {other}; waiting for it at the end")
            return _PidWaiter(other)
        self.say(f"vocoder: training in a second process (log {self.out / 'runs' / 'vocoder.log'})")
        proc = mp.get_context("spawn").Process(
            target=_vocoder_worker,
            args=(self.r, str(self.out), self.scale, self.hours, torch.get_num_threads(), self.device),
        )
        proc.start()
        proc.started_at = time.perf_counter()  # type: ignore[attr-defined]
        return proc

    def _join_vocoder(self, proc) -> None:
        proc.join()
        if isinstance(proc, _PidWaiter):
            if not (self.parts / "vocoder").exists():
                raise FluxMusicError(f"the vocoder process {proc.pid} ended without writing {self.parts / 'vocoder'}")
            return
        if proc.exitcode != 0 or not (self.parts / "vocoder").exists():
            raise FluxMusicError(
                f"the vocoder stage failed (exit code {proc.exitcode}); see {self.out}/runs/vocoder.log"
            )
        self.timings["vocoder (parallel)"] = time.perf_counter() - proc.started_at
        self.say(f"vocoder: done ({self.timings['vocoder (parallel)']:.0f} s, in parallel)")

    def bank(self, manifest: Path, split: str):
        from fluxmusic.training.audio_data import load_clip_bank

        if split not in self._bank:
            self._bank[split] = load_clip_bank(manifest, split=split)
        return self._bank[split]

    def corpus(self, manifest: Path) -> None:
        if self.r.corpus == "render":
            from fluxmusic.data.render import render_corpus

            render_corpus(manifest.parent, max_works=self.r.render_works, clips_per_work=self.r.render_clips_per_work,
                          seed=self.r.seed, soundfont=self.soundfont, workers=2)
            return
        from fluxmusic.data.synth import make_corpus

        make_corpus(manifest.parent, self.hours, seed=self.r.seed, workers=2, progress=True)

    def tokenizers(self, manifest: Path) -> None:
        from fluxmusic.data.manifest import load_manifest
        from fluxmusic.training.caption_tokenizer import build_caption_tokenizer, max_tokens

        captions = [e.caption for e in load_manifest(manifest) if e.attributes.get("split", "train") == "train"]
        t5 = build_caption_tokenizer(captions, self.parts / ".tok_t5", "t5", 512)
        clap = build_caption_tokenizer(captions, self.parts / ".tok_clap", "clap", 512)
        # Room for longer prompts than the corpus's, rounded to a multiple of 8.
        lengths = {"t5_max_length": _round_up(max_tokens(t5, captions) + 8),
                   "clap_max_length": min(_round_up(max_tokens(clap, captions) + 8), self.r.text.max_positions - 4)}
        atomic_write_text(self.parts / "text_lengths.json", json.dumps(lengths) + "\n")
        (self.parts / ".tok_t5").rename(self.parts / "tokenizer")
        (self.parts / ".tok_clap").rename(self.parts / "clap_tokenizer")

    def text_lengths(self) -> dict[str, int]:
        return json.loads((self.parts / "text_lengths.json").read_text())

    def train_vae(self, manifest: Path) -> None:
        from fluxmusic.training.audio_data import MelCropDataset
        from fluxmusic.training.vae_task import VAETask

        train_bank, val_bank = self.bank(manifest, "train"), self.bank(manifest, "val")
        task = VAETask(MelCropDataset(train_bank, self.r.vae_crop_frames, self.r.seed),
                       MelCropDataset(val_bank, self.r.vae_crop_frames, self.r.seed + 1), self.r.vae,
                       scale_items=_WholeMels(train_bank))
        self._train(task, self.r.vae_stage, "vae", self.parts / "vae")

    def train_vocoder(self, manifest: Path) -> None:
        """The first vocoder stage, then each of ``vocoder_phases`` from the previous one's EMA weights; the last
        exports ``parts/vocoder``, earlier ones ``parts/<run name>`` (a finished phase is not run again)."""
        train_bank, val_bank = self.bank(manifest, "train"), self.bank(manifest, "val")
        phases = self.r.vocoder_phases
        names = ["vocoder", *(p.name for p in phases)]
        exports = [self.parts / name for name in names[:-1]] + [self.parts / "vocoder"]
        if phases:
            exports[0] = self.parts / "vocoder_base"
        if not exports[0].exists():
            self._train(vocoder_task(self.r, train_bank, val_bank, self.r.seed), self.r.vocoder_stage, "vocoder",
                        exports[0])
        for i, ph in enumerate(phases, start=1):
            if exports[i].exists():
                continue
            task = vocoder_task(self.r, train_bank, val_bank, self.r.seed, ph,
                                init_checkpoint=self.out / "runs" / names[i - 1] / "checkpoint.pt")
            self._train(task, ph.stage, ph.name, exports[i])

    def train_text(self, manifest: Path) -> None:
        from fluxmusic.components import load_tokenizer
        from fluxmusic.training.audio_data import CaptionMelDataset
        from fluxmusic.training.text_task import TextEncodersTask

        train_bank, val_bank = self.bank(manifest, "train"), self.bank(manifest, "val")
        lengths = self.text_lengths()
        task = TextEncodersTask(
            CaptionMelDataset(train_bank), load_tokenizer(self.parts / "tokenizer", "T5 tokenizer"),
            load_tokenizer(self.parts / "clap_tokenizer", "CLAP tokenizer"), lengths["t5_max_length"],
            lengths["clap_max_length"], val=CaptionMelDataset(val_bank), config=self.r.text,
            frames=train_bank.mels.shape[1], n_mels=train_bank.mels.shape[2],
        )
        tmp = self.parts / ".text"
        self._train(task, self.r.text_stage, "text", tmp)
        (tmp / "clap").rename(self.parts / "clap")
        (tmp / "text_encoder").rename(self.parts / "text_encoder")
        shutil.rmtree(tmp, ignore_errors=True)

    def precompute(self, manifest: Path) -> None:
        from fluxmusic.training.precompute import precompute_cache

        encoder = PartsEncoder(self.parts, **self.text_lengths())
        items = []
        for split in ("train", "val"):
            bank = self.bank(manifest, split)
            items += [{"audio": bank.waves[i], "caption": bank.captions[i], "split": split,
                       **{k: v for k, v in bank.attributes[i].items() if k != "split"}} for i in range(len(bank))]
        precompute_cache(encoder, items, self.out / "cache", batch_size=16,
                         metadata={"scaling_factor": encoder.scaling_factor})

    def train_transformer(self) -> None:
        from fluxmusic.training.transformer_task import TransformerTask, cache_splits

        train, val = cache_splits(self.out / "cache")
        task = TransformerTask(self.r.transformer, train, train.null_txt, train.null_y, val=val)
        self._train(task, self.r.transformer_stage, "transformer", self.parts / "transformer")

    def train_transformer_masked(self) -> None:
        from fluxmusic.training.transformer_task import MaskedFinetuneTask, cache_splits

        assert self.r.masked_stage is not None
        train, val = cache_splits(self.out / "cache")
        task = MaskedFinetuneTask(self.parts / "transformer", train, train.null_txt, train.null_y, val=val,
                                  context_lr=self.r.masked_context_lr)
        self._train(task, self.r.masked_stage, "transformer_masked", self.parts / "transformer_masked")

    def train_transformer_beat(self, manifest: Path, register: bool = False) -> None:
        """The beat stage (from the masked transformer), or with ``register`` the register stage (from the beat
        transformer, both controls trained)."""
        from fluxmusic.training.beat_phases import add_beat_phases
        from fluxmusic.training.transformer_task import MaskedFinetuneTask, cache_splits

        stage, base, name = ((self.r.register_stage, "transformer_beat", "transformer_register") if register else
                             (self.r.beat_stage, "transformer_masked", "transformer_beat"))
        assert stage is not None
        # The register hint trains on each clip's measured melody pitch (docs/quality.md, "Register").
        melody = self.r.corpus if register else None
        if not _has_beat_phases(self.out / "cache") or (register and not has_melody_pitches(self.out / "cache")):
            phased = add_beat_phases(self.out / "cache", manifest, melody=melody)
            self.say(f"{name}: beat phases{' and melody pitches' if melody else ''} of the cache's clips: {phased}")
        train, val = cache_splits(self.out / "cache")
        train, val = train.with_beats(), val.with_beats() if val is not None else None
        task = MaskedFinetuneTask(self.parts / base, train, train.null_txt, train.null_y, val=val,
                                  context_lr=self.r.control_context_lr(register), beat=True, register=register)
        self._train(task, stage, name, self.parts / name)

    @property
    def final_transformer(self) -> Path:
        """The transformer the model directory gets: the last transformer stage of the recipe."""
        last = ("transformer_register" if self.r.register_stage is not None else
                "transformer_beat" if self.r.beat_stage is not None else
                "transformer_masked" if self.r.masked_stage is not None else "transformer")
        return self.parts / last

    def assemble(self, model: Path) -> None:
        from fluxmusic.modeldir import assemble

        parts = {k: self.parts / k for k in
                 ("transformer", "text_encoder", "tokenizer", "clap", "clap_tokenizer", "vae", "vocoder")}
        parts["transformer"] = self.final_transformer
        assemble(model, **parts, defaults=dict(self.r.defaults), name=self.r.name, **self.text_lengths())
        if self.r.vocoder_mel_match:
            set_vocoder_mel_match(model / "vocoder", self.r.vocoder_mel_match, self.r.vocoder_mel_match_momentum)
        if self.r.half_storage:
            store_half(model, self.r.half_storage)
        if self.r.bf16_storage:
            store_half(model, self.r.bf16_storage, torch.bfloat16)


def set_vocoder_mel_match(vocoder_dir: Path, iterations: int, momentum: float = 0.0) -> None:
    """Turn on the mel-match projection of a Vocos vocoder directory (its config only; written atomically)."""
    path = Path(vocoder_dir) / "config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "fluxmusic_vocos":
        raise FluxMusicError(f"{vocoder_dir}: the mel-match projection is a Vocos vocoder option, not "
                             f"{cfg.get('model_type')!r}'s")
    cfg["mel_match_iterations"] = int(iterations)
    cfg["mel_match_momentum"] = float(momentum)
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def vocoder_task(recipe: Recipe, train_bank, val_bank, seed: int, phase: VocoderPhase | None = None,
                 init_checkpoint: Path | None = None):
    """A vocoder stage of the recipe as a task: the first stage (what ``train --recipe`` and ``train --task
    vocoder`` run), or one of ``vocoder_phases`` started from ``init_checkpoint`` (the previous phase's)."""
    from fluxmusic.training.audio_data import WaveMelCropDataset
    from fluxmusic.training.vocoder_task import COMB_RESOLUTIONS, STFT_RESOLUTIONS, VocoderTask

    if phase is None:
        config, f = recipe.vocoder, recipe.vocoder_crop_frames
        weight, comb = recipe.vocoder_stft_weight, recipe.vocoder_comb_losses
    else:
        config = dataclasses.replace(recipe.vocoder, vocos_phase_advance=phase.phase_advance,
                                     vocos_phase_integrate=phase.phase_integrate,
                                     vocos_phase_dither_db=phase.phase_dither_db)
        f, weight, comb = phase.crop_frames, phase.stft_weight, phase.comb_losses
    return VocoderTask(WaveMelCropDataset(train_bank, f, seed),
                       WaveMelCropDataset(val_bank, f, 1) if val_bank is not None else None,
                       config, train_bank.mel_config, stft_weight=weight,
                       stft_resolutions=COMB_RESOLUTIONS if comb else STFT_RESOLUTIONS, init_checkpoint=init_checkpoint)


def _transformer_stage(transformer_dir: Path) -> str:
    """Which recipe stage made a transformer directory, by its config: transformer, transformer_masked (context
    input), transformer_beat (beat grid too) or transformer_register (and the register hint)."""
    try:
        cfg = json.loads((transformer_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "transformer"
    if not isinstance(cfg, dict):
        return "transformer"
    return ("transformer_register" if cfg.get("register_channels") else
            "transformer_beat" if cfg.get("beat_channels") else
            "transformer_masked" if cfg.get("context_channels") else "transformer")


def _cache_items(cache: Path) -> list[dict]:
    """The entries of a cache's items.jsonl ([] when it is missing or unreadable)."""
    try:
        return [json.loads(line) for line in (cache / "items.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []


def _has_beat_phases(cache: Path) -> bool:
    try:
        meta = json.loads((cache / "cache.json").read_text()).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return False
    return "seconds_per_latent_frame" in meta and any("beat_t0" in it for it in _cache_items(cache))


def has_melody_pitches(cache: Path) -> bool:
    """Whether every item of an embedding cache has its measured melody pitch (``beat_phases --melody``), which
    the register stage trains on."""
    items = _cache_items(cache)
    return bool(items) and all("melody_midi" in it for it in items)


def _live_pid(path: Path) -> int | None:
    import os

    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


class _PidWaiter:
    """Waits for a process this run did not start (no ``join`` without being its parent)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.exitcode, self.started_at = pid, 0, time.perf_counter()

    def join(self) -> None:
        import os

        while True:
            try:
                os.kill(self.pid, 0)
            except OSError:
                return
            time.sleep(5)


def _vocoder_worker(recipe: Recipe, out: str, scale: float, hours: float, threads: int, device: str) -> None:
    import os

    torch.set_num_threads(threads)
    run = RecipeRun(recipe, out, hours=hours, device=device)
    run.scale = scale
    (run.out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.out / "runs" / "vocoder.pid", f"{os.getpid()}\n")
    with open(run.out / "runs" / "vocoder.log", "a", encoding="utf-8") as log:
        run.stream = log
        run._bank = {}
        run._stage("vocoder", run.parts / "vocoder", lambda: run.train_vocoder(run.out / "corpus" / "manifest.jsonl"))


class _WholeMels:
    """Whole-clip mels as ``{"mel"}`` items: the VAE's latent std is measured on what it will encode."""

    def __init__(self, bank) -> None:
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, i: int) -> dict:
        return {"mel": self.bank.mels[i]}


class PartsEncoder:
    """``encode_audio`` / ``encode_text`` from trained parts (the interface ``precompute_cache`` expects)."""

    def __init__(self, parts: Path, t5_max_length: int, clap_max_length: int) -> None:
        from fluxmusic.components import load_clap_text, load_t5, load_tokenizer, load_vae
        from fluxmusic.text import TextEncoders, torch_clap_fn, torch_t5_fn

        self.vae = load_vae(parts / "vae").eval()
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.text = TextEncoders(
            load_tokenizer(parts / "tokenizer", "T5 tokenizer"), load_tokenizer(parts / "clap_tokenizer", "CLAP"),
            torch_t5_fn(load_t5(parts / "text_encoder").eval()), torch_clap_fn(load_clap_text(parts / "clap").eval()),
            t5_max_length, clap_max_length,
        )

    @torch.no_grad()
    def encode_audio(self, wave: torch.Tensor) -> torch.Tensor:
        from fluxmusic.audio import log_mel

        return self.vae.encode(log_mel(wave)[:, None]).latent_dist.mode() * self.scaling_factor

    def encode_text(self, captions: list[str]):
        return self.text.encode(captions)


def store_half(model_dir: Path, components: tuple[str, ...], dtype: torch.dtype = torch.float16) -> None:
    """Rewrite the fp32 tensors of ``components``' safetensors files as ``dtype``, fp16 or bf16 (atomically, file
    by file).

    Every loader upcasts on load (``load_state_dict`` copies into fp32 parameters; diffusers and transformers
    cast to the requested dtype), so this halves the bundle and changes weights by that dtype's rounding only.
    """
    from safetensors import safe_open

    from fluxmusic import integrity
    from fluxmusic.checkpoint import atomic_save_safetensors

    for name in components:
        for path in sorted((Path(model_dir) / name).glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
            state = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in state.items()}
            meta = dict(meta or {})
            if integrity.METADATA_KEY in meta:  # the checksums describe the stored (now half) tensors
                meta.update(integrity.safetensors_metadata(state))
            atomic_save_safetensors(state, path, metadata=meta)


def install_default(model: Path, target: Path) -> Path:
    """Replace ``target`` (the package's bundled default) with a copy of ``model``, atomically."""
    return atomic_save_dir(lambda tmp: shutil.copytree(model, tmp, dirs_exist_ok=True), target)


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's options on ``fluxmusic train`` (used with ``--recipe``; ``--out`` is shared)."""
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="train every component of a model directory from scratch (default: the bundled model)")
    p.add_argument("--hours", type=float, default=None, help="recipe: hours of synthetic corpus")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="recipe: scale every stage's steps to about this wall time on this machine")
    p.add_argument("--threads", type=int, default=1,
                   help="recipe: torch CPU threads (1: on a shared machine more threads spin-wait and run slower)")
    p.add_argument("--soundfont", default=None,
                   help="recipe: General MIDI SoundFont for the rendered corpus (default: the system's FluidR3_GM)")
    p.add_argument("--install-default", action="store_true",
                   help="recipe: copy the result to fluxmusic/default_model (the bundled default)")


def run_recipe_command(args: argparse.Namespace) -> int:
    recipe = RECIPES[args.recipe]
    if args.threads < 1:
        raise FluxMusicError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.seed:
        recipe = dataclasses.replace(recipe, seed=args.seed)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    model = RecipeRun(recipe, args.out, args.budget_minutes, args.hours, device=device,
                      soundfont=args.soundfont).run()
    if args.install_default:
        from fluxmusic.pipeline import default_model_dir

        print(f"installed {install_default(model, default_model_dir())}")
    print(f"wrote {model}")
    return 0
