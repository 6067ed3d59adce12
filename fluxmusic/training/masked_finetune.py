"""Fine-tune a plain transformer into one with trained masked conditioning (MusicFlow-style continuation and
infilling), without retraining from scratch.

The transformer is extended with a zero-initialised context input (:func:`fluxmusic.model.add_context_input`), so
step 0 computes exactly what the plain model computes; it is then trained on a recipe's cached latents with the
masked flow loss (:func:`fluxmusic.training.transformer_task.masked_flow_loss`) over the mask mix of
:data:`~fluxmusic.training.transformer_task.MASK_MIX` (full generation, prefix, middle), CFG dropout as in the
recipe. The result is written as a new transformer directory (temp, then renamed)::

    python -m fluxmusic.training.masked_finetune --transformer fluxmusic/default_model/transformer \\
        --cache /work/run/cache --out /tmp/masked/transformer --steps 300 --minutes 40
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer, add_context_input
from fluxmusic.training.cache import CachedEmbeddingDataset
from fluxmusic.training.transformer_task import TransformerTask


def _batch(ds: CachedEmbeddingDataset, idx: list[int]) -> dict[str, torch.Tensor]:
    items = [ds[i] for i in idx]
    return {k: torch.stack([it[k] for it in items]) for k in ("latent", "txt", "y")}


def split_indices(ds: CachedEmbeddingDataset, split: str) -> list[int]:
    """Items of the cache whose ``split`` metadata is ``split`` (all items when none carries a split)."""
    meta = ds.items_meta()
    if not any("split" in m for m in meta):
        return list(range(len(ds)))
    return [i for i, m in enumerate(meta) if m.get("split") == split]


@torch.no_grad()
def masked_val_loss(task: TransformerTask, model: FluxMusicTransformer, ds: CachedEmbeddingDataset,
                    idx: list[int], seed: int = 7, batch_size: int = 16) -> float:
    """The masked flow loss on fixed items with fixed noise, times, masks and CFG drops (comparable across steps)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    losses = []
    for i in range(0, len(idx), batch_size):
        loss, _ = task.loss(model, _batch(ds, idx[i : i + batch_size]), g)
        losses.append(float(loss))
    model.train()
    return sum(losses) / max(1, len(losses))


def finetune_masked(transformer_dir: str | Path, cache_dir: str | Path, out_dir: str | Path, *, steps: int = 300,
                    batch_size: int = 16, lr: float = 1e-4, context_lr: float = 1e-3, seed: int = 0,
                    minutes: float | None = None, val_items: int = 64, log=print) -> dict:
    """Extend ``transformer_dir`` with the context input, train it ``steps`` steps (or until ``minutes``) on the
    cache's train split, and write the result to ``out_dir`` (which must not exist). Returns the run's summary."""
    from fluxmusic.transformer_io import load_transformer, save_transformer

    out = Path(out_dir)
    if out.exists():
        raise FluxMusicError(f"--out {out} exists; give a new directory (nothing is overwritten)")
    if steps < 1 or batch_size < 1:
        raise FluxMusicError(f"steps {steps} and batch size {batch_size} must be >= 1")
    torch.manual_seed(seed)
    base = load_transformer(transformer_dir)
    model = add_context_input(base).train()
    ds = CachedEmbeddingDataset(cache_dir)
    train_idx, val_idx = split_indices(ds, "train"), split_indices(ds, "val")[:val_items]
    if not train_idx:
        raise FluxMusicError(f"cache {cache_dir} has no train items")
    task = TransformerTask(model.config, ds.subset(train_idx), ds.null_txt, ds.null_y)
    val_ds = ds.subset(val_idx) if val_idx else None
    new = [p for n, p in model.named_parameters() if n.startswith("context_in.")]
    old = [p for n, p in model.named_parameters() if not n.startswith("context_in.")]
    opt = torch.optim.AdamW([{"params": old, "lr": lr}, {"params": new, "lr": context_lr}], weight_decay=0.0)
    base_lrs = [lr, context_lr]
    warm = max(1, steps // 20)
    g = torch.Generator().manual_seed(seed)
    history: dict = {"val_loss": []}
    if val_ds is not None:
        v0 = masked_val_loss(task, model, val_ds, list(range(len(val_ds))))
        history["val_loss"].append((0, v0))
        log(f"step 0: masked val loss {v0:.4f}")
    t0 = time.perf_counter()
    done = 0
    for step in range(1, steps + 1):
        # cosine over the run's progress: steps, or the time limit when that comes first (it then still anneals)
        progress = step / steps
        if minutes is not None:
            progress = max(progress, (time.perf_counter() - t0) / (60 * minutes))
        scale = min(1.0, step / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for grp, b in zip(opt.param_groups, base_lrs):
            grp["lr"] = b * scale
        idx = torch.randint(0, len(train_idx), (batch_size,), generator=g).tolist()
        loss, stats = task.loss(model, _batch(task.train, idx), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step
        if step % 10 == 0 or step == steps:
            log(f"step {step}: loss {float(loss.detach()):.4f} known {stats.get('known', 0):.2f} "
                f"({time.perf_counter() - t0:.0f} s)")
        if minutes is not None and time.perf_counter() - t0 > 60 * minutes:
            log(f"time limit {minutes:g} min reached at step {step}")
            break
    model.eval()
    if val_ds is not None:
        v1 = masked_val_loss(task, model, val_ds, list(range(len(val_ds))))
        history["val_loss"].append((done, v1))
        log(f"step {done}: masked val loss {v1:.4f}")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_transformer(model, tmp)
    summary = {"from": str(transformer_dir), "cache": str(cache_dir), "steps": done, "batch_size": batch_size,
               "lr": lr, "context_lr": context_lr, "seed": seed, "train_items": len(train_idx),
               "val_items": len(val_idx), "train_seconds": time.perf_counter() - t0, **history}
    (tmp / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    tmp.rename(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transformer", required=True, help="the plain transformer directory to start from")
    ap.add_argument("--cache", required=True, help="the recipe's embedding cache (latents, T5, CLAP)")
    ap.add_argument("--out", required=True, help="a new transformer directory")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--context-lr", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, help="stop after this many minutes of training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = finetune_masked(args.transformer, args.cache, args.out, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, context_lr=args.context_lr, seed=args.seed, minutes=args.minutes)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
