"""Retrain the bundled default's transformer on a lent GPU, in one short device call.

Why: on this 2-core CPU the transformer saw ~64 k samples and never learned to keep a beat (docs/quality.md,
"why tempo is not followed"), while the same architecture overfit on 32 clips plays their beats: it is short of
training, not of capacity. A GPU gives orders of magnitude more steps in minutes. Three steps:

    # here: the recipe's embedding cache with its beat phases and melody pitches (python -m
    # fluxmusic.training.beat_phases --cache RUN/cache --manifest RUN/corpus/manifest.jsonl --melody), int8-packed
    # (~44 MB; the device call carries at most 64 MiB in all)
    python benchmarks/gpu_transformer.py pack --cache RUN/cache --out .gpu_data/transformer_cache.npz
    # on the device (benchmarks/gpu_session.sh): the recipe's transformer stages, each for a wall-clock
    # budget, constant lr after warmup with EMA; the result comes back fp16 in two shards (< 16 MiB per file)
    python benchmarks/gpu_transformer.py train --pack .gpu_data/transformer_cache.npz --out $OUT/tr \\
        --plain-minutes 3 --masked-minutes 1 --beat-minutes 1 --register-minutes 1 --device cuda
    # here: a model directory = the bundled default with that transformer, for `fluxmusic eval`
    python benchmarks/gpu_transformer.py assemble --shards DIR --out MODEL_DIR

The latents and T5 tokens are int8 with one fp16 scale per channel (latent) or per token (T5): relative RMS
error 0.7 %, far below the flow loss's noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import bootstrap_imports  # noqa: E402 (the device has a plain checkout, no pip install)

bootstrap_imports()
from fluxmusic.errors import FluxMusicError  # noqa: E402

BUNDLED_TRANSFORMER = Path(__file__).resolve().parents[1] / "fluxmusic" / "default_model" / "transformer"


def _quantise(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    scale = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(x / scale).to(torch.int8).numpy(), scale.half().numpy()


def pack(cache_dir: Path, out: Path, config: Path) -> dict:
    """An embedding cache -> one compressed npz (int8 latents and T5 tokens, fp16 CLAP vectors)."""
    from fluxmusic.training.cache import CachedEmbeddingDataset

    data = CachedEmbeddingDataset(cache_dir)
    items = [data[i] for i in range(len(data))]  # each read once
    lat, txt, y = (torch.stack([item[k] for item in items]) for k in ("latent", "txt", "y"))
    lq, ls = _quantise(lat, (2, 3))
    tq, ts = _quantise(txt, (2,))
    index = json.loads((cache_dir / "cache.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, latent_q=lq, latent_scale=ls, txt_q=tq, txt_scale=ts, y=y.half().numpy(),
                        null_txt=data.null_txt.numpy(), null_y=data.null_y.numpy(),
                        items=np.array(json.dumps(data.items_meta())), metadata=np.array(json.dumps(index["metadata"])),
                        config=np.array(config.read_text()))
    err = float((torch.from_numpy(lq).float() * torch.from_numpy(ls).float() - lat).pow(2).mean().sqrt() / lat.std())
    return {"items": len(data), "bytes": out.stat().st_size, "latent_relative_rms_error": err}


def unpack(pack_path: Path, cache_dir: Path) -> tuple[Path, dict]:
    """The npz back into an embedding cache directory (float32); returns it and the transformer config dict."""
    from fluxmusic.training.cache import write_cache

    z = np.load(pack_path)
    lat = torch.from_numpy(z["latent_q"]).float() * torch.from_numpy(z["latent_scale"]).float()
    txt = torch.from_numpy(z["txt_q"]).float() * torch.from_numpy(z["txt_scale"]).float()
    y = torch.from_numpy(z["y"]).float()
    meta = json.loads(str(z["items"]))
    items = ({"latent": lat[i], "txt": txt[i], "y": y[i], **meta[i]} for i in range(len(meta)))
    write_cache(cache_dir, items, null_txt=torch.from_numpy(z["null_txt"]), null_y=torch.from_numpy(z["null_y"]),
                metadata=json.loads(str(z["metadata"])))
    return cache_dir, json.loads(str(z["config"]))


def _stage(stage, batch_size: int, lr_scale: float, steps: int):
    # Constant lr after a short warmup: a wall-clock budget stops the run at an unknown step, so no schedule
    # should depend on where it ends; EMA gives the averaged weights.
    return dataclasses.replace(stage, steps=steps, batch_size=batch_size, lr=stage.lr * lr_scale,
                               warmup_steps=min(200, steps // 10), schedule="constant", ema_decay=0.999)


def train_on_device(pack_path: Path, out: Path, plain_minutes: float, masked_minutes: float, batch_size: int,
                    device: str, work: Path, beat_minutes: float = 1.5, register_minutes: float = 1.0) -> dict:
    """The transformer stages of the default recipe (plain, masked, beat grid, register hint) within the
    budgets; the last stage's EMA weights go to ``out`` as fp16 safetensors in two shards, with its config and a
    summary. (The bundle stores its transformer in bf16; ``assemble`` writes fp32, and the recipe's
    ``store_half`` makes it bf16.)"""
    from safetensors.torch import save_file

    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.training.loop import LOG_NAME, train
    from fluxmusic.training.recipe import RECIPES, has_melody_pitches
    from fluxmusic.training.transformer_task import MaskedFinetuneTask, TransformerTask, cache_splits
    from fluxmusic.transformer_io import load_transformer

    recipe = RECIPES["default"]
    assert recipe.masked_stage is not None
    shutil.rmtree(work, ignore_errors=True)
    cache, config = unpack(pack_path, work / "cache")
    for key in ("context_channels", "beat_channels", "register_channels"):  # the plain stage; later stages add these
        config.pop(key, None)
    plain_config = FluxMusicConfig.from_dict(config)
    train_ds, val_ds = cache_splits(cache, 64)
    lr_scale = batch_size / recipe.transformer_stage.batch_size  # linear scaling, capped below
    summary: dict = {"device": device, "batch_size": batch_size, "items": len(train_ds)}
    runs = []
    stages = [("plain", plain_minutes), ("masked", masked_minutes)]
    if beat_minutes > 0 and recipe.beat_stage is not None:
        stages.append(("beat", beat_minutes))
        if register_minutes > 0 and recipe.register_stage is not None:
            if not has_melody_pitches(cache):
                raise FluxMusicError("the pack has no melody pitches; run python -m fluxmusic.training.beat_phases "
                                     "--melody on the cache, pack again, or pass --register-minutes 0")
            stages.append(("register", register_minutes))
    for name, minutes in stages:
        if name == "plain":
            task = TransformerTask(plain_config, train_ds, train_ds.null_txt, train_ds.null_y, val=val_ds)
            stage = _stage(recipe.transformer_stage, batch_size, min(lr_scale, 2.0), 1_000_000)
        elif name == "masked":
            task = MaskedFinetuneTask(work / "plain" / "export", train_ds, train_ds.null_txt, train_ds.null_y,
                                      val=val_ds, context_lr=recipe.masked_context_lr)
            stage = _stage(recipe.masked_stage, batch_size, min(lr_scale, 2.0), 1_000_000)
        else:  # the beat grid needs the cache's beat phases (python -m fluxmusic.training.beat_phases before pack)
            register = name == "register"  # (the register hint trains on the clips' measured melody pitches)
            beat_train, beat_val = train_ds.with_beats(), val_ds.with_beats() if val_ds is not None else None
            base, recipe_stage = ("beat", recipe.register_stage) if register else ("masked", recipe.beat_stage)
            task = MaskedFinetuneTask(work / base / "export", beat_train, beat_train.null_txt, beat_train.null_y,
                                      val=beat_val, context_lr=recipe.control_context_lr(register), beat=True,
                                      register=register)
            assert recipe_stage is not None
            stage = _stage(recipe_stage, batch_size, min(lr_scale, 2.0), 1_000_000)
        cfg = dataclasses.replace(stage.train_config(1.0, 0, 100, device), ckpt_every=1_000_000)
        t0 = time.perf_counter()
        result = train(task, cfg, work / name, export_dir=work / name / "export", stream=sys.stderr,
                       time_limit_s=60.0 * minutes)
        log = [json.loads(line) for line in (work / name / LOG_NAME).read_text().splitlines()]
        runs.append({"stage": name, "steps": result.step, "seconds": time.perf_counter() - t0,
                     "lr": cfg.lr, "val": [(r["step"], r["val_loss"], r.get("val_loss_ema")) for r in log
                                           if r["event"] == "val"]})
        print(json.dumps(runs[-1]), flush=True)
    summary["stages"] = runs
    model = load_transformer(work / stages[-1][0] / "export")
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    out.mkdir(parents=True, exist_ok=True)
    for part, chunk in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        save_file({k: state[k] for k in chunk}, str(out / f"transformer-{part}.safetensors"))
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def assemble(shards: Path, out: Path, base_model: Path) -> Path:
    """A copy of ``base_model`` whose transformer is the one in ``shards`` (checked on load like any other)."""
    from safetensors.torch import load_file

    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.model import FluxMusicTransformer
    from fluxmusic.transformer_io import save_transformer

    if out.exists():
        raise FluxMusicError(f"--out {out} exists; give a new directory")
    state: dict = {}
    for f in sorted(shards.glob("transformer-*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise FluxMusicError(f"{shards} has no transformer-*.safetensors")
    model = FluxMusicTransformer(FluxMusicConfig.load(shards / "config.json"))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    shutil.copytree(base_model, out)
    shutil.rmtree(out / "transformer")
    save_transformer(model, out / "transformer")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", type=Path, default=BUNDLED_TRANSFORMER / "config.json")
    t = sub.add_parser("train")
    t.add_argument("--pack", required=True, type=Path)
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--plain-minutes", type=float, default=4.0)
    t.add_argument("--masked-minutes", type=float, default=2.0)
    t.add_argument("--beat-minutes", type=float, default=1.5, help="the beat-grid stage (0: none, and no register)")
    t.add_argument("--register-minutes", type=float, default=1.0, help="the register-hint stage (0: none)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--device", default="cuda")
    t.add_argument("--work", type=Path, default=Path("/tmp/gpu_transformer"))
    a = sub.add_parser("assemble")
    a.add_argument("--shards", required=True, type=Path)
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--base-model", type=Path, default=BUNDLED_TRANSFORMER.parent)
    args = ap.parse_args()
    try:
        if args.cmd == "pack":
            print(json.dumps(pack(args.cache, args.out, args.config), indent=2))
        elif args.cmd == "train":
            print(json.dumps(train_on_device(args.pack, args.out, args.plain_minutes, args.masked_minutes,
                                             args.batch_size, args.device, args.work, args.beat_minutes,
                                             args.register_minutes), indent=2))
        else:
            print(assemble(args.shards, args.out, args.base_model))
    except FluxMusicError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
