"""Training checkpoints that lose nothing, written atomically and read without unpickling objects.

One file holds model, EMA, optimizer, scheduler, step, the data position and the RNG states of every
rank. It contains only tensors and plain containers (dict, list, tuple, str, int, float, bool, None), so
it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxmusic import integrity
from fluxmusic.checkpoint import check_state_dict
from fluxmusic.errors import FluxMusicError
from fluxmusic.tempfiles import publish

FORMAT = "fluxmusic-train"
VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
#: Entry holding per-tensor SHA-256 digests (fluxmusic.integrity), checked on every read.
CHECKSUMS = "checksums"
_REQUIRED = (
    "format", "version", "task", "fingerprint", "step", "data", "model", "ema", "optimizer", "scheduler",
    "rng", "world_size", "global_batch",
)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash (or SIGKILL) at any moment leaves either the previous complete file or the new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable (best effort: not every filesystem allows fsync on a directory).
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and sanity-check a training checkpoint; any problem is one clear FluxMusicError."""
    if not path.is_file():
        raise FluxMusicError(f"training checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FluxMusicError(
            f"training checkpoint {path} is corrupt or not a fluxmusic checkpoint (cannot be read with "
            f"weights_only=True): {first}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FluxMusicError(f"{path} is not a fluxmusic training checkpoint (no format={FORMAT!r} marker)")
    if ckpt.get("version") != VERSION:
        raise FluxMusicError(f"{path} has checkpoint version {ckpt.get('version')!r}; this code reads {VERSION}")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise FluxMusicError(f"training checkpoint {path} is incomplete; missing entries: {', '.join(missing)}")
    if CHECKSUMS in ckpt:  # written since issue 17; older checkpoints have none and load as before
        integrity.verify({k: v for k, v in ckpt.items() if k != CHECKSUMS}, ckpt[CHECKSUMS],
                         f"training checkpoint {path}")
    return ckpt


def check_compatible(
    ckpt: dict[str, Any], path: Path, task: str, fingerprint: dict, model: nn.Module, world_size: int,
    global_batch: int,
) -> None:
    """Refuse to resume into a different task, model config, process count or global batch."""
    if ckpt["task"] != task:
        raise FluxMusicError(f"checkpoint {path} was written by task {ckpt['task']!r}, not {task!r}")
    if ckpt["fingerprint"] != fingerprint:
        diff = sorted(
            k for k in set(ckpt["fingerprint"]) | set(fingerprint)
            if ckpt["fingerprint"].get(k) != fingerprint.get(k)
        )
        details = "; ".join(f"{k}: checkpoint {ckpt['fingerprint'].get(k)!r}, now {fingerprint.get(k)!r}" for k in diff)
        raise FluxMusicError(f"checkpoint {path} was trained with a different model configuration ({details})")
    check_state_dict(model, ckpt["model"], f"checkpoint {path} (model)")
    check_state_dict(model, ckpt["ema"], f"checkpoint {path} (ema)")
    # The data order and the per-rank RNG streams depend on these; changing them cannot resume exactly.
    if ckpt["world_size"] != world_size:
        raise FluxMusicError(
            f"checkpoint {path} was written by {ckpt['world_size']} process(es); resume it with the same "
            f"number (now {world_size})"
        )
    if ckpt["global_batch"] != global_batch:
        raise FluxMusicError(
            f"checkpoint {path} used a global batch of {ckpt['global_batch']} items per micro-step; "
            f"now {global_batch} (batch size x processes must not change on resume)"
        )
