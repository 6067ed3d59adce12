"""What a trainer plugs into the generic loop: the ``TrainTask`` interface.

A task builds its model, names its datasets, turns a list of items into a batch, and computes a scalar
loss from a batch. Validation, sampling and export are optional hooks. Every random draw a task makes in
``loss`` should come from the ``generator`` it is given (or the global torch RNG): the loop saves both in
checkpoints, which is what makes kill-and-resume bit-exact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: A map-style dataset: ``len(ds)`` and ``ds[i]``.
Dataset = Sequence[Any]


class TrainTask(ABC):
    """One trainable component (transformer, VAE, vocoder, T5, CLAP, ...)."""

    #: Short name, stored in checkpoints so a run cannot be resumed as another task.
    name: str = "task"

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Create the trainable model (fp32, on CPU; the loop moves it). Called once per process."""

    @abstractmethod
    def train_dataset(self) -> Dataset: ...

    def val_dataset(self) -> Dataset | None:
        return None

    def collate(self, items: list[Any]) -> Any:
        """Items -> batch. Default: stack the tensors of dict items key by key."""
        return {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], Tensor)}

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss to minimise and extra numbers to log. ``model`` may be DDP-wrapped."""

    def validate(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Validation loss of one batch (default: the training loss). Runs under ``torch.no_grad``."""
        return self.loss(model, batch, generator)

    def param_groups(self, model: nn.Module) -> Iterable[Any]:
        """What AdamW optimises: parameters or param-group dicts (e.g. no weight decay on norms). A group's own
        ``"lr"`` is its peak lr (default: the config's); warmup and schedule scale every group alike."""
        return [p for p in model.parameters() if p.requires_grad]

    def fingerprint(self) -> dict[str, Any]:
        """Plain data that must match for a checkpoint to be resumed (e.g. the model config)."""
        return {}

    def sample(self, model: nn.Module, out_dir: Path, step: int) -> dict[str, float] | None:
        """Optional: write samples from ``model`` (the EMA weights) under ``out_dir``; rank 0 only."""
        return None

    def export(self, model: nn.Module, out_dir: Path) -> Path | None:
        """Optional: write ``model`` (the EMA weights) in its inference format."""
        return None
