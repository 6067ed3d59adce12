"""The fused bf16 CPU attention kernel (``csrc/attention_bf16.c``): build, load, call.

The kernel keeps each tile of scores in AVX512 registers from QK^T through exp to PV, which is what separate
GEMMs plus a softmax pass cannot do at small head dims (docs/performance.md). It is plain C, compiled on first
use with the system C compiler into a per-user cache (like Triton's and inductor's kernels), loaded with
ctypes and called from a few Python threads (ctypes releases the GIL), one contiguous range of work items each.

Where it cannot run (no C compiler, a CPU without AVX512-BF16, a head dim without a compiled kernel, or
scores that are not provably bounded) :func:`fused_attention` returns None and the caller keeps its own path;
:func:`unavailable_reason` says why the library is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "attention_bf16.c"
#: Compiler flags: the instruction sets the kernel uses (checked at run time by ``fm_attention_supported``).
CFLAGS = ("-O3", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
#: Query rows per work item: small enough to balance two to a few dozen threads, large enough that one
#: ctypes call per thread covers many items.
ROWS_PER_ITEM = 64
#: Scores the kernel exponentiates without a running max must lie in [-MAX_SCORE, MAX_SCORE]
#: (fluxmusic.ops.EXP_SUM_MAX_SCORE; exp neither overflows nor underflows fp32 there).
MAX_SCORE = 40.0
#: Keys per tile of the kernel (K and V are zero-padded to a multiple).
TILE_KEYS = 64

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where compiled kernels live: ``$FLUXMUSIC_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/fluxmusic/kernels``."""
    env = os.environ.get("FLUXMUSIC_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fluxmusic" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build() -> Path:
    """Compile the kernel once per source and flags; an atomic rename makes concurrent builds safe."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((cc, *CFLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"attention_bf16-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{cc} failed to compile {SOURCE.name}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (the reason in ``_state['reason']``); built on first call."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        try:
            lib = ctypes.CDLL(str(build()))
            if not lib.fm_attention_supported():
                _state["reason"] = "this CPU lacks AVX512-BF16"
                lib = None
        except OSError as err:
            _state["reason"] = str(err)
        if lib is not None:
            p, i64 = ctypes.c_void_p, ctypes.c_long
            lib.fm_attention_bf16.argtypes = [p, p, p, p, i64, i64, i64, i64, ctypes.c_float, i64, i64, i64]
            lib.fm_attention_bf16.restype = ctypes.c_int
            lib.fm_attention_head_dim_supported.argtypes = [i64]
        _state["lib"] = lib
        return lib


def available() -> bool:
    """Whether the fused kernel runs here (builds it on first call)."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why the kernel does not run here, or None when it does."""
    return None if available() else str(_state.get("reason"))


def supports_head_dim(head_dim: int) -> bool:
    lib = _library()
    return lib is not None and bool(lib.fm_attention_head_dim_supported(head_dim))


def _executor(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _state.get("pool")
        if pool is None or pool._max_workers != workers:  # type: ignore[attr-defined]
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fluxmusic-attn")
            _state["pool"] = pool
        return pool  # type: ignore[return-value]


def scores_bounded(q: Tensor, k: Tensor, scale: float, limit: float = MAX_SCORE) -> bool:
    """Whether every ``scale * q.k`` provably lies in [-limit, limit] (Cauchy-Schwarz on the row norms)."""
    bound = scale * float(q.float().norm(dim=-1).amax()) * float(k.float().norm(dim=-1).amax())
    return bound <= limit  # (False for nan)


def pack_keys(k: Tensor, tiles: int) -> Tensor:
    """[B, H, Lk, Dh] -> [B*H, tiles*4, Dh/2, 16, 2]: 64-key tiles of four 16-key blocks in VNNI pair order."""
    b, h, lk, dh = k.shape
    kp = torch.zeros(b * h, tiles * TILE_KEYS, dh, dtype=k.dtype)
    kp[:, :lk] = k.reshape(b * h, lk, dh)
    return kp.view(b * h, tiles * 4, 16, dh // 2, 2).transpose(2, 3).contiguous()


def pack_values(v: Tensor, tiles: int) -> Tensor:
    """[B, H, Lk, Dh] -> [B*H, tiles*32, Dh, 2]: consecutive key pairs interleaved per channel (VNNI)."""
    b, h, lk, dh = v.shape
    vp = torch.zeros(b * h, tiles * TILE_KEYS, dh, dtype=v.dtype)
    vp[:, :lk] = v.reshape(b * h, lk, dh)
    return vp.view(b * h, tiles * TILE_KEYS // 2, 2, dh).transpose(2, 3).contiguous()


def fused_attention(q: Tensor, k: Tensor, v: Tensor, threads: int | None = None) -> Tensor | None:
    """softmax(q k^T / sqrt(Dh)) v for bf16 CPU tensors [B, H, L, Dh], merged to [B, Lq, H*Dh]; None when the
    kernel cannot run these inputs here (the caller then uses another path)."""
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"):
        return None
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    if lk == 0 or not supports_head_dim(dh):
        return None
    scale = dh**-0.5
    if not scores_bounded(q, k, scale):
        return None
    lib = _library()
    tiles = (lk + TILE_KEYS - 1) // TILE_KEYS
    qc = q.contiguous()
    kp, vp = pack_keys(k, tiles), pack_values(v, tiles)
    out = torch.empty(b, lq, h * dh, dtype=q.dtype)
    items = b * h * ((lq + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM)
    workers = max(1, min(threads or torch.get_num_threads(), items))
    args = (qc.data_ptr(), kp.data_ptr(), vp.data_ptr(), out.data_ptr(), h, lq, lk, dh, scale, ROWS_PER_ITEM)

    def run(w0: int, w1: int) -> int:
        return lib.fm_attention_bf16(*args, w0, w1)  # type: ignore[union-attr]

    if workers == 1:
        codes = [run(0, items)]
    else:
        bounds = [items * i // workers for i in range(workers + 1)]
        codes = list(_executor(workers).map(run, bounds[:-1], bounds[1:]))
    if any(codes):
        raise MemoryError(f"fused attention kernel: no memory for its {lk}-key probability buffer")
    return out
