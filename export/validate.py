"""Parity of any backend against PyTorch fp32 (``fluxmusic export validate``).

The comparison takes *backend objects* (the :class:`fluxmusic.backend.Backend` protocol), not files: the
onnxruntime backend's variants (fp32, fp16, int8) are candidates today; a TensorRT backend plugs in the same
way (``validate(model_dir, {"tensorrt": backend})``). Per component, on fixed random inputs and on the real
inputs a torch generation feeds that component: max-abs error, relative error (||a - b|| / ||b||) and cosine
similarity; end to end, the waveform SNR of the whole pipeline on the candidate against torch, same seed.
The optional fused step graph is compared when a candidate has ``euler_step``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fluxmusic.backend import Backend, fused_step
from fluxmusic.errors import FluxMusicError

PROMPT = "a fast cheerful melody on a plucked string"
MAX_SNR_DB = 300.0


@dataclass(frozen=True)
class Thresholds:
    """Limits a variant must meet; ``max_abs`` per component (absent = not checked)."""

    min_cosine: float = 0.9999
    max_rel: float = 1e-3
    min_snr_db: float = 40.0
    max_abs: dict = field(default_factory=dict)


#: Per precision. fp32 is the issue's acceptance; the reduced precisions are reported with looser limits.
DEFAULT_THRESHOLDS = {
    "fp32": Thresholds(0.9999, 1e-3, 40.0, {"transformer": 1e-4, "euler_step": 1e-4}),
    "fp16": Thresholds(0.999, 5e-2, 20.0, {}),
    "bf16": Thresholds(0.995, 1e-1, 15.0, {}),
    "int8": Thresholds(0.99, 2e-1, 15.0, {}),
}


@dataclass
class Row:
    variant: str
    component: str
    inputs: str  # "random", "real" or "seed N" (end to end)
    max_abs: float | None = None
    rel: float | None = None
    cosine: float | None = None
    snr_db: float | None = None
    ok: bool = True
    limits: str = ""
    error: str = ""


@dataclass
class Report:
    rows: list[Row]
    model_dir: str
    reference: str = "torch fp32"

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "ok": self.ok,
                    "model_dir": self.model_dir,
                    "reference": self.reference,
                    "rows": [asdict(r) for r in self.rows],
                },
                indent=2,
            )
            + "\n"
        )

    def table(self) -> str:
        head = "| variant | component | inputs | max-abs | rel. error | cosine | SNR dB | limits | ok |"
        lines = [head, "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:

            def f(v, fmt):
                return "" if v is None else format(v, fmt)

            lines.append(
                f"| {r.variant} | {r.component} | {r.inputs} | {f(r.max_abs, '.2e')} | {f(r.rel, '.2e')} | "
                f"{f(r.cosine, '.7f')} | {f(r.snr_db, '.1f')} | {r.limits} | "
                f"{'yes' if r.ok else 'NO' + (': ' + r.error if r.error else '')} |"
            )
        return "\n".join(lines)


def metrics(out: Tensor, ref: Tensor) -> tuple[float, float, float]:
    """(max-abs, relative L2 error, cosine) in float64."""
    a = out.detach().double().cpu().reshape(-1)
    b = ref.detach().double().cpu().reshape(-1)
    if a.shape != b.shape:
        raise FluxMusicError(f"output has {a.numel()} values, the reference {b.numel()}")
    diff = a - b
    max_abs = float(diff.abs().max()) if a.numel() else 0.0
    rel = float(diff.norm() / b.norm().clamp_min(1e-30))
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30))
    return max_abs, rel, cos


def snr_db(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise FluxMusicError(f"waveform lengths differ: {out.shape} vs {ref.shape}")
    noise = float(np.sum((out - ref) ** 2))
    if noise == 0.0:
        return MAX_SNR_DB
    return min(MAX_SNR_DB, 10.0 * math.log10(float(np.sum(ref**2)) / noise))


class Recorder:
    """Wraps a backend and keeps the first inputs each component call saw (the "real" inputs)."""

    CALLS = ("t5_encode", "clap_encode", "velocity", "vae_decode", "vocode")

    def __init__(self, backend) -> None:
        self._backend = backend
        self.seen: dict[str, tuple] = {}

    def __getattr__(self, name):
        attr = getattr(self._backend, name)
        if name not in self.CALLS:
            return attr

        def call(*args, **kwargs):
            self.seen.setdefault(name, tuple(a.clone() if isinstance(a, Tensor) else a for a in args))
            return attr(*args, **kwargs)

        return call


def _pipeline(model_dir: Path, backend):
    from fluxmusic.components import load_tokenizer
    from fluxmusic.modeldir import read_index, read_null_embeddings
    from fluxmusic.pipeline import FluxMusicPipeline

    index = read_index(model_dir)
    toks = (
        load_tokenizer(model_dir / "tokenizer", "T5 tokenizer"),
        load_tokenizer(model_dir / "clap_tokenizer", "CLAP tokenizer"),
    )
    return FluxMusicPipeline(backend, index, read_null_embeddings(model_dir), toks)


#: component -> (backend method, spec input names in call order)
CALLS = {
    "t5": ("t5_encode", ("input_ids",)),
    "clap": ("clap_encode", ("input_ids", "attention_mask")),
    "transformer": ("velocity", ("x", "t", "txt", "y", "rope")),
    "vae_decoder": ("vae_decode", ("latent",)),
    "vocoder": ("vocode", ("mel",)),
    "euler_step": ("euler_step", ("x", "t", "dt", "txt", "y", "null_txt", "null_y", "guidance", "rope")),
}


def reference_euler_step(reference, x, t, dt, txt, y, null_txt, null_y, guidance, rope, context=None) -> Tensor:
    """One step of the torch path (flow.cfg_velocity + flow.sample's Euler update); ``context`` (a context
    model's trained conditioning) goes to the cond and uncond rows alike, as in the pipeline."""
    from fluxmusic.flow import Conditioning, cfg_velocity

    model = reference.velocity
    if context is not None:
        both = torch.cat((context, context), 0)

        def model(xx, tt, tx, yy, rp):
            return reference.velocity(xx, tt, tx, yy, rp, context=both)

    vel = cfg_velocity(model, Conditioning(txt, y), Conditioning(null_txt, null_y), guidance, rope)
    return x - dt.view(-1, 1, 1) * vel(x, t)


def _call(backend: Backend, comp: str, inputs: dict[str, Tensor], reference: bool = False) -> Tensor:
    from fluxmusic.export.spec import CONTEXT_INPUT

    method, names = CALLS[comp]
    args = [inputs[n] for n in names]
    # a context model's random case carries a trained-conditioning context (the real case, text-to-music, none)
    kw = {"context": inputs[CONTEXT_INPUT]} if CONTEXT_INPUT in inputs else {}
    if comp == "euler_step" and reference:
        return reference_euler_step(backend, *args, **kw)
    return getattr(backend, method)(*args, **kw)  # a method every Backend (or StepBackend, checked by the caller) has


def with_rope(backend: Backend, inputs: dict[str, Tensor], grid_w: int) -> dict[str, Tensor]:
    """Add the RoPE table the protocol's ``velocity``/``euler_step`` take, from the input lengths (the exported
    graphs derive it themselves; torch uses it)."""
    if "rope" in inputs or "x" not in inputs:
        return inputs
    music_len, txt_len = inputs["x"].shape[1], inputs["txt"].shape[1]
    return {**inputs, "rope": backend.rope(txt_len, music_len // grid_w, grid_w)}


def real_inputs(seen: dict[str, tuple], guidance: float) -> dict[str, dict[str, Tensor]]:
    """Turn what a torch generation fed each component into named inputs per component."""
    out: dict[str, dict[str, Tensor]] = {}
    for comp, (method, names) in CALLS.items():
        if comp == "euler_step":
            continue
        if method in seen:
            out[comp] = dict(zip(names, seen[method]))
    if "transformer" in out:
        v = out["transformer"]
        b = v["x"].shape[0] // 2
        out["euler_step"] = {
            "x": v["x"][:b],
            "t": v["t"][:b],
            "dt": torch.full((b,), 0.02),
            "txt": v["txt"][:b],
            "y": v["y"][:b],
            "null_txt": v["txt"][b:],
            "null_y": v["y"][b:],
            "guidance": torch.full((b,), float(guidance)),
            "rope": v["rope"],
        }
    return out


def random_inputs(model_dir: Path, components, reference: Backend) -> dict[str, dict[str, Tensor]]:
    from fluxmusic.export.onnx_export import _load_context, example_inputs

    ctx = _load_context(model_dir)
    g = ctx.index.geometry
    grid_w = g.latent_width // g.patch
    return {c: with_rope(reference, example_inputs(ctx, c, batch=2, seed=1234), grid_w) for c in components}


def validate(
    model_dir: str | Path,
    candidates: dict[str, Backend],
    variants: dict[str, str] | None = None,
    thresholds: dict[str, Thresholds] | None = None,
    reference=None,
    prompt: str = PROMPT,
    seed: int = 0,
    steps: int | None = None,
    duration: float | None = None,
    progress=None,
) -> Report:
    """Compare each candidate backend (label -> backend) with torch fp32.

    ``variants`` maps a label to its precision ("fp32", "fp16", "int8", ...) which picks its thresholds
    (default "fp32": a label not in ``variants`` is held to the fp32 limits).
    """
    from fluxmusic.backend import TorchBackend
    from fluxmusic.modeldir import read_index

    model_dir = Path(model_dir)
    say = progress or (lambda _m: None)
    index = read_index(model_dir)
    thresholds = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    ref = reference if reference is not None else TorchBackend(model_dir, index, "cpu", torch.float32)
    recorder = Recorder(ref)
    ref_pipe = _pipeline(model_dir, recorder)
    say("reference: torch fp32 generation")
    gen_kw = dict(seed=seed, steps=steps, duration=duration)
    item_guidance = ref_pipe.request(prompt, **gen_kw).settings.guidance
    ref_audio = ref_pipe(prompt, **gen_kw).audio[0]
    cases = {"random": random_inputs(model_dir, CALLS, ref), "real": real_inputs(recorder.seen, item_guidance)}
    ref_out: dict[tuple[str, str], Tensor] = {}
    for case, comps in cases.items():
        for comp, inp in comps.items():
            ref_out[case, comp] = _call(ref, comp, inp, reference=True)

    rows: list[Row] = []
    for label, backend in candidates.items():
        kind = (variants or {}).get(label, "fp32")
        th = thresholds.get(kind, thresholds["fp32"])
        say(f"{label}: components")
        for case, comps in cases.items():
            for comp, inp in comps.items():
                if comp == "euler_step" and fused_step(backend) is None:
                    continue
                row = Row(label, comp, case)
                lim_abs = th.max_abs.get(comp)
                row.limits = f"cos>={th.min_cosine:g} rel<={th.max_rel:g}" + (
                    f" abs<={lim_abs:g}" if lim_abs is not None else ""
                )
                try:
                    out = _call(backend, comp, inp)
                    row.max_abs, row.rel, row.cosine = metrics(out, ref_out[case, comp])
                except Exception as e:  # a candidate that cannot run a component fails that row, clearly
                    row.ok, row.error = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    rows.append(row)
                    continue
                row.ok = (
                    row.cosine >= th.min_cosine
                    and row.rel <= th.max_rel
                    and (lim_abs is None or row.max_abs <= lim_abs)
                )
                rows.append(row)
        say(f"{label}: end-to-end generation")
        row = Row(label, "end-to-end", f"seed {seed}", limits=f"snr>={th.min_snr_db:g} dB")
        try:
            audio = _pipeline(model_dir, backend)(prompt, **gen_kw).audio[0]
            row.snr_db = snr_db(audio, ref_audio)
            row.max_abs, row.rel, row.cosine = metrics(torch.from_numpy(audio), torch.from_numpy(ref_audio))
            row.ok = row.snr_db >= th.min_snr_db
        except Exception as e:
            row.ok, row.error = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    return Report(rows, str(model_dir))
