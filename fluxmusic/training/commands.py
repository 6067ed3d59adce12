"""``fluxmusic train``: one command for every trainable component, chosen with ``--task``."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from fluxmusic.errors import FluxMusicError
from fluxmusic.training.config import SCHEDULES, TrainConfig

#: ``--task`` name -> "module:function" building a TrainTask from the parsed arguments (imported lazily,
#: so a task's heavy imports cost nothing to the others). Add ``vae``, ``vocoder``, ``t5``, ``clap`` here.
TASK_BUILDERS: dict[str, str] = {
    "transformer": "fluxmusic.training.commands:build_transformer_task",
    "vae": "fluxmusic.training.component_commands:build_vae_task",
    "vocoder": "fluxmusic.training.component_commands:build_vocoder_task",
    "text": "fluxmusic.training.component_commands:build_text_task",
    "adapter": "fluxmusic.training.adapter_task:build_adapter_task",
}

_DEFAULTS = TrainConfig()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model component (single process, or DDP under torchrun)",
        description="Train with AdamW, EMA, atomic checkpoints and exact --resume. Under `torchrun "
        "--nproc_per_node N` the same command runs DistributedDataParallel (gloo on CPU, nccl on CUDA).",
    )
    p.add_argument("--task", default="transformer", choices=sorted(TASK_BUILDERS), help="what to train")
    p.add_argument("--data", default=None, help="training data (transformer: an embedding cache directory)")
    p.add_argument("--out", required=True, help="run directory: checkpoint.pt, log.jsonl, samples/, export/")
    p.add_argument("--config", default="tiny", help="named transformer config or a config.json path")
    p.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="items per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=_DEFAULTS.grad_accum, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    p.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps)
    p.add_argument("--schedule", choices=SCHEDULES, default=_DEFAULTS.schedule, help="lr after warmup")
    p.add_argument("--grad-clip", type=float, default=_DEFAULTS.grad_clip, help="max grad norm (<= 0: off)")
    p.add_argument("--ema-decay", type=float, default=_DEFAULTS.ema_decay)
    p.add_argument("--ema-every", type=int, default=_DEFAULTS.ema_every, help="optimizer steps between EMA updates")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU and CUDA)")
    p.add_argument("--log-every", type=int, default=_DEFAULTS.log_every)
    p.add_argument("--val-every", type=int, default=_DEFAULTS.val_every, help="0: only at the end")
    p.add_argument("--val-items", type=int, default=-1,
                   help="items held out for validation (default: 5%%, at most 64; 0: none)")
    p.add_argument("--sample-every", type=int, default=_DEFAULTS.sample_every, help="0: never")
    p.add_argument("--sample-model", default=None,
                   help="model directory whose VAE + vocoder decode samples to WAV (else latents only)")
    p.add_argument("--ckpt-every", type=int, default=_DEFAULTS.ckpt_every, help="0: only at the end")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue OUT/checkpoint.pt (if it exists), or the given checkpoint file")
    p.add_argument("--export", default=None, metavar="DIR", help="where to write the EMA model (default OUT/export)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--p-uncond", type=float, default=0.1, help="CFG dropout per text encoder")
    p.add_argument("--model", default=None,
                   help="adapter task: model directory whose text encoders and CLAP give the targets (default: "
                   "the bundled model)")
    from fluxmusic.training.recipe import add_arguments

    add_arguments(p)
    p.set_defaults(func=_train)


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, warmup_steps=args.warmup_steps,
        schedule=args.schedule, bf16=args.bf16, ema_decay=args.ema_decay, ema_every=args.ema_every,
        log_every=args.log_every, val_every=args.val_every, ckpt_every=args.ckpt_every,
        sample_every=args.sample_every, seed=args.seed, device=args.device,
    )


def _train(args: argparse.Namespace) -> int:
    from fluxmusic.training.loop import train

    if args.recipe:
        from fluxmusic.training.recipe import run_recipe_command

        return run_recipe_command(args)
    if args.data is None:
        raise FluxMusicError("--data is required (or --recipe to train a whole model directory)")
    cfg = train_config(args)  # validate the options before any heavy work
    module, func = TASK_BUILDERS[args.task].split(":")
    task = getattr(importlib.import_module(module), func)(args)
    result = train(task, cfg, args.out, resume=args.resume, export_dir=args.export)
    if result.export is not None:
        print(f"wrote {result.export}")
    return 0


def build_transformer_task(args: argparse.Namespace):
    """The transformer task from an embedding cache directory (see ``fluxmusic.training.cache``)."""
    from fluxmusic.config import CONFIGS, FluxMusicConfig, get_config
    from fluxmusic.training.cache import CachedEmbeddingDataset, split
    from fluxmusic.training.transformer_task import TransformerTask

    config = get_config(args.config) if args.config in CONFIGS or not Path(args.config).exists() else (
        FluxMusicConfig.load(args.config)
    )
    data = CachedEmbeddingDataset(args.data)
    val_items = args.val_items if args.val_items >= 0 else (min(64, len(data) // 20) if len(data) >= 20 else 0)
    train_ds, val_ds = split(data, val_items, seed=args.seed)
    decoder, sample_rate = None, 16000
    if args.sample_model:
        from fluxmusic.pipeline import FluxMusicPipeline

        pipe = FluxMusicPipeline.from_pretrained(args.sample_model)
        decoder, sample_rate = pipe.decode, pipe.sample_rate
    return TransformerTask(
        config, train_ds, data.null_txt, data.null_y, val=val_ds, p_uncond=args.p_uncond, decoder=decoder,
        sample_rate=sample_rate,
    )
