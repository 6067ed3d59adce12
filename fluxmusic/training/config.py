"""Options of the generic training loop, as plain data (saved next to the run as ``train_config.json``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fluxmusic.errors import FluxMusicError

SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Loop hyper-parameters. Defaults follow the paper where it says (grad clip 1.0, lr 1e-4, EMA).

    EMA default: the paper's decay 0.99 every 100 steps (the official script uses 0.9999 every step; both
    average over ~10k steps, the paper's way needs 100x fewer updates). For short runs use a smaller
    horizon, e.g. ``ema_decay=0.999, ema_every=1``. Weight decay defaults to 0 (AdamW then equals Adam).
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "constant"  # after warmup: constant, or cosine down to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    bf16: bool = False
    ema_decay: float = 0.99
    ema_every: int = 100
    log_every: int = 10
    val_every: int = 0  # 0: never (except at the end when a validation set exists)
    val_at_start: bool = False  # also validate the starting weights (a fine-tune's baseline), fresh runs only
    ckpt_every: int = 500  # 0: only at the end
    sample_every: int = 0  # 0: never
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch size must be >= 1"),
            (self.grad_accum >= 1, "grad accumulation must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, "lr must be a finite number > 0"),
            (all(0 <= b < 1 for b in self.betas), "betas must be in [0, 1)"),
            (self.weight_decay >= 0, "weight decay must be >= 0"),
            (self.warmup_steps >= 0, "warmup steps must be >= 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (0 <= self.min_lr_ratio <= 1, "min lr ratio must be in [0, 1]"),
            (0 <= self.ema_decay <= 1, "EMA decay must be in [0, 1]"),
            (self.ema_every >= 1, "EMA interval must be >= 1"),
            (self.log_every >= 1, "log interval must be >= 1"),
            (min(self.val_every, self.ckpt_every, self.sample_every) >= 0, "intervals must be >= 0"),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise FluxMusicError("invalid training options: " + "; ".join(bad))

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (counted from 0): linear warmup, then schedule."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            span = max(1, self.steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
