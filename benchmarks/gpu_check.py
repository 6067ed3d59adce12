"""One command that proves the GPU path: correctness and speed of everything that needs a GPU, in <= 8 minutes.

    python benchmarks/gpu_check.py --out DIR                  # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny   # dry run of every step on the CPU
    python benchmarks/gpu_check.py --list                     # the plan: steps, budgets, what each needs

Writes ``DIR/gpu_check.md`` (one table) and ``DIR/gpu_check.json`` (every number), rewritten after each step so
an interrupted run still leaves what it measured. Steps, in order (each with its own time budget; a step that
would not fit in what is left is skipped with the reason, and a sub-part that would overrun its step's budget
is skipped likewise):

  env               device, versions; TensorRT and onnxruntime-gpu presence (absent: with the reason)
  peaks             measured ceilings: device-to-device copy bandwidth, bf16 matmul rate
  kernels.correct   every Triton kernel vs its torch reference (fluxmusic.ops), fp32/fp16/bf16, forward+backward
  model.kernels     tiny transformer, kernels on vs off (forward + all parameter gradients)
  model.parity      official parity data (official_tiny_a.npz) on the device at the fp32 limits, kernels off/on
  kernels.speed     each kernel vs its eager chain; achieved bandwidth as a fraction of the measured copy peak
  rope              fused RMSNorm+RoPE time as a fraction of SDPA at the same shapes
  transformer       `small` forward, B=2, 1024+256 tokens, bf16: eager, kernels, CUDA graphs; GFLOP/s vs peak
  generation.small  whole 10.24 s generation, `small` random weights, per backend/dtype, per-stage times
  sampling          the same per sampling option (official Euler-50, Heun 16/shift 3, every other solver, --sampling)
  generation.default  the bundled default model per backend/dtype, per-stage times
  transformer.compile  torch.compile of the `small` forward (last: compiling is slow; budgeted)

Exit status: 0 every check that ran passed; 1 a check failed or a step raised; 2 bad arguments;
3 no CUDA GPU (one line, nothing written; use ``--device cpu --tiny`` for a dry run); 4 the whole run hit its
hard time limit (the report is written with what was done).

Needs torch; triton for the kernel steps; transformers, tokenizers, safetensors and diffusers for the
generation steps (a step whose packages are missing is skipped and says which). Runs from a plain checkout too
(no ``pip install``): it maps ``fluxmusic.kernels`` / ``.runtime`` / ``.export`` onto the repository folders.
See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "fluxmusic-gpu-check/1"
MD_NAME, JSON_NAME = "gpu_check.md", "gpu_check.json"
DEFAULT_BUDGET_S = 470.0  # the issue's 8 minutes, less ~10 s for interpreter start and imports
HARD_GRACE_S = 10.0  # the watchdog ends the run this long after the budget
EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_GPU, EXIT_OVERRAN = 0, 1, 2, 3, 4
PROMPT = "a fast cheerful melody on a plucked string"
DURATION = 10.24
PASS, FAIL, INFO, SKIP, ERROR = "PASS", "FAIL", "info", "skip", "ERROR"


# ================================================================================================ imports
def bootstrap_imports() -> None:
    """Make ``fluxmusic`` and its mapped subpackages importable from a plain checkout.

    pyproject maps ``fluxmusic.kernels`` -> ``kernels/`` (and runtime/, export/); without ``pip install`` only
    ``fluxmusic/`` is found. Adding the repository root to ``fluxmusic.__path__`` resolves the three mapped
    names to the same folders the install would use (the lent GPU machine has no network to pip install).
    """
    if importlib.util.find_spec("fluxmusic") is None:
        sys.path.insert(0, str(ROOT))
    import fluxmusic

    if importlib.util.find_spec("fluxmusic.kernels") is None:
        fluxmusic.__path__.append(str(ROOT))


def missing_packages(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


# ================================================================================================ results
@dataclass
class Row:
    """One line of the report: a check (PASS/FAIL), a measurement (info), a skip or an error."""

    step: str
    item: str
    status: str
    value: str = ""
    note: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class StepRecord:
    name: str
    title: str
    budget_s: float
    status: str = "pending"  # pending | running | done | skipped | error | killed
    reason: str = ""
    elapsed_s: float = 0.0
    rows: list[Row] = field(default_factory=list)


@dataclass
class Report:
    """Everything a run found; serialised to JSON and rendered to one markdown table."""

    args: dict
    real_gpu: bool
    started: str = ""
    budget_s: float = DEFAULT_BUDGET_S
    device: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    elapsed_s: float = 0.0
    finished: bool = False
    note: str = ""

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = defaultdict(int)
        for s in self.steps:
            for r in s.rows:
                c[r.status] += 1
        return dict(c)

    def ok(self) -> bool:
        c = self.counts()
        return not c.get(FAIL) and not c.get(ERROR) and not any(s.status in ("error", "killed") for s in self.steps)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["schema"] = SCHEMA
        d["counts"] = self.counts()
        d["ok"] = self.ok()
        return d


def _md(s: object) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def render_markdown(rep: Report) -> str:
    """The report as one markdown table under a short header."""
    dev = rep.device
    head = [
        "# fluxmusic GPU check",
        "",
        f"- device: {dev.get('name', '?')} ({dev.get('kind', '?')}); "
        + ", ".join(f"{k} {v}" for k, v in rep.versions.items()),
        f"- {'REAL GPU RUN' if rep.real_gpu else 'DRY RUN (not a GPU measurement: CPU and/or tiny shapes)'}; "
        f"started {rep.started}; {rep.elapsed_s:.0f} s of a {rep.budget_s:.0f} s budget; "
        f"{'finished' if rep.finished else 'INCOMPLETE'}{'; ' + rep.note if rep.note else ''}",
        "- ceilings measured here: "
        + (", ".join(f"{k} {v:.4g}" for k, v in rep.peaks.items() if isinstance(v, (int, float))) or "none"),
        "- counts: " + ", ".join(f"{k} {v}" for k, v in sorted(rep.counts().items())),
        "",
        "| step | item | status | result | limit / note |",
        "|---|---|---|---|---|",
    ]
    lines = list(head)
    for s in rep.steps:
        lines.append(
            f"| **{_md(s.name)}** | {_md(s.title)} | {s.status} | {s.elapsed_s:.1f} s of {s.budget_s:.0f} s | "
            f"{_md(s.reason)} |"
        )
        for r in s.rows:
            lines.append(f"| {_md(s.name)} | {_md(r.item)} | {r.status} | {_md(r.value)} | {_md(r.note)} |")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


_WRITE_LOCK = threading.Lock()


def write_report(rep: Report, out_dir: Path) -> None:
    """Write both files (temp + rename: a reader never sees half a file). Safe from the watchdog thread."""
    with _WRITE_LOCK:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(out_dir / JSON_NAME, json.dumps(rep.to_json(), indent=1, default=str) + "\n")
        _atomic_write(out_dir / MD_NAME, render_markdown(rep))


# ================================================================================================ planning
@dataclass(frozen=True)
class Step:
    name: str
    title: str
    budget_s: float
    fn: Callable[[Ctx], None]
    needs: tuple[str, ...] = ()  # importable packages; missing -> skipped with the names


def plan_steps(steps: list[Step], budget_s: float, only: set[str] | None = None,
               skip: set[str] | None = None) -> list[tuple[Step, str]]:
    """Decide up front which steps run: ``(step, "")`` to run, ``(step, reason)`` to skip.

    Budgets are maxima. A selected step is planned only while the budgets so far fit in ``budget_s``; the run
    re-checks against the clock before each step (an earlier step may have finished early or late).
    """
    names = {s.name for s in steps}
    for sel in (only or set()) | (skip or set()):
        if sel not in names:
            raise ValueError(f"unknown step {sel!r}; steps: {', '.join(s.name for s in steps)}")
    planned, used = [], 0.0
    for s in steps:
        if only and s.name not in only:
            planned.append((s, "not selected (--only)"))
        elif skip and s.name in skip:
            planned.append((s, "skipped on request (--skip)"))
        elif used + s.budget_s > budget_s:
            planned.append((s, f"does not fit: {used:.0f} s of earlier budgets + its {s.budget_s:.0f} s "
                               f"> the {budget_s:.0f} s total"))
        else:
            used += s.budget_s
            planned.append((s, ""))
    return planned


class Budget:
    """Wall-clock deadlines: the whole run's and the running step's."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.end = self.start + total_s
        self.step_end = self.end

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left_total(self) -> float:
        return self.end - self.clock()

    def left(self) -> float:
        """Seconds left for the running step (its own budget, capped by the run's)."""
        return min(self.step_end, self.end) - self.clock()

    def begin_step(self, budget_s: float) -> None:
        self.step_end = self.clock() + budget_s


# ================================================================================================ context
@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the real ones for a GPU, tiny ones for a dry run (--tiny)."""

    config: str = "small"
    batch: int = 2
    grid: tuple[int, int] = (128, 8)  # latent [8, 256, 16] patchified 2x2: 1024 music tokens
    txt_len: int = 256
    bw_batch: int = 64  # kernel bandwidth shapes: >= 4x an H200's 60 MB L2 for the adaLN inputs
    copy_mib: int = 2048
    matmul_n: int = 8192
    rope_configs: tuple[str, ...] = ("small", "giant")
    # real `small` shapes, and odd lengths with masked (non-power-of-two) widths; few shapes: every shape and
    # dtype is a Triton compile (~1 s each on a fresh machine)
    adaln_shapes: tuple[tuple[int, int, int], ...] = ((2, 1280, 512), (3, 37, 1408))
    qk_shapes: tuple[tuple[int, int, int, int], ...] = ((2, 1280, 16, 32), (2, 37, 3, 88))
    gen_steps: int | None = None  # None: the model's (or the variant's) own step count
    gen_reps: int = 2
    time_s: float = 0.6  # timing budget per measured callable
    min_reps: int = 5

    @classmethod
    def tiny(cls) -> Sizes:
        return cls(config="tiny", grid=(4, 6), txt_len=11, bw_batch=4, copy_mib=8, matmul_n=128,
                   rope_configs=("tiny",), adaln_shapes=((2, 9, 37), (1, 5, 130)),
                   qk_shapes=((2, 7, 3, 16), (1, 5, 2, 88)), gen_steps=2, gen_reps=1, time_s=0.05, min_reps=1)


@dataclass
class Ctx:
    device: Any  # torch.device
    sizes: Sizes
    budget: Budget
    report: Report
    work: Path
    testdata: Path | None
    compile_backend: str
    sampling: dict[str, dict]
    onnx: bool = True
    record: StepRecord | None = None
    cache: dict = field(default_factory=dict)
    step_budget_s: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def add(self, item: str, status: str, value: str = "", note: str = "", **data: Any) -> Row:
        row = Row(self.record.name if self.record else "", item, status, value, note, data)
        if self.record is not None:
            self.record.rows.append(row)
        print(f"    {status:5s} {item}: {value}{'  (' + note + ')' if note else ''}", flush=True)
        return row

    def check(self, item: str, ok: bool, value: str, limit: str, **data: Any) -> bool:
        self.add(item, PASS if ok else FAIL, value, limit, **data)
        return ok

    def bench(self, fn: Callable[[], object], budget_s: float) -> dict:
        return bench(fn, self.device, budget_s, min_reps=self.sizes.min_reps)

    def fits(self, item: str, need_s: float) -> bool:
        """Whether a sub-part expected to take ``need_s`` fits in the step's time left; records a skip if not."""
        left = self.budget.left()
        if left >= need_s:
            return True
        self.add(item, SKIP, "", f"step budget: {left:.0f} s left, needs ~{need_s:.0f} s")
        return False


# ================================================================================================ timing
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device, budget_s: float = 0.5, min_reps: int = 5,
          max_reps: int = 2000) -> dict:
    """Median seconds of ``fn``: one warm-up call, an estimate from three synchronised calls, then ``n`` calls.

    On CUDA each call sits between two events and all are enqueued back to back (as triton's do_bench, without
    its L2 flush: inside the model the inputs of these ops were just written, so they are in L2 too).
    """
    import torch

    fn()
    sync(device)
    est_calls = min(3, min_reps)
    t0 = time.perf_counter()
    for _ in range(est_calls):
        fn()
    sync(device)
    est = max((time.perf_counter() - t0) / est_calls, 1e-7)
    n = int(min(max_reps, max(min_reps, budget_s / est)))
    times: list[float] = []
    if device.type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) / 1e3 for a, b in evs]
    else:
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": n}


def rel_err(a, b) -> float:
    """‖a - b‖ / ‖b‖ in float64 (NaN/inf in ``a`` give inf)."""
    import torch

    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


# ================================================================================================ FLOPs
def transformer_flops(cfg, batch: int, txt_len: int, music_len: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward: every Linear plus attention's QK^T and PV.

    Elementwise work (norms, RoPE, activations) is left out, as usual for "model FLOPs". Checked against
    ``torch.utils.flop_counter`` in tests/test_gpu_check.py.
    """
    d, m, L = cfg.hidden_size, cfg.mlp_hidden_dim, txt_len + music_len
    lin = 0
    lin += music_len * cfg.in_channels * d + txt_len * cfg.context_in_dim * d  # img_in, txt_in (per item)
    lin += (256 * d + d * d) + (cfg.vec_in_dim * d + d * d)  # time_in, vector_in (one vector per item)
    attn_per_block = 2 * L * L * d  # QK^T and PV: 2 * L^2 * (H * Dh) MACs
    for _ in range(cfg.depth):
        lin += 2 * (d * 6 * d)  # two modulations
        for n in (txt_len, music_len):
            lin += n * (d * 3 * d + d * d + d * m + m * d)  # qkv, proj, mlp
        lin += attn_per_block
    for _ in range(cfg.depth_single_blocks):
        lin += d * 3 * d + L * (d * (3 * d + m) + (d + m) * d) + attn_per_block
    lin += d * 2 * d + music_len * d * cfg.in_channels  # final adaLN and linear
    return 2 * batch * lin


# ================================================================================================ steps
def step_env(ctx: Ctx) -> None:
    import torch

    rep = ctx.report
    rep.versions = {"python": platform.python_version(), "torch": torch.__version__}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        rep.device = {"kind": "cuda", "name": p.name, "capability": f"{p.major}.{p.minor}",
                      "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                      "cuda": torch.version.cuda, "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)}
    else:
        rep.device = {"kind": "cpu", "name": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads()}
    ctx.add("device", INFO, rep.device["name"], ", ".join(f"{k} {v}" for k, v in rep.device.items()))
    for pkg in ("triton", "transformers", "diffusers", "numpy", "safetensors", "tokenizers"):
        if importlib.util.find_spec(pkg) is None:
            ctx.add(f"package {pkg}", INFO, "absent")
            continue
        try:
            from importlib.metadata import version

            rep.versions[pkg] = version(pkg)
        except Exception:  # a package importable without metadata (vendored): name it without a version
            rep.versions[pkg] = "?"
    from fluxmusic.kernels import interpreting, triton_available

    if triton_available():
        ctx.add("triton", INFO, rep.versions.get("triton", "?"),
                "CPU interpreter (TRITON_INTERPRET=1)" if interpreting() else "compiled")
    st, why = tensorrt_status()
    ctx.add("TensorRT", st, why)
    ok, why = onnxruntime_gpu_status()
    ctx.add("onnxruntime-gpu", INFO if ok else "absent", why)


def tensorrt_status() -> tuple[str, str]:
    """('absent', why) or (info, version): TensorRT is not part of the lent machine's image and cannot be
    installed there (no network)."""
    try:
        import tensorrt
    except Exception as e:  # ImportError, or a broken install raising OSError on its libraries
        return "absent", (f"not importable ({type(e).__name__}: {e}); not in this machine's image and no "
                          "network to install it; engine benchmarks: benchmarks/bench_tensorrt_gpu.py")
    return INFO, (f"present, version {tensorrt.__version__}; engines are not built here (their builds exceed "
                  "this command's budget): run benchmarks/bench_tensorrt_gpu.py")


def onnxruntime_gpu_status() -> tuple[bool, str]:
    """(True, providers) when onnxruntime has the CUDA execution provider, else (False, why)."""
    try:
        import onnxruntime as ort
    except Exception as e:
        return False, f"onnxruntime not importable ({type(e).__name__}: {e})"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return True, f"onnxruntime {ort.__version__} with CUDAExecutionProvider ({', '.join(providers)})"
    return False, (f"onnxruntime {ort.__version__} is the CPU build (providers: {', '.join(providers)}); "
                   "onnxruntime-gpu is not installed and there is no network to install it")


def step_peaks(ctx: Ctx) -> None:
    import torch

    dev, sz = ctx.device, ctx.sizes
    n = sz.copy_mib * 2**20 // 4
    src = torch.empty(n, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = ctx.bench(lambda s=src, d=dst: d.copy_(s), max(1.0, 4 * sz.time_s))
    gbps = 2 * n * 4 / t["median_s"] / 1e9
    ctx.report.peaks["copy_gbps"] = gbps
    ctx.add("copy bandwidth", INFO, f"{gbps:.0f} GB/s",
            f"{sz.copy_mib} MiB fp32 device-to-device copy, bytes read + written, median of {t['reps']}",
            gbps=gbps, **t)
    del src, dst
    k = sz.matmul_n
    a = torch.randn(k, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(k, k, device=dev, dtype=torch.bfloat16)
    c = torch.empty(k, k, device=dev, dtype=torch.bfloat16)
    t = ctx.bench(lambda: torch.mm(a, b, out=c), max(1.0, 4 * sz.time_s))
    tflops = 2 * k**3 / t["median_s"] / 1e12
    ctx.report.peaks["bf16_matmul_tflops"] = tflops
    ctx.add("bf16 matmul", INFO, f"{tflops:.1f} TFLOP/s", f"{k}^3 on random data, median of {t['reps']}",
            tflops=tflops, **t)


# --- kernel cases: inputs and calls shared by the correctness and speed steps ---------------------------------
DT_NAMES = ("fp32", "fp16", "bf16")
#: Relative-error floors (‖out - ref64‖ / ‖ref64‖): a kernel passes when it is within 2x the eager chain's own
#: error in the same dtype, or under this floor (a wrong index or a missed row gives errors of order 1).
REL_FLOOR = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _mods(gen, dev, batch: int, d: int, n: int, dtype) -> list:
    """Per-sample modulation vectors as the model makes them: chunks (strided views) of one [B, n*D]."""
    import torch

    return list((0.5 * torch.randn(batch, n * d, device=dev, generator=gen)).to(dtype).chunk(n, dim=-1))


def _rope_table(gen, dev, length: int, dh: int):
    import torch

    ang = 3 * torch.randn(1, length, dh // 2, device=dev, generator=gen)
    return torch.stack((ang.cos(), ang.sin()), dim=-1)


def kernel_cases(gen, dev, dtype, sizes: Sizes, shape_set: str = "correct") -> list[tuple[str, str, list, Callable]]:
    """(kernel, shape label, inputs, call(ops, *inputs)) for every fused op at the given sizes.

    ``shape_set`` "correct": several shapes each (real, odd widths, wide); "real": the model's B; "bw": the
    large-batch bandwidth shape.
    """
    import torch

    cases = []
    if shape_set == "correct":
        adaln, qk = sizes.adaln_shapes, sizes.qk_shapes
    else:
        from fluxmusic.config import get_config

        cfg = get_config(sizes.config)
        b = sizes.batch if shape_set == "real" else sizes.bw_batch
        length = sizes.grid[0] * sizes.grid[1] + sizes.txt_len
        adaln, qk = ((b, length, cfg.hidden_size),), ((b, length, cfg.num_heads, cfg.head_dim),)
    for b, length, d in adaln:
        label = f"B{b} L{length} D{d}"
        x = (3 * torch.randn(b, length, d, device=dev, generator=gen) + 1).to(dtype)
        y = torch.randn(b, length, d, device=dev, generator=gen).to(dtype)
        shift, scale = _mods(gen, dev, b, d, 2, dtype)
        gate, shift3, scale3 = _mods(gen, dev, b, d, 3, dtype)
        cases.append(("layernorm_modulate", label, [x, shift, scale], lambda o, *a: o.layernorm_modulate(*a)))
        cases.append(("gated_residual", label, [x, gate, y], lambda o, *a: o.gated_residual(*a)))
        cases.append(("gated_residual_modulate", label, [x, gate, y, shift3, scale3],
                      lambda o, *a: o.gated_residual_modulate(*a)))
    for i, (b, length, h, dh) in enumerate(qk):
        # The second correctness shape uses the single-stream layout: qkv a slice of linear1's wider output.
        wide = shape_set == "correct" and i == 1
        extra = 4 * h * dh if wide else 0
        full = torch.randn(b, length, 3 * h * dh + extra, device=dev, generator=gen).to(dtype)
        qkv = full[..., : 3 * h * dh] if wide else full
        qs = (torch.rand(dh, device=dev, generator=gen) + 0.5).to(dtype)
        ks = (torch.rand(dh, device=dev, generator=gen) + 0.5).to(dtype)
        rope = _rope_table(gen, dev, length, dh)

        def call(o, qkv_, qs_, ks_, rope=rope, h=h):
            return o.qk_rmsnorm_rope(qkv_, qs_, ks_, rope, h)

        label = f"B{b} L{length} H{h} Dh{dh}{' strided' if wide else ''}"
        cases.append(("qk_rmsnorm_rope", label, [qkv, qs, ks], call))
    return cases


def kernel_names() -> list[str]:
    """Every op the Triton op set replaces (so a kernel added later without a check case shows up as FAIL)."""
    from fluxmusic.kernels import TRITON_OPS

    from fluxmusic.ops import REFERENCE_OPS

    return [f.name for f in dataclasses.fields(TRITON_OPS)
            if f.name != "name" and getattr(TRITON_OPS, f.name) is not getattr(REFERENCE_OPS, f.name)]


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _grads(call, ops, inputs: list, weights: list, cast=None) -> list:
    """Gradients of sum(w_i * out_i) w.r.t. every floating input, on fresh contiguous leaves."""
    leaves = [(t.detach().to(cast) if cast else t.detach()).clone().requires_grad_() for t in inputs]
    outs = _as_tuple(call(ops, *leaves))
    sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights)).backward()
    return [t.grad for t in leaves]


def step_kernels_correct(ctx: Ctx) -> None:
    import torch
    from fluxmusic.kernels import TRITON_OPS

    from fluxmusic.ops import REFERENCE_OPS

    dev = ctx.device
    names = kernel_names()
    seen: set[str] = set()
    with strict_fp32():
        for dt_name in DT_NAMES:
            dtype = _dtype(dt_name)
            gen = torch.Generator(device=dev).manual_seed(1)
            for kname, label, inputs, call in kernel_cases(gen, dev, dtype, ctx.sizes):
                seen.add(kname)
                if not ctx.fits(f"{kname} {dt_name} {label}", 2.0):
                    continue
                with torch.no_grad():
                    eager = _as_tuple(call(REFERENCE_OPS, *inputs))
                    poison_allocator(eager)
                    got = _as_tuple(call(TRITON_OPS, *inputs))
                    ref64 = _as_tuple(call(REFERENCE_OPS, *[t.double() for t in inputs]))
                fk = max(rel_err(g, r) for g, r in zip(got, ref64))
                fe = max(rel_err(e, r) for e, r in zip(eager, ref64))
                dmax = max((g.float() - e.float()).abs().max().item() for g, e in zip(got, eager))
                wg = torch.Generator(device=dev).manual_seed(2)
                weights = [torch.randn(o.shape, device=dev, generator=wg) for o in eager]
                gk = _grads(call, TRITON_OPS, inputs, weights)
                ge = _grads(call, REFERENCE_OPS, inputs, weights)
                g64 = _grads(call, REFERENCE_OPS, inputs, weights, cast=torch.float64)
                bk = max(rel_err(a, r) for a, r in zip(gk, g64))
                be = max(rel_err(a, r) for a, r in zip(ge, g64))
                floor = REL_FLOOR[dt_name]
                ok = fk <= max(2 * fe, floor) and bk <= max(2 * be, floor)
                ctx.check(
                    f"{kname} {dt_name} {label}", ok,
                    f"fwd rel {fk:.1e} (eager {fe:.1e}), bwd rel {bk:.1e} (eager {be:.1e}), max|kernel-eager| "
                    f"{dmax:.1e}",
                    f"rel to fp64 <= max(2x eager, {floor:g})",
                    fwd_rel=fk, fwd_rel_eager=fe, bwd_rel=bk, bwd_rel_eager=be, max_abs_vs_eager=dmax,
                )
    for k in names:
        if k not in seen:
            ctx.check(f"{k}", False, "no correctness case covers this kernel", "every kernel in kernels/")


def poison_allocator(like: tuple) -> None:
    """Free NaN-filled blocks of the outputs' sizes just before a kernel runs: torch's caching allocator hands
    them to the kernel's outputs, so an element the kernel never writes reads as NaN and fails the check."""
    import torch

    blocks = [torch.full_like(o, float("nan")) for o in like]
    del blocks


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 checks mean fp32: no TF32 in matmuls or convolutions while inside."""
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def _randomised_qk_scales(model) -> None:
    """Random QK norm scales: all-ones would hide a swapped q/k scale."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.scale"):
                p.uniform_(0.5, 1.5)


def step_model_kernels(ctx: Ctx) -> None:
    import torch
    from fluxmusic.kernels import disable_kernels, enable_kernels

    from fluxmusic.config import get_config
    from fluxmusic.model import FluxMusicTransformer

    dev = ctx.device
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = FluxMusicTransformer(cfg).to(dev)
    _randomised_qk_scales(model)
    gen = torch.Generator(device=dev).manual_seed(3)
    x = torch.randn(3, 24, cfg.in_channels, device=dev, generator=gen)
    t = torch.rand(3, device=dev, generator=gen)
    txt = torch.randn(3, 11, cfg.context_in_dim, device=dev, generator=gen)
    y = torch.randn(3, cfg.vec_in_dim, device=dev, generator=gen)
    rope = model.rope_for(11, 4, 6)

    def run():
        model.zero_grad()
        out = model(x, t, txt, y, rope=rope)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with strict_fp32():
        disable_kernels(model)
        want, want_g = run()
        if not enable_kernels(model, force=not ctx.cuda):
            ctx.add("tiny transformer fp32", SKIP, "", "kernels could not be enabled (triton missing?)")
            return
        got, got_g = run()
    d_out = (got - want).abs().max().item()
    g_rel = {n: rel_err(g, want_g[n]) for n, g in got_g.items()}
    worst = max(g_rel, key=g_rel.get)
    ctx.check("tiny transformer fp32 forward", d_out <= 1e-4, f"max|on-off| {d_out:.1e}", "<= 1e-4 (as on CPU)",
              max_abs=d_out)
    ctx.check("tiny transformer fp32 grads", g_rel[worst] <= 1e-4,
              f"worst param rel {g_rel[worst]:.1e} ({worst}), {len(g_rel)} params", "rel <= 1e-4",
              worst=worst, rel=g_rel[worst])
    # bf16: kernels must not be less accurate than the eager chain, against the fp32 output.
    model = model.to(torch.bfloat16)
    args = (x.bfloat16(), t.bfloat16(), txt.bfloat16(), y.bfloat16())
    with torch.no_grad():
        disable_kernels(model)
        e = rel_err(model(*args, rope=rope), want)
        enable_kernels(model, force=not ctx.cuda)
        k = rel_err(model(*args, rope=rope), want)
    ctx.check("tiny transformer bf16 forward", k <= max(2 * e, REL_FLOOR["bf16"]),
              f"rel to fp32: kernels {k:.1e}, eager {e:.1e}", f"<= max(2x eager, {REL_FLOOR['bf16']:g})",
              kernels=k, eager=e)


def find_testdata(explicit: Path | None) -> Path | None:
    """The official parity file: --testdata, else shared/testdata inside or beside the checkout."""
    if explicit is not None:
        return explicit if explicit.is_file() else None
    for base in (ROOT / "shared" / "testdata", ROOT.parent / "shared" / "testdata", ROOT / ".gpu_data"):
        if (base / "official_tiny_a.npz").is_file():
            return base / "official_tiny_a.npz"
    return None


def load_official_case(path: Path, device) -> dict:
    """The official parity case (as tests/conftest.py reads it): meta, weights and arrays on ``device``."""
    import numpy as np
    import torch

    z = np.load(path)
    meta = json.loads(bytes(z["meta_json"]))
    state = {k[len("state."):]: torch.from_numpy(z[k]).to(device) for k in z.files if k.startswith("state.")}
    arrays = {k: torch.from_numpy(z[k]).to(device) for k in z.files if not k.startswith("state.") and k != "meta_json"}
    return {"meta": meta, "state": state, **arrays}


def step_model_parity(ctx: Ctx) -> None:
    import torch
    from fluxmusic.kernels import enable_kernels, triton_available

    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.flow import Conditioning, cfg_velocity, sample
    from fluxmusic.model import FluxMusicTransformer

    if ctx.testdata is None:
        ctx.add("official parity", SKIP, "", "official_tiny_a.npz not found: pass --testdata PATH (docs/gpu.md)")
        return
    c = load_official_case(ctx.testdata, ctx.device)
    meta = c["meta"]
    h, w = c["latent"].shape[2] // 2, c["latent"].shape[3] // 2
    modes = ["kernels off"] + (["kernels on"] if triton_available() else [])
    for mode in modes:
        model = FluxMusicTransformer(FluxMusicConfig.from_dict(meta["config"])).to(ctx.device)
        model.load_state_dict(c["state"], strict=True)
        model.eval()
        if mode == "kernels on":
            enable_kernels(model, force=not ctx.cuda)
        with strict_fp32(), torch.no_grad():
            out = model(c["x"], c["t"], c["txt"], c["y"], img_ids=c["img_ids"], txt_ids=c["txt_ids"])
            cached = model(c["x"], c["t"], c["txt"], c["y"], rope=model.rope_for(c["txt"].shape[1], h, w))
            rope = model.rope_for(meta["txt_len"], h, w)
            g = torch.full((c["x"].shape[0],), float(meta["cfg"]), device=ctx.device)
            v = cfg_velocity(model, Conditioning(c["txt"], c["y"]), Conditioning(c["null_txt"], c["null_y"]), g, rope)
            final = sample(v, c["x"], meta["steps"])
        d1 = (out - c["out"]).abs().max().item()
        d2 = (cached - c["out"]).abs().max().item()
        d3 = (final - c["euler_final"]).abs().max().item()
        ctx.check(f"official forward, ids path, {mode}", d1 <= 1e-5, f"max|diff| {d1:.1e}", "<= 1e-5", max_abs=d1)
        ctx.check(f"official forward, cached RoPE, {mode}", d2 <= 1e-5, f"max|diff| {d2:.1e}", "<= 1e-5",
                  max_abs=d2)
        ctx.check(f"official Euler CFG sampler ({meta['steps']} steps), {mode}", d3 <= 1e-4, f"max|diff| {d3:.1e}",
                  "<= 1e-4", max_abs=d3)


# bytes each fused op must move at least (every input read once, every output written once)
def min_bytes(kname: str, inputs: list) -> int:
    x = inputs[0]
    n, es = x.numel(), x.element_size()
    if kname == "layernorm_modulate":
        return 2 * n * es
    if kname == "gated_residual":
        return 3 * n * es
    if kname == "gated_residual_modulate":
        return 4 * n * es
    if kname == "qk_rmsnorm_rope":  # q, k read from qkv and written once (v is a view); the fp32 table once
        b, length, _ = x.shape
        dh = inputs[1].numel()
        return (4 * n // 3) * es + length * dh * 4
    raise ValueError(f"no byte count for {kname}")


def step_kernels_speed(ctx: Ctx) -> None:
    import torch
    from fluxmusic.kernels import TRITON_OPS

    from fluxmusic.ops import REFERENCE_OPS

    dev, sz = ctx.device, ctx.sizes
    peak = ctx.report.peaks.get("copy_gbps")
    gen = torch.Generator(device=dev).manual_seed(4)
    real = {k: (lab, inp, call) for k, lab, inp, call in kernel_cases(gen, dev, torch.bfloat16, sz, "real")}
    bw = {k: (lab, inp, call) for k, lab, inp, call in kernel_cases(gen, dev, torch.bfloat16, sz, "bw")}
    with torch.no_grad():
        for kname in real:
            if not ctx.fits(kname, 4 * sz.time_s + 1):
                continue
            res = {}
            for tag, table in (("real", real), ("bw", bw)):
                lab, inp, call = table[kname]
                te = ctx.bench(lambda c=call, i=inp: c(REFERENCE_OPS, *i), sz.time_s)["median_s"]
                tk = ctx.bench(lambda c=call, i=inp: c(TRITON_OPS, *i), sz.time_s)["median_s"]
                nbytes = min_bytes(kname, inp)
                res[tag] = dict(shape=lab, eager_s=te, kernel_s=tk, speedup=te / tk, gbps=nbytes / tk / 1e9,
                                eager_gbps=nbytes / te / 1e9, bytes=nbytes)
            r, b = res["real"], res["bw"]
            frac = f" = {b['gbps'] / peak:.0%} of the copy peak" if peak else " (no copy peak measured)"
            ctx.add(kname, INFO,
                    f"{r['shape']}: eager {fmt_s(r['eager_s'])}, kernel {fmt_s(r['kernel_s'])} ({r['speedup']:.2f}x); "
                    f"{b['shape']}: {b['speedup']:.2f}x, {b['gbps']:.0f} GB/s{frac}",
                    "bf16; minimum bytes (inputs read once, outputs written once) / kernel time",
                    real=r, bandwidth=b, peak_gbps=peak, fraction_of_peak=(b["gbps"] / peak if peak else None))


def step_rope(ctx: Ctx) -> None:
    import torch
    import torch.nn.functional as F
    from fluxmusic.kernels import TRITON_OPS

    from fluxmusic.config import get_config
    from fluxmusic.ops import REFERENCE_OPS

    dev, sz = ctx.device, ctx.sizes
    length = sz.grid[0] * sz.grid[1] + sz.txt_len
    gen = torch.Generator(device=dev).manual_seed(5)
    for name in sz.rope_configs:
        if not ctx.fits(name, 4 * sz.time_s + 1):
            continue
        cfg = get_config(name)
        h, dh = cfg.num_heads, cfg.head_dim
        qkv = torch.randn(sz.batch, length, 3 * h * dh, device=dev, generator=gen).to(torch.bfloat16)
        qs = torch.rand(dh, device=dev, generator=gen).to(torch.bfloat16) + 0.5
        ks = torch.rand(dh, device=dev, generator=gen).to(torch.bfloat16) + 0.5
        rope = _rope_table(gen, dev, length, dh)
        with torch.no_grad():
            q, k, v = TRITON_OPS.qk_rmsnorm_rope(qkv, qs, ks, rope, h)
            t_attn = ctx.bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), sz.time_s)["median_s"]
            args = (qkv, qs, ks, rope, h)
            t_fused = ctx.bench(lambda a=args: TRITON_OPS.qk_rmsnorm_rope(*a), sz.time_s)["median_s"]
            t_eager = ctx.bench(lambda a=args: REFERENCE_OPS.qk_rmsnorm_rope(*a), sz.time_s)["median_s"]
        flops = 4 * sz.batch * h * length * length * dh
        frac = t_fused / t_attn
        ctx.add(f"{name}: B{sz.batch} L{length} H{h} Dh{dh} bf16", INFO,
                f"fused RMSNorm+RoPE {fmt_s(t_fused)} = {frac:.1%} of SDPA {fmt_s(t_attn)} "
                f"({flops / t_attn / 1e12:.1f} TFLOP/s); eager RMSNorm+RoPE {fmt_s(t_eager)}",
                f"a RoPE-in-load attention kernel could save at most {frac:.1%} of attention time",
                fused_s=t_fused, sdpa_s=t_attn, eager_s=t_eager, fraction=frac, sdpa_tflops=flops / t_attn / 1e12)


def _small_inputs(ctx: Ctx, cfg, dtype):
    import torch

    sz, dev = ctx.sizes, ctx.device
    gen = torch.Generator(device=dev).manual_seed(6)
    n_music = sz.grid[0] * sz.grid[1]
    x = torch.randn(sz.batch, n_music, cfg.in_channels, device=dev, generator=gen)
    t = torch.rand(sz.batch, device=dev, generator=gen)
    txt = torch.randn(sz.batch, sz.txt_len, cfg.context_in_dim, device=dev, generator=gen)
    y = torch.randn(sz.batch, cfg.vec_in_dim, device=dev, generator=gen)
    return [a.to(dtype) for a in (x, t, txt, y)]


def _small_model(ctx: Ctx):
    """The `small` (or tiny) transformer, random weights, bf16 on the device, with its fp32 output as reference."""
    import torch

    from fluxmusic.config import get_config
    from fluxmusic.model import FluxMusicTransformer

    if "small_model" in ctx.cache:
        return ctx.cache["small_model"]
    cfg = get_config(ctx.sizes.config)
    torch.manual_seed(0)
    with torch.device(ctx.device):  # initialise on the device: 142 M parameters init in ms there
        model = FluxMusicTransformer(cfg).eval()
    inputs = _small_inputs(ctx, cfg, torch.float32)
    rope = model.rope_for(ctx.sizes.txt_len, *ctx.sizes.grid)
    with strict_fp32(), torch.no_grad():
        ref = model(*inputs, rope=rope).float()
    model = model.to(torch.bfloat16)
    flops = transformer_flops(cfg, ctx.sizes.batch, ctx.sizes.txt_len, ctx.sizes.grid[0] * ctx.sizes.grid[1])
    ctx.cache["small_model"] = (model, [a.to(torch.bfloat16) for a in inputs], rope, ref, flops)
    return ctx.cache["small_model"]


def _forward_row(ctx: Ctx, variant: str, seconds: float, err: float, eager_err: float | None, flops: int,
                 extra: str = "", **data: Any) -> None:
    peak = ctx.report.peaks.get("bf16_matmul_tflops")
    tflops = flops / seconds / 1e12
    frac = f" = {tflops / peak:.1%} of the bf16 matmul peak" if peak else ""
    if eager_err is None:  # the baseline: bf16 rounding of a random-weight model, not a pass/fail figure
        status = INFO if math.isfinite(err) else FAIL
        limit = "baseline for the variants below (finite)"
    else:
        status = PASS if err <= max(2 * eager_err, REL_FLOOR["bf16"]) else FAIL
        limit = f"rel to fp32 <= max(2x eager, {REL_FLOOR['bf16']:g})"
    ctx.add(variant, status,
            f"{fmt_s(seconds)} per forward, {flops / seconds / 1e9:.0f} GFLOP/s{frac}; rel to fp32 {err:.1e}{extra}",
            limit, seconds=seconds, gflops=flops / seconds / 1e9, fraction_of_peak=(tflops / peak if peak else None),
            rel_to_fp32=err, **data)


def step_transformer(ctx: Ctx) -> None:
    import torch
    from fluxmusic.kernels import disable_kernels, enable_kernels, triton_available

    sz, dev = ctx.sizes, ctx.device
    model, inputs, rope, ref, flops = _small_model(ctx)
    ctx.add("shape", INFO, f"{sz.config}: B={sz.batch}, {sz.grid[0] * sz.grid[1]} music + {sz.txt_len} text "
            f"tokens, bf16", f"{flops / 1e9:.1f} GFLOP per forward (matmuls + attention)", flops=flops)
    budget = max(4 * sz.time_s, 1.0)

    def fwd():
        return model(*inputs, rope=rope)

    with torch.no_grad():
        disable_kernels(model)
        e_out = fwd()
        eager_err = rel_err(e_out, ref)
        t = ctx.bench(fwd, budget)
        _forward_row(ctx, "eager", t["median_s"], eager_err, None, flops, **t)
        ctx.cache["eager_forward_s"] = t["median_s"]
        if triton_available() and ctx.fits("kernels on", 3 * budget):
            enable_kernels(model, force=not ctx.cuda)
            k_err = rel_err(fwd(), ref)
            t = ctx.bench(fwd, budget)
            _forward_row(ctx, "kernels on", t["median_s"], k_err, eager_err, flops,
                         f"; {ctx.cache['eager_forward_s'] / t['median_s']:.2f}x eager", **t)
        for mode in ("kernels on", "eager"):
            if mode == "kernels on" and not triton_available():
                continue
            item = f"CUDA graph, {mode}"
            if not ctx.cuda:
                ctx.add(item, SKIP, "", "CUDA graphs need a CUDA device")
                continue
            if not ctx.fits(item, 3 * budget):
                continue
            if mode == "kernels on":
                enable_kernels(model)
            else:
                disable_kernels(model)
            graph, out = capture_graph(fwd, dev)
            g_err = rel_err(out, ref)
            t = ctx.bench(graph.replay, budget)
            _forward_row(ctx, item, t["median_s"], g_err, eager_err, flops,
                         f"; {ctx.cache['eager_forward_s'] / t['median_s']:.2f}x eager", **t)
            del graph, out
        disable_kernels(model)


def capture_graph(fn: Callable[[], Any], device):
    """Warm ``fn`` up on a side stream (as torch's CUDA-graph docs ask), then capture one call; returns
    (graph, its static output)."""
    import torch

    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize(device)
    return graph, out


def step_compile(ctx: Ctx) -> None:
    import torch
    from fluxmusic.kernels import disable_kernels, enable_kernels, triton_available

    sz, dev = ctx.sizes, ctx.device
    model, inputs, rope, ref, flops = _small_model(ctx)
    with torch.no_grad():
        disable_kernels(model)
        eager_err = rel_err(model(*inputs, rope=rope), ref)
    eager_s = ctx.cache.get("eager_forward_s")
    variants = [("reference ops", False)] + ([("kernels on (custom ops opaque)", True)] if triton_available() else [])
    compile_s = None
    for label, kernels in variants:
        item = f"torch.compile ({ctx.compile_backend}), {label}"
        # The first compile's duration is unknown (~1 min for `small` with inductor): start it only with half
        # the step's budget left; a later one needs 1.3x the first (the watchdog guards the run either way).
        if not ctx.fits(item, 1.3 * compile_s if compile_s else ctx.step_budget_s / 2):
            continue
        torch._dynamo.reset()
        if kernels:
            enable_kernels(model, force=not ctx.cuda)
        else:
            disable_kernels(model)
        compiled = torch.compile(model, backend=ctx.compile_backend)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = compiled(*inputs, rope=rope)
            sync(dev)
            compile_s = time.perf_counter() - t0
            err = rel_err(out, ref)
            t = ctx.bench(lambda c=compiled: c(*inputs, rope=rope), max(4 * sz.time_s, 1.0))
        speed = f"; {eager_s / t['median_s']:.2f}x eager" if eager_s else ""
        _forward_row(ctx, item, t["median_s"], err, eager_err, flops, f"{speed}; first call {compile_s:.0f} s",
                     compile_s=compile_s, **t)
    torch._dynamo.reset()
    disable_kernels(model)


# --- generation ------------------------------------------------------------------------------------------------
class StageClock:
    """Per-stage seconds of generations, from wrappers that synchronise the device around each call."""

    def __init__(self, device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.seconds[stage] += time.perf_counter() - t0
            self.calls[stage] += 1
            return out

        return timed


@contextlib.contextmanager
def instrument(pipe, clock: StageClock) -> Iterator[StageClock]:
    """Route the pipeline's stage calls through ``clock``: text encoders, transformer, VAE decoder, vocoder.

    Only attributes that exist are wrapped (the backend interface and the text encoders' functions), so a
    pipeline that has moved on still runs; a stage it no longer exposes is simply not broken out.
    """
    patched: list[tuple[object, str, bool, object]] = []

    def patch(obj, attr: str, stage: str) -> None:
        fn = getattr(obj, attr, None)
        if obj is None or not callable(fn):
            return
        patched.append((obj, attr, attr in vars(obj), vars(obj).get(attr)))
        setattr(obj, attr, clock.wrap(stage, fn))

    be = pipe.backend
    for attr, stage in (("velocity", "transformer"), ("sample_euler", "transformer"), ("vae_decode", "vae"),
                        ("vocode", "vocoder"), ("t5_encode", "text"), ("clap_encode", "text")):
        patch(be, attr, stage)
    enc = getattr(pipe, "encoders", None)
    for attr in ("t5_fn", "clap_fn"):
        patch(enc, attr, "text")
    try:
        yield clock
    finally:
        for obj, attr, had, old in reversed(patched):
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)


def generate_once(pipe, prompt: str, steps: int | None, options: dict):
    kwargs = dict(options)
    if steps is not None:
        kwargs["steps"] = steps
    return pipe(prompt, duration=DURATION, seed=0, **kwargs)


def time_generation(ctx: Ctx, pipe, tag: str, options: dict, reps: int | None = None) -> dict:
    """Median seconds per 10.24 s clip (fresh prompt each time: the prompt cache must not hide the encoders),
    then one instrumented clip for the per-stage split."""
    sz, dev = ctx.sizes, ctx.device
    reps = reps or sz.gen_reps
    totals = []
    for i in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        res = generate_once(pipe, f"{PROMPT} {tag} {i}", sz.gen_steps, options)
        sync(dev)
        totals.append(time.perf_counter() - t0)
    clock = StageClock(dev)
    with instrument(pipe, clock):
        t0 = time.perf_counter()
        res = generate_once(pipe, f"{PROMPT} {tag} staged", sz.gen_steps, options)
        sync(dev)
        staged_total = time.perf_counter() - t0
    audio = res.audio[0]
    import numpy as np

    finite = bool(np.isfinite(audio).all())
    stages = {k: round(v, 5) for k, v in clock.seconds.items()}
    stages["other"] = round(max(0.0, staged_total - sum(clock.seconds.values())), 5)
    return {"clip_s": statistics.median(totals), "reps": reps, "stages_s": stages, "calls": dict(clock.calls),
            "staged_total_s": staged_total, "samples": int(audio.shape[-1]), "finite": finite,
            "sample_rate": res.sample_rate}


def _stage_text(r: dict, flops_per_eval: int | None) -> str:
    parts = [f"{k} {fmt_s(v)}" for k, v in r["stages_s"].items()]
    n = r["calls"].get("transformer", 0)
    if n and flops_per_eval:
        per = r["stages_s"]["transformer"] / n
        parts.append(f"{n} evals x {fmt_s(per)} = {flops_per_eval / per / 1e12:.2f} TFLOP/s")
    return "; ".join(parts)


def _backend_variants(ctx: Ctx) -> list[tuple[str, dict, bool]]:
    """(label, from_pretrained options, enable kernels) for every torch variant, then onnxruntime when it can."""
    from fluxmusic.kernels import triton_available

    v = [("torch fp32", {"dtype": "fp32"}, False), ("torch bf16", {"dtype": "bf16"}, False)]
    if triton_available():
        v.append(("torch bf16 + kernels", {"dtype": "bf16"}, True))
    return v


def _load_pipe(ctx: Ctx, model_dir: Path, opts: dict, kernels: bool):
    from fluxmusic.kernels import enable_kernels

    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(model_dir, device=str(ctx.device), **opts)
    if kernels and not enable_kernels(pipe.backend.transformer, force=not ctx.cuda):
        raise RuntimeError("kernels could not be enabled on the pipeline's transformer")
    return pipe


def _free(ctx: Ctx) -> None:
    import gc

    import torch

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def _gen_flops(pipe) -> int | None:
    try:
        geo, cfg = pipe.geometry, pipe.backend.transformer_config
        gh, gw = geo.grid(geo.latent_frames(DURATION))
        return transformer_flops(cfg, 2, pipe.index.t5_max_length, gh * gw)  # one CFG evaluation: batch 2
    except Exception:  # a backend without a transformer config: no FLOP figure, the times still stand
        return None


def run_generations(ctx: Ctx, model_dir: Path, label: str, keep_best: str | None = None) -> None:
    """Every backend variant on ``model_dir``: load, warm up (2 steps), time clips, split stages."""
    variants = _backend_variants(ctx)
    for name, opts, kernels in variants:
        item = f"{label}, {name}"
        if not ctx.fits(item, 6 + 2 * ctx.cache.get(f"{label} clip_s", 1.0) * (ctx.sizes.gen_reps + 2)):
            continue
        t0 = time.perf_counter()
        pipe = _load_pipe(ctx, model_dir, opts, kernels)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        generate_once(pipe, f"{PROMPT} warm-up", 2, {})
        sync(ctx.device)
        warm_s = time.perf_counter() - t0
        r = time_generation(ctx, pipe, name, {})
        ctx.cache[f"{label} clip_s"] = r["clip_s"]
        ok = r["finite"] and r["samples"] == round(DURATION * r["sample_rate"])
        ctx.add(item, PASS if ok else FAIL,
                f"{fmt_s(r['clip_s'])} per {DURATION} s clip ({DURATION / r['clip_s']:.1f}x real time); "
                + _stage_text(r, _gen_flops(pipe)),
                f"load {load_s:.1f} s, warm-up {warm_s:.1f} s; audio finite and {DURATION} s long",
                load_s=load_s, warmup_s=warm_s, **r)
        if keep_best and (kernels or "best_pipe" not in ctx.cache) and "bf16" in name:
            ctx.cache.pop("best_pipe", None)
            ctx.cache["best_pipe"] = (name, pipe)
        else:
            del pipe
        _free(ctx)
    run_onnx_generation(ctx, model_dir, label)


def run_onnx_generation(ctx: Ctx, model_dir: Path, label: str) -> None:
    """onnxruntime with the CUDA provider (CPU provider in a dry run), after exporting the model directory."""
    item = f"{label}, onnxruntime"
    if not ctx.onnx:
        ctx.add(item, SKIP, "", "--no-onnx")
        return
    if ctx.cuda:
        ok, why = onnxruntime_gpu_status()
        if not ok:
            ctx.add(item, SKIP, "", why)
            return
    if missing_packages(("onnx", "onnxruntime", "onnxscript")):
        ctx.add(item, SKIP, "", f"needs {', '.join(missing_packages(('onnx', 'onnxruntime', 'onnxscript')))}")
        return
    # the export runs on the CPU: ~1-2 min for `small` on 16 cores (a tiny model takes seconds on an idle CPU)
    if not ctx.fits(item, 20 if ctx.sizes.config == "tiny" else 120):
        return
    from fluxmusic.export.onnx_export import export_onnx

    from fluxmusic.pipeline import FluxMusicPipeline

    onnx_dir = ctx.work / f"onnx-{label.replace(' ', '_')}"
    t0 = time.perf_counter()
    if not (onnx_dir / "manifest.json").is_file():
        export_onnx(model_dir, onnx_dir, progress=None)
    export_s = time.perf_counter() - t0
    provider = "CUDAExecutionProvider" if ctx.cuda else "CPUExecutionProvider"
    pipe = FluxMusicPipeline.from_pretrained(model_dir, device=str(ctx.device), backend="onnx", onnx_dir=onnx_dir,
                                             providers=[provider])
    generate_once(pipe, f"{PROMPT} warm-up", 2, {})
    r = time_generation(ctx, pipe, "onnx", {})
    ok = r["finite"] and r["samples"] == round(DURATION * r["sample_rate"])
    ctx.add(f"{item} ({provider})", PASS if ok else FAIL,
            f"{fmt_s(r['clip_s'])} per {DURATION} s clip; " + _stage_text(r, _gen_flops(pipe)),
            f"export {export_s:.0f} s", export_s=export_s, **r)
    del pipe
    _free(ctx)


def small_model_dir(ctx: Ctx) -> Path:
    """`small` with random weights (tiny in a dry run), built once per work directory."""
    from fluxmusic.tiny import build_random_model_dir, build_tiny_model_dir

    path = ctx.work / f"model-{ctx.sizes.config}"
    if not (path / "model_index.json").is_file():
        if path.exists():
            import shutil

            shutil.rmtree(path)
        t0 = time.perf_counter()
        if ctx.sizes.config == "tiny":
            build_tiny_model_dir(path)
        else:
            build_random_model_dir(path, ctx.sizes.config)
        ctx.add("build model directory", INFO, f"{time.perf_counter() - t0:.1f} s", str(path))
    return path


def step_generation_small(ctx: Ctx) -> None:
    run_generations(ctx, small_model_dir(ctx), ctx.sizes.config, keep_best="small")


def sampling_variants(ctx: Ctx, defaults: dict) -> dict[str, dict]:
    """The official sampler, the bundled default's Heun 16 / shift 3, every other solver the flow module has,
    and any extra variants given with --sampling (JSON: name -> pipeline keyword arguments)."""
    from fluxmusic.flow import SOLVERS

    v = {
        "official: Euler 50, guidance 7, neg. 'low quality, gentle'": dict(
            steps=50, solver="euler", guidance=7.0, shift=None, negative_prompt="low quality, gentle"),
        "Heun 16, shift 3 (the bundled default's choice)": dict(steps=16, solver="heun", shift=3.0),
    }
    for s in SOLVERS:
        if s not in ("euler", "heun"):
            v[f"{s} 16, shift 3"] = dict(steps=16, solver=s, shift=3.0)
    v.update(ctx.sampling)
    return v


def step_sampling(ctx: Ctx) -> None:
    if "best_pipe" not in ctx.cache:
        ctx.add("sampling options", SKIP, "", "no pipeline from generation.small (skipped or failed)")
        return
    name, pipe = ctx.cache["best_pipe"]
    flops = _gen_flops(pipe)
    for label, opts in sampling_variants(ctx, pipe.defaults).items():
        if ctx.sizes.gen_steps is not None and "steps" in opts:
            opts = {**opts, "steps": ctx.sizes.gen_steps}
        steps = ctx.sizes.gen_steps or opts.get("steps") or pipe.defaults.get("steps", 50)
        evals = 2 * steps if opts.get("solver", pipe.defaults.get("solver")) == "heun" else steps
        per_eval = ctx.cache.get("sampling eval_s", 0.05)
        if not ctx.fits(label, 5 + 2 * per_eval * evals):  # one timed clip and one split into stages
            continue
        try:
            r = time_generation(ctx, pipe, label, opts, reps=1)
        except TypeError as e:  # an option this pipeline does not take yet
            ctx.add(label, SKIP, "", f"pipeline does not take these options: {e}")
            continue
        n = r["calls"].get("transformer", 0)
        if n:
            ctx.cache["sampling eval_s"] = r["stages_s"]["transformer"] / n
        ok = r["finite"]
        ctx.add(f"{label} [{name}]", PASS if ok else FAIL,
                f"{fmt_s(r['clip_s'])} per clip; " + _stage_text(r, flops), "audio finite", options=opts, **r)
    ctx.cache.pop("best_pipe", None)
    _free(ctx)


def step_generation_default(ctx: Ctx) -> None:
    from fluxmusic.pipeline import default_model_dir

    run_generations(ctx, default_model_dir(), "bundled default")


GEN_NEEDS = ("transformers", "tokenizers", "safetensors", "diffusers")
STEPS: list[Step] = [
    Step("env", "device, versions, TensorRT / onnxruntime-gpu", 10, step_env),
    Step("peaks", "measured ceilings: copy bandwidth, bf16 matmul", 15, step_peaks),
    Step("kernels.correct", "Triton kernels vs torch references, fp32/fp16/bf16, fwd+bwd", 70, step_kernels_correct,
         ("triton",)),
    Step("model.kernels", "tiny transformer, kernels on vs off", 15, step_model_kernels, ("triton",)),
    Step("model.parity", "official parity data on the device, fp32 limits", 15, step_model_parity, ("numpy",)),
    Step("kernels.speed", "each kernel vs its eager chain; bandwidth vs copy peak", 30, step_kernels_speed,
         ("triton",)),
    Step("rope", "fused RMSNorm+RoPE as a fraction of SDPA", 10, step_rope, ("triton",)),
    Step("transformer", "`small` forward B=2 1024+256 bf16: eager, kernels, CUDA graphs", 30, step_transformer),
    Step("generation.small", "whole 10.24 s generation, `small` random weights, per backend", 85,
         step_generation_small, GEN_NEEDS),
    Step("sampling", "per sampling option, `small`", 45, step_sampling, GEN_NEEDS),
    Step("generation.default", "whole 10.24 s generation, bundled default, per backend", 25,
         step_generation_default, GEN_NEEDS),
    Step("transformer.compile", "torch.compile of the `small` forward", 120, step_compile),
]


# ================================================================================================ running
def run_step(ctx: Ctx, step: Step, record: StepRecord, out_dir: Path) -> None:
    ctx.record = record
    missing = missing_packages(step.needs)
    if missing:
        record.status, record.reason = "skipped", f"needs {', '.join(missing)} (not installed here; docs/gpu.md)"
    elif ctx.budget.left_total() < step.budget_s:
        record.status = "skipped"
        record.reason = f"{ctx.budget.left_total():.0f} s left of the run, the step's budget is {step.budget_s:.0f} s"
    if record.status == "skipped":
        print(f"[{ctx.budget.elapsed():6.1f}s] {step.name}: skipped: {record.reason}", flush=True)
        write_report(ctx.report, out_dir)
        return
    print(f"[{ctx.budget.elapsed():6.1f}s] {step.name}: {step.title} (budget {step.budget_s:.0f} s)", flush=True)
    record.status = "running"
    write_report(ctx.report, out_dir)
    ctx.budget.begin_step(step.budget_s)
    ctx.step_budget_s = step.budget_s
    t0 = time.perf_counter()
    try:
        step.fn(ctx)
        record.status = "done"
    except Exception as e:
        record.status = "error"
        record.reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        tb = traceback.format_exc()
        ctx.add("exception", ERROR, record.reason, "", traceback=tb[-4000:])
        print(tb, file=sys.stderr, flush=True)
    record.elapsed_s = time.perf_counter() - t0
    if record.elapsed_s > step.budget_s and record.status == "done":
        record.reason = f"over its budget by {record.elapsed_s - step.budget_s:.0f} s"
    ctx.report.elapsed_s = ctx.budget.elapsed()
    write_report(ctx.report, out_dir)


def start_watchdog(rep: Report, out_dir: Path, hard_s: float) -> threading.Timer:
    """End the process at the hard limit (budget + grace), after writing the report with what was done: a
    compile or a hung kernel must not eat the rest of a short GPU lease."""

    def fire() -> None:
        running = [s for s in rep.steps if s.status == "running"]
        for s in running:
            s.status, s.reason = "killed", f"the run hit its hard limit of {hard_s:.0f} s inside this step"
        for s in rep.steps:
            if s.status == "pending":
                s.status, s.reason = "skipped", "not reached: the run hit its hard limit"
        rep.note = f"stopped by the watchdog at {hard_s:.0f} s"
        rep.elapsed_s = hard_s
        try:
            write_report(rep, out_dir)
        finally:
            # straight to fd 1: a library may have redirected sys.stdout (the ONNX exporter does), and
            # os._exit skips Python's buffers
            msg = (f"gpu_check: hard time limit {hard_s:.0f} s reached in "
                   f"{running[0].name if running else '?'}; report written to {out_dir}\n")
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os.write(1, msg.encode())
            os._exit(EXIT_OVERRAN)

    timer = threading.Timer(hard_s, fire)
    timer.daemon = True
    timer.start()
    return timer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See docs/gpu.md.")
    p.add_argument("--out", type=Path, help="directory for gpu_check.md and gpu_check.json")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default) or cpu (a dry run: needs --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes everywhere: a fast dry run of every step")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help="seconds for the whole run (default 470); every step's budget scales with it")
    p.add_argument("--only", default="", help="comma-separated step names to run (env is always run)")
    p.add_argument("--skip", default="", help="comma-separated step names to skip")
    p.add_argument("--config", default=None,
                   help="transformer config of the speed, RoPE and forward steps (default small; tiny with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="batch of those steps (default 2: one CFG evaluation)")
    p.add_argument("--testdata", type=Path, default=None, help="official_tiny_a.npz (default: shared/testdata)")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (model dirs, exports); default: temp")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor on cuda, aot_eager on cpu)")
    p.add_argument("--sampling", default="{}",
                   help='extra sampling variants, JSON {"name": {pipeline keyword: value}}')
    p.add_argument("--no-onnx", action="store_true",
                   help="skip the onnxruntime generations (their ONNX export runs on the CPU first)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)

    def names(s: str) -> set[str]:
        return {x.strip() for x in s.split(",") if x.strip()}

    args.only, args.skip = names(args.only), names(args.skip)
    known = {s.name for s in STEPS}
    for bad in (args.only | args.skip) - known:
        p.error(f"unknown step {bad!r}; steps: {', '.join(sorted(known))}")
    if not args.list and args.out is None:
        p.error("--out DIR is required")
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu runs only with --tiny (the real shapes would take hours on a CPU)")
    if args.config is not None:
        bootstrap_imports()
        from fluxmusic.config import CONFIGS

        if args.config not in CONFIGS:
            p.error(f"unknown --config {args.config!r}; allowed: {', '.join(CONFIGS)}")
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch {args.batch} must be >= 1")
    if not (args.budget > 0 and math.isfinite(args.budget)):
        p.error(f"--budget {args.budget} must be a positive number of seconds")
    try:
        args.sampling = json.loads(args.sampling)
        if not isinstance(args.sampling, dict) or not all(isinstance(v, dict) for v in args.sampling.values()):
            raise ValueError("not an object of objects")
    except ValueError as e:
        p.error(f"--sampling must be JSON like {{\"name\": {{\"steps\": 8}}}}: {e}")
    return args


def scaled_steps(budget_s: float) -> list[Step]:
    """The steps with their budgets scaled by ``budget_s`` / the default (a slower dry run gets more each)."""
    f = budget_s / DEFAULT_BUDGET_S
    return [dataclasses.replace(s, budget_s=s.budget_s * f) for s in STEPS]


def print_plan(budget_s: float, only: set[str], skip: set[str]) -> None:
    for step, why in plan_steps(scaled_steps(budget_s), budget_s, only or None, skip or None):
        needs = f" needs {', '.join(step.needs)}" if step.needs else ""
        print(f"{step.name:22s} {step.budget_s:5.0f} s  {'run' if not why else 'skip: ' + why}{needs}  {step.title}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print_plan(args.budget, args.only, args.skip)
        return EXIT_OK
    # Triton reads TRITON_INTERPRET when it is first imported: on the CPU the kernels run in its interpreter;
    # on a GPU a leftover TRITON_INTERPRET=1 (tests set it) would time numpy instead of the kernels.
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False); nothing "
              "measured, nothing written. A dry run on the CPU: --device cpu --tiny")
        return EXIT_NO_GPU
    bootstrap_imports()
    sizes = Sizes.tiny() if args.tiny else Sizes()
    if args.config:
        sizes = dataclasses.replace(sizes, config=args.config, rope_configs=(args.config,))
    if args.batch:
        sizes = dataclasses.replace(sizes, batch=args.batch)
    device = torch.device(args.device)
    rep = Report(args={k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()},
                 real_gpu=device.type == "cuda" and not args.tiny, budget_s=args.budget,
                 started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    only = (args.only | {"env"}) if args.only else None
    plan = plan_steps(scaled_steps(args.budget), args.budget, only, args.skip or None)
    rep.steps = [StepRecord(s.name, s.title, s.budget_s) for s, _ in plan]
    for rec, (_, why) in zip(rep.steps, plan):
        if why:
            rec.status, rec.reason = "skipped", why
    out_dir = args.out
    watchdog = start_watchdog(rep, out_dir, args.budget + HARD_GRACE_S)
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check-")))
        work.mkdir(parents=True, exist_ok=True)
        ctx = Ctx(device=device, sizes=sizes, budget=Budget(args.budget), report=rep, work=work,
                  testdata=find_testdata(args.testdata),
                  compile_backend=args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager"),
                  sampling=args.sampling, onnx=not args.no_onnx)
        print(f"gpu_check: {device} {'tiny' if args.tiny else 'real'} shapes, budget {args.budget:.0f} s, "
              f"writing {out_dir / MD_NAME}", flush=True)
        for (step, why), rec in zip(plan, rep.steps):
            if not why:
                run_step(ctx, step, rec, out_dir)
        ctx.cache.clear()
    watchdog.cancel()
    rep.finished, rep.elapsed_s = True, ctx.budget.elapsed()
    write_report(rep, out_dir)
    print(render_markdown(rep))
    return EXIT_OK if rep.ok() else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
