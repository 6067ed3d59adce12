"""Loading transformer weights safely: official ``.pt`` files, bare state dicts, safetensors.

Nothing is ever unpickled beyond tensors and plain containers (``torch.load(weights_only=True)``); the
official files' ``argparse.Namespace`` under ``"args"`` is the one extra type allowed. Loads are strict:
any missing, unexpected or mis-shaped key fails with one message listing them all.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fluxmusic import integrity
from fluxmusic.errors import FluxMusicError
from fluxmusic.tempfiles import publish

#: Keys under which training checkpoints hold weights, in order of preference (EMA first, as sample.py).
STATE_KEYS = ("ema", "model", "state_dict")


def read_state_dict(path: str | Path, mmap: bool = False) -> dict[str, Tensor]:
    """Read a state dict from safetensors, an official ``{"ema": ...}`` pickle, or a bare pickled state dict.

    ``mmap=True`` memory-maps a pickle (zip format, torch >= 1.6 saves) instead of reading it whole: tensors
    are read from the file only when touched. Old-format pickles cannot be mapped and are read whole.
    """
    path = Path(path)
    if not path.is_file():
        raise FluxMusicError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
        except Exception as e:  # safetensors raises its own error types
            raise FluxMusicError(f"checkpoint {path} is not a readable safetensors file: {e}") from e
        integrity.verify_safetensors(state, metadata, f"weights file {path}")
        return state
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not (mmap and "mmap" in str(e)):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except pickle.UnpicklingError as e:
        raise FluxMusicError(
            f"checkpoint {path} holds objects other than tensors and plain containers; refusing to unpickle "
            f"it (weights_only=True). Details: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:
        raise FluxMusicError(f"checkpoint {path} cannot be read: {e}") from e
    return extract_state_dict(obj, str(path))


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """Pick the weights out of an official dict (``ema`` first) or accept a bare state dict."""
    if isinstance(obj, Mapping):
        for key in STATE_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if tensors and len(tensors) == len(obj):
            # DDP-wrapped saves prefix every key with "module."
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module.") :]: v for k, v in tensors.items()}
            return tensors
    raise FluxMusicError(
        f"{source} holds no state dict: expected tensors by name, or a dict with one of {list(STATE_KEYS)}"
    )


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise one error naming every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped))
        if keys
    ]
    if problems:
        raise FluxMusicError(f"{source} does not match the model; " + "; ".join(problems))


def load_weights(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``state`` into ``model`` (all-or-nothing: checked before anything is copied)."""
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)


def atomic_save_safetensors(state: Mapping[str, Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write safetensors through a temporary file and rename, so a crash leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Parse a JSON object file; one clear error naming it (``what`` says which file) when it is missing,
    not UTF-8, not JSON, nested too deeply for the parser, or not an object at the top."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise FluxMusicError(f"{what} {path} cannot be read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise FluxMusicError(f"{what} {path} is not UTF-8 text (byte {e.start}): not a JSON file") from e
    except json.JSONDecodeError as e:
        raise FluxMusicError(f"{what} {path} is not valid JSON: {e}") from e
    except RecursionError:
        # json recurses once per nesting level: a hostile file can exhaust the stack.
        raise FluxMusicError(f"{what} {path} is nested too deeply to be a config file") from None
    if not isinstance(obj, dict):
        raise FluxMusicError(f"{what} {path} must hold a JSON object at the top, not a {type(obj).__name__}")
    return obj


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write a file through a temporary file in the same directory and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write_bytes(path, text.encode())
