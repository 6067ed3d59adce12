"""Safetensors read and written one tensor at a time, so memory stays at the weights' size in the target dtype.

``safetensors.torch.load_file`` materialises every tensor in the file's dtype and ``save_file`` serialises a
full byte copy; loading an fp32 file into a bf16 model that way costs fp32 + bf16 (+ the model's own
parameters). Here a tensor's bytes are read with ``readinto`` straight into its buffer (no memory map whose
pages would count in the resident set), cast to the target dtype and moved to the target device before the
next one is read: the peak is the final weights plus one tensor in the file's dtype. The writer emits the
header from names, dtypes and shapes, then each tensor's bytes, so callers can produce tensors lazily.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to a
multiple of 8, then the tensors' bytes, contiguous, in offset order.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError
from fluxmusic.tempfiles import publish

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
#: Headers larger than this are refused (the format's own limit is 100 MB).
MAX_HEADER = 100_000_000


class SafetensorsReader:
    """Reads a safetensors file's header at once and its tensors on demand, one at a time.

    Use as a context manager (the file stays open between reads).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FluxMusicError(f"checkpoint {self.path} does not exist")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > MAX_HEADER or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise FluxMusicError(f"checkpoint {self.path} is not a readable safetensors file: {e}") from e
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = _DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise FluxMusicError(f"checkpoint {self.path}: tensor {name!r} has an unreadable entry {e!r}") from err
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes or begin < 0 or self._data_start + end > size:
                raise FluxMusicError(
                    f"checkpoint {self.path}: tensor {name!r} ({e['dtype']} {list(shape)}) has offsets "
                    f"[{begin}, {end}] that do not match its size or the file (truncated?)"
                )
            self._entries[name] = (dtype, shape, begin, end)
        self._file = None
        self._scratch: Tensor | None = None
        self._checksums: dict | None = None

    def __enter__(self) -> SafetensorsReader:
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in __exit__
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._scratch = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def meta_state(self) -> dict[str, Tensor]:
        """Every tensor as a data-less meta tensor (names, shapes, dtypes) for checks before any read."""
        return {k: torch.empty(s, dtype=d, device="meta") for k, (d, s, _, _) in self._entries.items()}

    def read(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
        """One tensor, read into its own buffer, then cast to ``dtype`` and moved to ``device`` if asked."""
        if self._file is None:
            raise RuntimeError("SafetensorsReader.read outside its 'with' block")
        file_dtype, shape, begin, end = self._entries[name]
        dtype = dtype or file_dtype
        device = torch.device(device)
        nbytes = end - begin
        direct = dtype == file_dtype and device.type == "cpu"
        if direct:
            buf = torch.empty(nbytes, dtype=torch.uint8)  # read straight into the final tensor
        else:
            # Cast or move: read into one scratch buffer reused for every tensor (sized to the largest), so
            # the file-dtype copies never pile up in the allocator between the final tensors.
            if self._scratch is None:
                self._scratch = torch.empty(max(e[3] - e[2] for e in self._entries.values()), dtype=torch.uint8)
            buf = self._scratch[:nbytes]
        self._file.seek(self._data_start + begin)
        if nbytes:
            got = self._file.readinto(buf.numpy())
            if got != nbytes:
                raise FluxMusicError(f"checkpoint {self.path}: tensor {name!r} is truncated")
        t = buf.view(file_dtype).reshape(shape)
        self._verify(name, t)
        return t if direct else t.to(device=device, dtype=dtype, copy=True)

    def _verify(self, name: str, t: Tensor) -> None:
        """Check one tensor against the per-tensor SHA-256 in the header (``fluxmusic.integrity``), if present."""
        from fluxmusic import integrity

        if self._checksums is None:
            raw = self.metadata.get(integrity.METADATA_KEY)
            try:
                table = json.loads(raw) if raw else {}
            except (json.JSONDecodeError, RecursionError):
                table = None
            if not isinstance(table, dict):
                raise FluxMusicError(f"{self.path} has a corrupt checksum table in its header")
            self._checksums = table
        want = self._checksums.get(name)
        if want is not None and integrity.tensor_sha256(t) != want:
            raise FluxMusicError(f"{self.path} fails its checksums (corrupted after it was written); changed: "
                                 f"{name}. Restore it from a good copy")


def save_streaming(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file tensor by tensor: ``specs`` gives each name's dtype and shape, ``produce(name)``
    the tensor when its turn comes (it is checked against its spec). Written to a temporary file and renamed."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in _NAMES:
            raise FluxMusicError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, (dtype, shape) in specs.items():
                t = produce(name)
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)}, declared {dtype} {shape}")
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    # bytes of the tensor without a copy (bf16 has no numpy type: view it as int16).
                    view = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
                    f.write(memoryview(view.numpy()).cast("B"))
                del t
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_streaming(state: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None):
    """:func:`save_streaming` for tensors already in memory (no serialised copy of the whole file)."""
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    save_streaming(specs, lambda k: state[k], path, metadata)
