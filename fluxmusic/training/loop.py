"""The generic training loop shared by every trainer (transformer now; VAE, vocoder, T5, CLAP later).

AdamW with optional warmup + cosine schedule, gradient clipping and accumulation, bf16 autocast, EMA,
periodic validation / samples / checkpoints, console + JSONL logs, and DDP under ``torchrun``.
A run killed at any point and resumed from its last checkpoint continues bit-identically (fp32, CPU).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from fluxmusic import integrity
from fluxmusic.checkpoint import atomic_write_text
from fluxmusic.errors import FluxMusicError
from fluxmusic.tempfiles import remove_stale_temporaries
from fluxmusic.training import distributed, rng
from fluxmusic.training.checkpointing import (
    CHECKPOINT_NAME,
    FORMAT,
    VERSION,
    atomic_torch_save,
    check_compatible,
    read_checkpoint,
)
from fluxmusic.training.config import TrainConfig
from fluxmusic.training.ema import EMA
from fluxmusic.training.runlog import RunLog, Throughput
from fluxmusic.training.sampler import DataPosition, ShardedBatchSampler
from fluxmusic.training.task import Dataset, TrainTask

LOG_NAME = "log.jsonl"
CONFIG_NAME = "train_config.json"
EXPORT_DIR = "export"
_VAL_SEED = 0x5EED  # validation draws the same noise every time, so its losses are comparable over a run


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    export: Path | None
    model: nn.Module = field(repr=False)
    ema: nn.Module = field(repr=False)


def train(
    task: TrainTask,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: bool | str | Path = False,
    export_dir: str | Path | None = None,
    stream: TextIO | None = None,
    time_limit_s: float | None = None,
) -> TrainResult:
    """Train ``task`` for ``cfg.steps`` optimizer steps, writing checkpoints and logs under ``run_dir``.

    ``resume``: False starts fresh (refusing to overwrite an existing checkpoint); True continues from
    ``run_dir/checkpoint.pt`` if it exists (else starts fresh); a path continues from that file.
    ``time_limit_s``: stop after the first step past this many seconds of training (in this call), with a
    checkpoint, validation and export as at the last step; the lr schedule is still the one of ``cfg.steps``
    (a wall-clock schedule could not resume bit-exactly), so resuming later finishes the same run.
    Under ``torchrun`` the same call runs DDP; only rank 0 writes files.
    """
    if time_limit_s is not None and not (time_limit_s > 0 and math.isfinite(time_limit_s)):
        raise FluxMusicError(f"time limit must be a positive number of seconds, got {time_limit_s}")
    info = distributed.init(cfg.device)
    try:
        return _Run(task, cfg, Path(run_dir), info, stream).run(resume, export_dir, time_limit_s)
    finally:
        distributed.shutdown(info)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class _Run:
    def __init__(self, task: TrainTask, cfg: TrainConfig, run_dir: Path, info: distributed.DistInfo,
                 stream: TextIO | None) -> None:
        self.task, self.cfg, self.run_dir, self.info = task, cfg, run_dir, info
        self.device = info.device
        self.ckpt_path = run_dir / CHECKPOINT_NAME
        self.log = RunLog(run_dir / LOG_NAME, enabled=info.is_main, stream=stream)
        self.step = 0

    # ------------------------------------------------------------------------------------------ setup
    def _resume_path(self, resume: bool | str | Path) -> Path | None:
        if resume is False or resume is None:
            if self.ckpt_path.exists():
                raise FluxMusicError(
                    f"{self.run_dir} already holds a checkpoint; pass --resume to continue it or choose a new --out"
                )
            return None
        if resume is True:
            return self.ckpt_path if self.ckpt_path.exists() else None
        return Path(resume)

    def _build(self) -> None:
        cfg, task, info = self.cfg, self.task, self.info
        # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
        rng.seed_everything(cfg.seed)
        self.model = task.build_model().to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_every)
        self.optimizer = torch.optim.AdamW(
            task.param_groups(self.model), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        # A plain function (not a bound method or object): LambdaLR then stores nothing but numbers.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: cfg.lr_factor(s))
        self.train_ds: Dataset = task.train_dataset()
        self.val_ds: Dataset | None = task.val_dataset()
        self.sampler = ShardedBatchSampler(
            len(self.train_ds), cfg.batch_size, cfg.seed, info.rank, info.world_size
        )
        # Per-rank streams: ranks draw different noise / dropout / crops for their different items.
        rank_seed = cfg.seed + 1_000_003 * (info.rank + 1)
        rng.seed_everything(rank_seed)
        self.generator = torch.Generator(device=self.device).manual_seed(rank_seed)

    def _load(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        check_compatible(
            ckpt, path, self.task.name, self.task.fingerprint(), self.model, self.info.world_size,
            self.cfg.batch_size * self.info.world_size,
        )
        try:
            self.model.load_state_dict(ckpt["model"], strict=True)
            self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.step = int(ckpt["step"])
            self.sampler.position = DataPosition(**ckpt["data"])
            rng.restore(ckpt["rng"][self.info.rank], self.generator, self.device)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise FluxMusicError(f"training checkpoint {path} cannot be restored: {e}") from e

    # ------------------------------------------------------------------------------------------ run
    def run(self, resume: bool | str | Path, export_dir: str | Path | None,
            time_limit_s: float | None = None) -> TrainResult:
        cfg, info = self.cfg, self.info
        resume_path = self._resume_path(resume)
        self._build()
        if resume_path is not None:
            self._load(resume_path)
        cleaned: tuple[list[str], int] = ([], 0)
        if info.is_main:
            # A run killed mid-write left its temporaries; this process owns the directory now.
            for d in (self.run_dir, Path(export_dir) if export_dir else self.run_dir / EXPORT_DIR):
                names, freed = remove_stale_temporaries(d)
                cleaned = (cleaned[0] + names, cleaned[1] + freed)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / CONFIG_NAME, json.dumps(
                {"task": self.task.name, "fingerprint": self.task.fingerprint(), "train": cfg.to_dict(),
                 "world_size": info.world_size}, indent=2) + "\n")
        self.ddp_model = distributed.wrap(self.model, info)
        self.log.write(
            "start", step=self.step, steps=cfg.steps, task=self.task.name, world_size=info.world_size,
            device=str(self.device), params=sum(p.numel() for p in self.model.parameters()),
            train_items=len(self.train_ds), resumed_from=str(resume_path) if resume_path else None,
        )
        if cleaned[0]:
            self.log.write("cleanup", removed=cleaned[0], bytes=cleaned[1])
        train_loss = val_loss = None
        ckpt_written: Path | None = None
        throughput = Throughput(self.step)
        window: list[Tensor] = []
        extra: dict[str, list[float]] = {}
        if cfg.val_at_start and self.step == 0 and self.val_ds is not None:
            val_loss = self._validate()
        started = time.perf_counter()
        while self.step < cfg.steps:
            loss, logs, grad_norm = self._train_step()
            self.step += 1
            window.append(loss)
            for k, v in logs.items():
                extra.setdefault(k, []).append(v)
            step, last = self.step, self.step == cfg.steps
            if not last and time_limit_s is not None and self._out_of_time(started, time_limit_s):
                self.log.write("time_limit", step=step, steps=cfg.steps, limit_s=time_limit_s)
                last = True  # validate, checkpoint and export here; resuming continues the same schedule
            if step % cfg.log_every == 0 or last:
                train_loss = float(distributed.mean(torch.stack(window).mean().reshape(1), info)[0])
                rate, eta = throughput.tick(step, cfg.steps)
                lrs = self.scheduler.get_last_lr()
                # param groups with their own peak lr (a new layer faster than the pretrained ones) log them all
                per_group = {"lr_groups": lrs} if len(set(lrs)) > 1 else {}
                self.log.write(
                    "train", step=step, loss=train_loss, grad_norm=grad_norm, lr=lrs[0], **per_group,
                    steps_per_s=rate, eta_s=eta, epoch=self.sampler.position.epoch,
                    **{k: sum(v) / len(v) for k, v in extra.items()},
                )
                window, extra = [], {}
            t0 = time.perf_counter()
            if self.val_ds is not None and ((cfg.val_every and step % cfg.val_every == 0) or last):
                val_loss = self._validate()
            if cfg.sample_every and step % cfg.sample_every == 0:
                self._sample()
            if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or last:
                ckpt_written = self._save()
            throughput.exclude(time.perf_counter() - t0)
            if last:
                break
        exported = None
        if info.is_main:
            exported = self.task.export(self.ema.model, Path(export_dir) if export_dir else self.run_dir / EXPORT_DIR)
            self.log.write("done", step=self.step, loss=train_loss, val_loss=val_loss,
                           export=str(exported) if exported else None)
        distributed.barrier(info)
        self.log.close()
        return TrainResult(self.step, train_loss, val_loss, ckpt_written, exported, self.model, self.ema.model)

    def _out_of_time(self, started: float, limit_s: float) -> bool:
        """Whether any rank is past the time limit (all ranks then stop at the same step)."""
        over = torch.tensor([float(time.perf_counter() - started > limit_s)], device=self.device)  # nccl: on GPU
        return bool(distributed.sum_(over, self.info)[0] > 0)

    def _train_step(self) -> tuple[Tensor, dict[str, float], float]:
        cfg, task = self.cfg, self.task
        self.model.train()
        total = torch.zeros((), device=self.device)
        logs: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            idx = self.sampler.next_batch()
            # Datasets with per-epoch randomness (audio crops) derive it from the epoch we tell them.
            if hasattr(self.train_ds, "set_epoch"):
                self.train_ds.set_epoch(self.sampler.position.epoch)
            batch = to_device(task.collate([self.train_ds[i] for i in idx]), self.device)
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = micro == cfg.grad_accum - 1 or not self.info.enabled
            ctx = contextlib.nullcontext() if sync else self.ddp_model.no_sync()
            with ctx:
                with self._autocast():
                    loss, micro_logs = task.loss(self.ddp_model, batch, self.generator)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float()
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        # The norm is of the all-reduced gradients, identical on every rank: all ranks stop together.
        if not math.isfinite(grad_norm):
            raise FluxMusicError(
                f"non-finite gradient norm at step {self.step + 1} (loss {float(total) / cfg.grad_accum}); "
                f"lower --lr or resume from the last checkpoint {self.ckpt_path}"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.ema.update(self.model, self.step + 1)
        return total / cfg.grad_accum, logs, grad_norm

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # ------------------------------------------------------------------------------------------ hooks
    @torch.no_grad()
    def _validate(self) -> float:
        """Mean validation loss over the whole validation set (sharded over ranks), raw and EMA weights."""
        assert self.val_ds is not None
        info, cfg = self.info, self.cfg
        indices = list(range(info.rank, len(self.val_ds), info.world_size))
        results = {}
        with rng.preserved(self.generator, self.device):
            for label, model in (("val_loss", self.model), ("val_loss_ema", self.ema.model)):
                if label == "val_loss_ema" and self.step == 0:  # val_at_start: the EMA is still the model's copy
                    results[label] = results["val_loss"]
                    continue
                was_training = model.training
                model.eval()
                g = torch.Generator(device=self.device).manual_seed(_VAL_SEED + info.rank)
                sums = torch.zeros(2, dtype=torch.float64)
                for i in range(0, len(indices), cfg.batch_size):
                    chunk = indices[i : i + cfg.batch_size]
                    batch = to_device(self.task.collate([self.val_ds[j] for j in chunk]), self.device)
                    with self._autocast():
                        loss, _ = self.task.validate(model, batch, g)
                    sums += torch.tensor([float(loss) * len(chunk), len(chunk)], dtype=torch.float64)
                model.train(was_training)
                sums = distributed.sum_(sums, info)
                results[label] = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
        self.log.write("val", step=self.step, **results)
        return results["val_loss"]

    def _sample(self) -> None:
        if not self.info.is_main:
            return
        with rng.preserved(self.generator, self.device), torch.no_grad():
            logs = self.task.sample(self.ema.model, self.run_dir / "samples", self.step)
        if logs:
            self.log.write("sample", step=self.step, **logs)

    def _save(self) -> Path:
        """Every rank contributes its RNG states; rank 0 writes the file atomically."""
        states = rng.capture(self.generator, self.device)
        gathered = {k: distributed.gather(v, self.info) for k, v in states.items()}
        if self.info.is_main:
            ckpt = {
                "format": FORMAT,
                "version": VERSION,
                "task": self.task.name,
                "fingerprint": self.task.fingerprint(),
                "step": self.step,
                "data": {"epoch": self.sampler.position.epoch, "batch": self.sampler.position.batch},
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": [{k: v[r] for k, v in gathered.items()} for r in range(self.info.world_size)],
                "world_size": self.info.world_size,
                "global_batch": self.cfg.batch_size * self.info.world_size,
                "train_config": self.cfg.to_dict(),
            }
            ckpt["checksums"] = integrity.digests(ckpt)  # verified by read_checkpoint: bit flips are caught
            atomic_torch_save(ckpt, self.ckpt_path)
            self.log.write("checkpoint", step=self.step, path=str(self.ckpt_path))
        return self.ckpt_path
