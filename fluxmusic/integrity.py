"""Checksums of the tensors we write, verified when they are read back (issue 17, item 7).

torch's zip checkpoints carry CRCs that its reader never checks, and safetensors has none, so a flipped bit in
a weight loads silently (64 flipped bytes gave a weight of 42.07 and ``train --resume`` exited 0). We store one
SHA-256 per tensor (over dtype, shape and bytes) beside the data and recompute it on load:

- training checkpoints: a ``"checksums"`` entry of the checkpoint dict (every tensor, plus one digest of all
  the plain values: step, data position, config);
- safetensors we export (the transformer's ``model.safetensors``): ``fluxmusic.sha256`` in the header metadata;
- ONNX exports: the manifest's per-file ``sha256`` (now also of the external data), checked by the backend.

Files written before this carry no checksums and still load; anything that carries them must match.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError

#: safetensors metadata key holding ``{tensor name: sha256}`` as JSON.
METADATA_KEY = "fluxmusic.sha256"
#: Key (in :func:`digests`' result) of the digest over every non-tensor value.
PLAIN_KEY = "<plain values>"


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (device and memory layout do not matter)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def digests(obj: Any) -> dict[str, str]:
    """``{path: sha256}`` for every tensor in a nest of dicts, lists and tuples, plus :data:`PLAIN_KEY`
    over all other leaves (numbers, strings, ...), by path."""
    tensors: dict[str, str] = {}
    plain: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Tensor):
            tensors[path] = tensor_sha256(node)
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")
        else:
            plain[path] = f"{type(node).__name__}:{node!r}"

    walk(obj, "")
    tensors[PLAIN_KEY] = hashlib.sha256(json.dumps(sorted(plain.items())).encode()).hexdigest()
    return tensors


def verify(obj: Any, expected: Mapping[str, str], source: str) -> None:
    """Raise one error naming what changed since ``expected`` was computed (a flipped bit, a lost tensor)."""
    if not isinstance(expected, Mapping) or not all(isinstance(v, str) for v in expected.values()):
        raise FluxMusicError(f"{source} has a corrupt checksum table")
    got = digests(obj)
    changed = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if changed or missing or extra:
        parts = [f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("changed", changed), ("missing", missing), ("unexpected", extra)) if keys]
        raise FluxMusicError(
            f"{source} fails its checksums (the file was corrupted after it was written: disk, copy or memory "
            f"error); {'; '.join(parts)}. Restore it from a good copy"
        )


def safetensors_metadata(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Header metadata carrying per-tensor checksums, for :func:`safetensors.torch.save_file`."""
    return {METADATA_KEY: json.dumps({k: tensor_sha256(v) for k, v in state.items()}, sort_keys=True)}


def verify_safetensors(state: Mapping[str, Tensor], metadata: Mapping[str, str] | None, source: str) -> None:
    """Check tensors read from a safetensors file against the checksums in its header, when it has them."""
    if not metadata or METADATA_KEY not in metadata:
        return
    try:
        expected = json.loads(metadata[METADATA_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise FluxMusicError(f"{source} has a corrupt checksum table in its header") from None
    if not isinstance(expected, dict):
        raise FluxMusicError(f"{source} has a corrupt checksum table in its header")
    got = {k: tensor_sha256(v) for k, v in state.items()}
    changed = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    missing = sorted(set(expected) - set(got))
    if changed or missing:
        what = "; ".join(f"{label}: {', '.join(keys[:8])}" for label, keys in
                         (("changed", changed), ("missing", missing)) if keys)
        raise FluxMusicError(
            f"{source} fails its checksums (corrupted after it was written); {what}. Restore it from a good copy"
        )
