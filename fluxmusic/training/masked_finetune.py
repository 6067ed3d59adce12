"""Fine-tune a plain transformer into one with trained masked conditioning (MusicFlow-style continuation and
infilling), outside a recipe run: the recipe's ``transformer_masked`` stage (the same
:class:`~fluxmusic.training.transformer_task.MaskedFinetuneTask` on the shared training loop) for any transformer
directory and embedding cache.

The result is written as a new transformer directory (temp, then renamed) holding ``finetune.json`` (the run's
summary); checkpoints and ``log.jsonl`` go to ``--run-dir`` (default ``OUT.run``), and the same command continues
an interrupted run from its last checkpoint, bit-exactly::

    python -m fluxmusic.training.masked_finetune --transformer fluxmusic/default_model/transformer \\
        --cache /work/run/cache --out /tmp/masked/transformer --steps 3000 --batch-size 8 --minutes 65
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from fluxmusic.errors import FluxMusicError

#: The CLI's defaults are the default recipe's stage (fluxmusic.training.recipe): one definition.
_VAL_ITEMS = 64


def _default_stage():
    from fluxmusic.training.recipe import RECIPES

    r = RECIPES["default"]
    assert r.masked_stage is not None
    return r.masked_stage, r.masked_context_lr


def finetune_masked(transformer_dir: str | Path, cache_dir: str | Path, out_dir: str | Path, *,
                    steps: int | None = None, batch_size: int | None = None, lr: float | None = None,
                    context_lr: float | None = None, seed: int = 0, minutes: float | None = None,
                    val_items: int = _VAL_ITEMS, device: str = "cpu", run_dir: str | Path | None = None,
                    stream: TextIO | None = None, beat: bool = False, register: bool = False) -> dict:
    """Extend ``transformer_dir`` with the context input and train it ``steps`` steps (or until ``minutes`` have
    passed: it then stops there, with the lr schedule of ``steps``) on the cache's train items, validating on its
    first ``val_items`` val items; write the EMA weights to ``out_dir`` (which must not exist). Unset options take
    the default recipe's ``masked_stage``; warmup is 5 % of ``steps``. Returns the run's summary."""
    from fluxmusic.training.loop import LOG_NAME, train
    from fluxmusic.training.transformer_task import MaskedFinetuneTask, cache_splits

    out = Path(out_dir)
    if out.exists():
        raise FluxMusicError(f"--out {out} exists; give a new directory (nothing is overwritten)")
    stage, default_context_lr = _default_stage()
    steps = stage.steps if steps is None else steps
    if steps < 2 or (batch_size is not None and batch_size < 1) or val_items < 0:
        raise FluxMusicError(f"--steps {steps} must be >= 2, --batch-size {batch_size} >= 1, val items "
                             f"{val_items} >= 0")
    stage = dataclasses.replace(stage, steps=steps, warmup_steps=max(1, steps // 20),
                                batch_size=stage.batch_size if batch_size is None else batch_size,
                                lr=stage.lr if lr is None else lr)
    train_ds, val_ds = cache_splits(cache_dir, val_items)
    if beat or register:
        train_ds, val_ds = train_ds.with_beats(), val_ds.with_beats() if val_ds is not None else None
    task = MaskedFinetuneTask(transformer_dir, train_ds, train_ds.null_txt, train_ds.null_y, val=val_ds,
                              context_lr=default_context_lr if context_lr is None else context_lr, beat=beat,
                              register=register)
    cfg = stage.train_config(1.0, seed, 10, device)
    run = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # a previous call killed while exporting
    t0 = time.perf_counter()
    result = train(task, cfg, run, resume=True, export_dir=tmp, stream=stream or sys.stderr,
                   time_limit_s=None if minutes is None else 60.0 * minutes)
    val = [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]
    val = [v for v in val if v["event"] == "val"]
    summary = {
        "from": str(transformer_dir), "cache": str(cache_dir), "run_dir": str(run), "steps": result.step,
        "planned_steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "context_lr": task.context_lr,
        "warmup_steps": cfg.warmup_steps, "ema_decay": cfg.ema_decay, "seed": seed, "device": device, "beat": beat,
        "register": register,
        "train_items": len(train_ds), "val_items": len(val_ds) if val_ds is not None else 0,
        "train_seconds": time.perf_counter() - t0,
        # masked flow loss on the val items with fixed noise, times, masks and CFG drops: comparable across steps
        "val_loss": [(v["step"], v["val_loss"], v["val_loss_ema"]) for v in val],
    }
    (tmp / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    tmp.rename(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    stage, context_lr = _default_stage()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transformer", required=True, help="the plain transformer directory to start from")
    ap.add_argument("--cache", required=True, help="the recipe's embedding cache (latents, T5, CLAP)")
    ap.add_argument("--out", required=True, help="a new transformer directory")
    ap.add_argument("--run-dir", help="checkpoints and log.jsonl (default: OUT.run); an existing one is resumed")
    ap.add_argument("--steps", type=int, default=stage.steps)
    ap.add_argument("--batch-size", type=int, default=stage.batch_size)
    ap.add_argument("--lr", type=float, default=stage.lr, help="peak lr of the pretrained weights")
    ap.add_argument("--context-lr", type=float, default=context_lr, help="peak lr of the new context input")
    ap.add_argument("--minutes", type=float, help="stop after this many minutes of training (then exported as is)")
    ap.add_argument("--val-items", type=int, default=_VAL_ITEMS, help="validation items of the cache's val split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beat", action="store_true",
                    help="also train beat-grid conditioning (fluxmusic.beat; the cache needs its beat phases)")
    ap.add_argument("--register", action="store_true",
                    help="also train the register hint (fluxmusic.register; from the items' register words)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    args = ap.parse_args(argv)
    try:
        if args.threads < 1:
            raise FluxMusicError(f"--threads must be >= 1, got {args.threads}")
        if args.minutes is not None and not args.minutes > 0:
            raise FluxMusicError(f"--minutes must be > 0, got {args.minutes}")
        torch.set_num_threads(args.threads)
        summary = finetune_masked(args.transformer, args.cache, args.out, steps=args.steps,
                                  batch_size=args.batch_size, lr=args.lr, context_lr=args.context_lr, seed=args.seed,
                                  minutes=args.minutes, val_items=args.val_items, device=args.device,
                                  run_dir=args.run_dir, beat=args.beat, register=args.register)
    except FluxMusicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
