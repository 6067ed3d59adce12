"""The fused bf16 CPU attention kernel (``csrc/attention_bf16.c``), and the one-pass QK RMSNorm + RoPE in front
of it (:func:`qk_norm_rope`): build, load, call.

The kernel keeps each tile of scores in AVX512 registers from QK^T through exp to PV, which is what separate
GEMMs plus a softmax pass cannot do at small head dims (docs/performance.md). It is plain C, compiled on first
use with the system C compiler into a per-user cache (like Triton's and inductor's kernels), loaded with
ctypes, and run on torch's own OpenMP threads (it calls the GOMP_parallel of the runtime torch loaded), so it
never competes with OpenMP workers still spinning after the previous GEMM: a second pool of Python threads did,
and lost 20 % of the attention time to them (docs/performance.md). Each thread packs K and V for, and attends, a
contiguous range of (batch, head) slices.

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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "attention_bf16.c"
#: Compiler flags: the instruction sets the kernel uses (checked at run time by ``fm_attention_supported``).
CFLAGS = ("-O3", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
#: Query rows per work item when there are fewer (batch, head) slices than threads: small enough to balance
#: two to a few dozen threads, large enough to amortise each item's setup.
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
            p, i64, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
            lib.fm_attention_head_dim_supported.argtypes = [i64]
            lib.fm_attention.argtypes = [p] * 6 + [i64] * 5 + [f32, f32] + [i64] * 8
            lib.fm_attention.restype = ctypes.c_int
            lib.fm_qk_norm_rope.argtypes = [p, i64, i64, p, p, i64, i64, p, p, i64, i64, i64, i64, f32, i64]
            lib.fm_qk_norm_rope.restype = ctypes.c_int
            lib.fm_use_openmp.argtypes = [p, p, p]
            lib.fm_use_openmp.restype = None
            lib.fm_use_openmp(*(_openmp_functions() or (None, None, None)))
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


def _openmp_functions() -> tuple[int, int, int] | None:
    """Addresses of GOMP_parallel, omp_get_thread_num and omp_get_num_threads in the OpenMP runtime torch runs
    its intra-op threads on (loaded into the process's global scope with torch), or None when torch does not use
    OpenMP; the kernel then runs on the calling thread only."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    process = ctypes.CDLL(None)
    try:
        found = [process[name] for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")]
    except AttributeError:
        return None
    return tuple(ctypes.cast(fn, ctypes.c_void_p).value for fn in found)  # type: ignore[return-value]


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
    """Pack K and V, check the score bound from the row norms, attend (all in one call into the library, on
    torch's OpenMP threads). None when the scores are not provably bounded."""
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    lib = _library()
    padded = (lk + TILE_KEYS - 1) // TILE_KEYS * TILE_KEYS
    qc = q.contiguous()
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    kp = torch.empty(b * h, padded, dh, dtype=q.dtype)
    vp = torch.empty(b * h, padded, dh, dtype=q.dtype)
    out = torch.empty(b, lq, h * dh, dtype=q.dtype)
    code = lib.fm_attention(  # type: ignore[union-attr]
        qc.data_ptr(), k.data_ptr(), v.data_ptr(), kp.data_ptr(), vp.data_ptr(), out.data_ptr(), h, b * h, lq, lk,
        dh, scale, MAX_SCORE, *k.stride()[:3], *v.stride()[:3], ROWS_PER_ITEM, threads or torch.get_num_threads())
    if code == -3:
        return None
    if code:
        raise MemoryError(f"fused attention kernel: no memory for its {lk}-key probability buffer")
    return out


def qk_norm_rope(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, rope: Tensor, num_heads: int, eps: float,
                 threads: int | None = None) -> tuple[Tensor, Tensor] | None:
    """QK RMSNorm + RoPE (fluxmusic.ops.qk_rmsnorm_rope's q and k, with its rounding steps) of a bf16 CPU
    projection ``qkv`` [B, L, 3*H*Dh] in one pass: q, k as contiguous [B, H, L, Dh]. None where the kernel does
    not apply (another dtype or layout, a head dim that is not a multiple of 16 up to 128, no kernel here)."""
    if qkv.dim() != 3 or qkv.dtype != torch.bfloat16 or qkv.device.type != "cpu" or qkv.stride(-1) != 1:
        return None
    b, length, width = qkv.shape
    dh = width // (3 * num_heads)
    if dh % 16 or not 0 < dh <= 128 or width != 3 * num_heads * dh:
        return None
    if not (q_scale.shape == k_scale.shape == (dh,) and rope.dtype == torch.float32 and rope.dim() == 4
            and rope.shape[1:] == (length, dh // 2, 2) and rope.shape[0] in (1, b)
            and rope.stride(-1) == 1 and rope.stride(-2) == 2 and rope.device.type == "cpu"):
        return None
    lib = _library()
    if lib is None:
        return None
    scales = torch.stack((q_scale, k_scale)).float().contiguous()
    q = torch.empty(b, num_heads, length, dh, dtype=qkv.dtype)
    k = torch.empty_like(q)
    rope_b = rope.stride(0) if rope.shape[0] > 1 else 0
    code = lib.fm_qk_norm_rope(qkv.data_ptr(), qkv.stride(0), qkv.stride(1), scales.data_ptr(), rope.data_ptr(),
                               rope_b, rope.stride(1), q.data_ptr(), k.data_ptr(), b, length, num_heads, dh, eps,
                               threads or torch.get_num_threads())
    return (q, k) if code == 0 else None
