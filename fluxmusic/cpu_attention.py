"""The fused bf16 CPU attention kernel (``csrc/attention_bf16.c``): build, load, call.

The kernel keeps each tile of scores in AVX512 registers from QK^T through exp to PV, which is what separate
GEMMs plus a softmax pass cannot do at small head dims (docs/performance.md). It is plain C, compiled on first
use with the system C compiler into a per-user cache (like Triton's and inductor's kernels), loaded with
ctypes and called from one Python thread per torch thread (ctypes releases the GIL; the calling thread is one of
them), each packing K and V for, and attending, a contiguous range of (batch, head) slices.

Where it cannot run (no C compiler, a CPU without AVX512-BF16, a head dim without a compiled kernel, or
scores that are not provably bounded) :func:`fused_attention` returns None and the caller keeps its own path;
:func:`unavailable_reason` says why the library is missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
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

T = TypeVar("T")
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
            lib.fm_pack_bf16.argtypes = [p] * 5 + [i64] * 12 + [ctypes.POINTER(ctypes.c_float)]
            lib.fm_pack_bf16.restype = None
            f32 = ctypes.c_float
            lib.fm_attention_slices.argtypes = [p] * 6 + [i64] * 4 + [f32, f32] + [i64] * 8
            lib.fm_attention_slices.restype = ctypes.c_int
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
    """A pool of at least ``workers`` threads; made again when more are needed, or in a forked child (whose copy
    of the pool has no threads)."""
    with _lock:
        pool, size, pid = _state.get("pool", (None, 0, 0))  # type: ignore[misc]
        if pool is None or size < workers or pid != os.getpid():
            if pool is not None and pid == os.getpid():
                pool.shutdown(wait=False)  # (its idle threads exit; a forked child's copy has none to stop)
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fluxmusic-attn")
            _state["pool"] = (pool, workers, os.getpid())
        return pool


def scores_bounded(q: Tensor, k: Tensor, scale: float, limit: float = MAX_SCORE) -> bool:
    """Whether every ``scale * q.k`` provably lies in [-limit, limit] (Cauchy-Schwarz on the row norms)."""
    bound = scale * float(q.float().norm(dim=-1).amax()) * float(k.float().norm(dim=-1).amax())
    return bound <= limit  # (False for nan)


def fused_attention(q: Tensor, k: Tensor, v: Tensor, threads: int | None = None) -> Tensor | None:
    """softmax(q k^T / sqrt(Dh)) v for bf16 CPU tensors [B, H, L, Dh], merged to [B, Lq, H*Dh]; None when the
    kernel cannot run these inputs here (the caller then uses another path)."""
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"):
        return None
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    kernel_dh = -(-dh // 16) * 16  # e.g. giant's 88 runs as 96 with zero channels
    if lk == 0 or not supports_head_dim(kernel_dh):
        return None
    scale = dh**-0.5
    if kernel_dh == dh:
        return _run(q, k, v, scale, threads)
    pad = (0, kernel_dh - dh)  # zero channels add nothing to q.k and give zero outputs, dropped below
    out = _run(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale, threads)
    return None if out is None else out.view(b, lq, h, kernel_dh)[..., :dh].reshape(b, lq, h * dh)


def _run(q: Tensor, k: Tensor, v: Tensor, scale: float, threads: int | None) -> Tensor | None:
    """Pack K and V, check the score bound from the row norms, attend. None when the scores are not provably
    bounded. With at least as many (batch, head) slices as threads, each thread packs and attends whole slices
    with no barrier between (one phase); otherwise every thread packs, then each takes a share of query rows."""
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    lib = _library()
    padded = (lk + TILE_KEYS - 1) // TILE_KEYS * TILE_KEYS
    qc = q.contiguous()
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    kp = torch.empty(b * h, padded, dh, dtype=q.dtype)
    vp = torch.empty(b * h, padded, dh, dtype=q.dtype)
    out = torch.empty(b, lq, h * dh, dtype=q.dtype)
    slices = b * h
    items = slices * ((lq + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM)
    workers = max(1, min(threads or torch.get_num_threads(), items))
    ptrs = (qc.data_ptr(), k.data_ptr(), v.data_ptr(), kp.data_ptr(), vp.data_ptr())
    strides = (*k.stride()[:3], *v.stride()[:3])

    if slices >= workers:
        def whole(s0: int, s1: int) -> int:
            return lib.fm_attention_slices(*ptrs, out.data_ptr(), h, lq, lk, dh, scale, MAX_SCORE,  # type: ignore[union-attr]
                                           *strides, s0, s1)

        codes = _on_threads(whole, slices, workers)
        if -3 in codes:
            return None
    else:
        def pack(s0: int, s1: int) -> tuple[float, float]:
            norms = (ctypes.c_float * 2)()
            lib.fm_pack_bf16(*ptrs, h, lq, lk, dh, *strides, s0, s1, norms)  # type: ignore[union-attr]
            return norms[0], norms[1]

        norms = _on_threads(pack, slices, min(workers, slices))
        flat = [x for n in norms for x in n]
        if any(math.isnan(x) for x in flat):  # (a nan score would poison the row sums)
            return None
        q_sq, k_sq = max(n[0] for n in norms), max(n[1] for n in norms)
        if not scale * math.sqrt(q_sq) * math.sqrt(k_sq) <= MAX_SCORE:
            return None
        args = (qc.data_ptr(), kp.data_ptr(), vp.data_ptr(), out.data_ptr(), h, lq, lk, dh, scale, ROWS_PER_ITEM)

        def rows(w0: int, w1: int) -> int:
            return lib.fm_attention_bf16(*args, w0, w1)  # type: ignore[union-attr]

        codes = _on_threads(rows, items, workers)
    if any(codes):
        raise MemoryError(f"fused attention kernel: no memory for its {lk}-key probability buffer")
    return out


def _on_threads(fn: Callable[[int, int], T], n: int, workers: int) -> list[T]:
    """fn over ``workers`` contiguous shares of range(n): the calling thread takes the first, pool threads the rest."""
    bounds = [n * i // workers for i in range(workers + 1)]
    if workers == 1:
        return [fn(0, n)]
    pool = _executor(workers - 1)
    rest = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, workers)]
    return [fn(bounds[0], bounds[1]), *(f.result() for f in rest)]
