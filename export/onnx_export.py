"""Per-component ONNX export of a model directory (``fluxmusic export onnx``).

One ONNX file per component, named and shaped by :mod:`fluxmusic.export.spec` (the contract the TensorRT
builder, the runtimes and the Triton repository read too):

``t5.onnx``, ``clap.onnx``, ``transformer.onnx``, ``vae_decoder.onnx``, ``vocoder.onnx`` and, with
``step_graph=True``, ``euler_step.onnx`` (one whole Euler CFG step: the cond/null concat, the transformer,
the guidance combine and the update ``x - dt * v``). Variants live beside them: ``transformer.fp16.onnx``
(``--fp16``) and ``transformer.int8.onnx`` (``--int8``, dynamic quantisation for CPU).

Graphs are exported with the torch.onnx dynamo exporter. The RoPE table is derived inside the transformer and
step graphs from the text and music lengths in float32 ops (:class:`fluxmusic.rope.LengthRope`, so no float64
is ever in a graph and any consistent dynamic dims run in stock tools), every shape in the transformer follows
from input shapes (no data-dependent shapes), and
attention is ``F.scaled_dot_product_attention`` (opset >= 23: one ``Attention`` node; below: the
MatMul-Softmax-MatMul pattern that ORT and TensorRT fuse). Each file passes ``onnx.checker`` (full check)
and strict shape inference, carries ``metadata_props`` (component, component config, opset, exporter,
source hashes) and is written to a temporary name then renamed. Models over 2 GB keep their weights in
``<name>.onnx.data`` (ONNX external data). ``manifest.json`` describes the whole export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from fluxmusic.export.spec import (
    COMPONENT_NAMES,
    CONTEXT_INPUT,
    ENCODER_NAME,
    STEP_NAME,
    ComponentSpec,
    component_specs,
)
from torch import Tensor, nn

from fluxmusic.checkpoint import atomic_write_text, read_json
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import cfg_combine
from fluxmusic.modeldir import ModelIndex, read_index
from fluxmusic.tempfiles import publish

log = logging.getLogger("fluxmusic.export")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fluxmusic-onnx"
MANIFEST_VERSION = 1
DEFAULT_OPSET = 18
MIN_OPSET = 17
MAX_OPSET = 23
#: Above this many bytes of weights a model is saved with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000
ALL_COMPONENTS = (*COMPONENT_NAMES, STEP_NAME, ENCODER_NAME)
#: Model-directory folder each exported component comes from (its source hash is taken over it).
SOURCE_DIRS = {
    "t5": "text_encoder",
    "clap": "clap",
    "transformer": "transformer",
    "vae_decoder": "vae",
    "vocoder": "vocoder",
    STEP_NAME: "transformer",
    ENCODER_NAME: "vae",
}
#: Components exported only when asked for (the default export is COMPONENT_NAMES).
OPTIONAL_COMPONENTS = (STEP_NAME, ENCODER_NAME)
#: Variants a component may have beside its fp32 graph.
VARIANTS = ("fp32", "fp16", "int8")
META_PREFIX = "fluxmusic."

ProgressFn = Callable[[str], None]


# ----------------------------------------------------------------------------------------------- hashes
def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_sha256(directory: str | Path) -> str:
    """Hash of a component folder: every file's relative path and content, in sorted order."""
    directory = Path(directory)
    h = hashlib.sha256()
    for p in sorted(q for q in directory.rglob("*") if q.is_file()):
        h.update(p.relative_to(directory).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def component_config(model_dir: Path, component: str) -> dict:
    """The config.json of the folder a component comes from (what a model/ONNX mismatch check compares)."""
    path = model_dir / SOURCE_DIRS[component] / "config.json"
    return read_json(path, f"{component} config")


def source_hashes(model_dir: str | Path, component: str, weights: bool = True) -> dict:
    """``config_sha256`` (cheap, checked at every backend load) and ``source_sha256`` (all files, in validate)."""
    model_dir = Path(model_dir)
    out = {"source_dir": SOURCE_DIRS[component], "config_sha256": config_sha256(component_config(model_dir, component))}
    if weights:
        out["source_sha256"] = dir_sha256(model_dir / SOURCE_DIRS[component])
    return out


# --------------------------------------------------------------------------------------------- wrappers
class T5Graph(nn.Module):
    def __init__(self, t5: nn.Module) -> None:
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.t5(input_ids=input_ids).last_hidden_state.float()


class ClapGraph(nn.Module):
    def __init__(self, clap: nn.Module) -> None:
        super().__init__()
        self.clap = clap

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.clap(input_ids=input_ids, attention_mask=attention_mask).pooler_output.float()


class TransformerGraph(nn.Module):
    """The velocity model; fp32 I/O whatever the weights' dtype (the fp16 variant casts inside).

    The RoPE table is derived inside the graph from the lengths of ``txt`` and ``x``
    (:class:`fluxmusic.rope.LengthRope`, float32 ops at float64-table accuracy), so the graph's only inputs are
    the model's and any consistent dynamic dims run -- in stock tools too (``polygraphy run``, ``trtexec``).
    """

    def __init__(self, model: nn.Module, grid_w: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from fluxmusic.rope import LengthRope

        self.model, self.dtype = model, dtype
        self.rope = LengthRope(model.config.axes_dim, model.config.theta, grid_w)

    def forward(self, x: Tensor, t: Tensor, txt: Tensor, y: Tensor, context: Tensor | None = None) -> Tensor:
        # ``context`` only on a model with trained masked conditioning (spec input "context"); its exported
        # graph always takes it: zeros there are exactly the model's ``context=None`` (context_in(0) = its bias).
        d = self.dtype
        rope = self.rope(txt, x)
        return self.model(x.to(d), t.to(d), txt.to(d), y.to(d), rope,
                          context=None if context is None else context.to(d)).float()


class EulerStepGraph(nn.Module):
    """One Euler step with batched classifier-free guidance, exactly as ``flow.cfg_velocity`` + ``flow.sample``:
    v = model([x; x], [t; t], [txt; null_txt], [y; null_y]); v = v_u + g (v_c - v_u); x_next = x - dt v."""

    def __init__(self, model: nn.Module, grid_w: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.velocity = TransformerGraph(model, grid_w, dtype)
        self.control_channels = model.control_channels

    def forward(self, x, t, dt, txt, y, null_txt, null_y, guidance, context=None):
        # cond and uncond rows see the same known audio (as the pipeline's CFG batch); the uncond rows are not
        # given the beat grid or the register hint (fluxmusic.beat.without_controls)
        from fluxmusic.beat import without_controls

        ctx = None if context is None else torch.cat((context, without_controls(context, self.control_channels)), 0)
        v = self.velocity(
            torch.cat((x, x), 0), torch.cat((t, t), 0), torch.cat((txt, null_txt), 0), torch.cat((y, null_y), 0),
            ctx,
        )
        b = x.shape[0]
        v_c, v_u = v[:b], v[b:]  # slices, not chunk: chunk on a dynamic batch exports as SplitToSequence
        v = cfg_combine(v_c, v_u, guidance)
        return x - dt.view(-1, 1, 1) * v


class VaeDecoderGraph(nn.Module):
    """Scaled latent [B, C, H, W] -> log-mel [B, frames, mels] (the division by the scaling factor is inside)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent / self.scaling_factor).sample.squeeze(1)


class VaeEncoderGraph(nn.Module):
    """Log-mel [B, frames, mels] -> scaled latent [B, C, H, W]: the posterior mean times the scaling factor (the
    given audio's latent of continuation and infilling)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, mel: Tensor) -> Tensor:
        return self.vae.encode(mel.unsqueeze(1)).latent_dist.mode() * self.scaling_factor


class VocoderGraph(nn.Module):
    def __init__(self, vocoder: nn.Module) -> None:
        super().__init__()
        self.vocoder = vocoder

    def forward(self, mel: Tensor) -> Tensor:
        return self.vocoder(mel)


# ------------------------------------------------------------------------------------------ the export
@dataclass
class ExportContext:
    model_dir: Path
    index: ModelIndex
    specs: dict[str, ComponentSpec]
    t5_width: int
    clap_width: int
    null_txt: Tensor
    null_y: Tensor
    transformer_config: object = None  # the transformer's FluxMusicConfig


def _load_context(model_dir: Path) -> ExportContext:
    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.modeldir import read_null_embeddings

    index = read_index(model_dir)
    cfg = FluxMusicConfig.from_dict(component_config(model_dir, "transformer"))
    t5_width = int(component_config(model_dir, "t5")["d_model"])
    clap_cfg = component_config(model_dir, "clap")
    clap_width = int(clap_cfg.get("text_config", clap_cfg).get("hidden_size", 768))
    null = read_null_embeddings(model_dir)
    specs = component_specs(cfg, index.geometry, t5_width, clap_width, include_step=True, include_encoder=True)
    return ExportContext(model_dir, index, specs, t5_width, clap_width, null.txt, null.y, cfg)


def example_inputs(ctx: ExportContext, component: str, batch: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Inputs for tracing (and for validation's random case): shapes a generation uses, fixed seed."""
    g = ctx.index.geometry
    gen = torch.Generator().manual_seed(seed)
    lt = ctx.index.t5_max_length
    if component == "t5":
        return {"input_ids": torch.randint(3, _vocab(ctx, "t5"), (batch, lt), generator=gen)}
    if component == "clap":
        lc = ctx.index.clap_max_length
        ids = torch.randint(3, _vocab(ctx, "clap"), (batch, lc), generator=gen)
        mask = torch.ones(batch, lc, dtype=torch.int64)
        mask[0, lc // 2 :] = 0
        ids[0, lc // 2 :] = 0
        return {"input_ids": ids, "attention_mask": mask}
    frames = g.max_latent_frames
    gh, gw = g.grid(frames)
    if component in ("transformer", STEP_NAME):
        ch = ctx.specs["transformer"].inputs[0].shape[2]
        x = torch.randn(batch, gh * gw, ch, generator=gen)
        t = torch.rand(batch, generator=gen)
        txt = torch.randn(batch, lt, ctx.t5_width, generator=gen)
        y = torch.randn(batch, ctx.clap_width, generator=gen)
        extra = {}
        if any(i.name == CONTEXT_INPUT for i in ctx.specs["transformer"].inputs):
            cfg = ctx.transformer_config
            extra[CONTEXT_INPUT] = example_context(torch.randn(batch, gh * gw, ch, generator=gen), gw,
                                                   cfg.beat_channels, g.seconds_per_latent_frame,
                                                   cfg.register_channels)
        if component == "transformer":
            return {"x": x, "t": t, "txt": txt, "y": y, **extra}
        return {
            "x": x,
            "t": t,
            "dt": torch.full((batch,), 0.25),
            "txt": txt,
            "y": y,
            "null_txt": ctx.null_txt.expand(batch, -1, -1).contiguous(),
            "null_y": ctx.null_y.expand(batch, -1).contiguous(),
            "guidance": torch.linspace(1.0, 7.0, batch),
            **extra,
        }
    if component == "vae_decoder":
        return {"latent": torch.randn(batch, g.latent_channels, frames, g.latent_width, generator=gen)}
    if component in ("vocoder", ENCODER_NAME):
        return {"mel": torch.randn(batch, frames * g.vae_downsample, g.mel_bins, generator=gen) * 2.0 - 5.0}
    raise FluxMusicError(f"unknown component {component!r}; allowed: {', '.join(ALL_COMPONENTS)}")


def example_context(x0: Tensor, grid_w: int, beat_channels: int = 0, seconds_per_frame: float = 0.08,
                    register_channels: int = 0) -> Tensor:
    """A trained-conditioning context for tracing and validation: row 0 knows nothing (text-to-music, all
    zeros), the other rows a prefix of latent frames (continuation) of growing length, as the pipeline sends;
    a beat-grid model's rows then get beat grids of growing tempo, a register-hint model's the registers in turn
    (row 0: none)."""
    from fluxmusic.beat import beat_features
    from fluxmusic.latent import PATCH
    from fluxmusic.model import masked_context
    from fluxmusic.register import REGISTER_MIDI, register_features

    b, n, _ = x0.shape
    frames = n // grid_w
    mask = torch.zeros(b, n, 1)
    for i in range(1, b):
        mask[i, : grid_w * max(1, frames * i // (b + 1))] = 1.0
    parts = [masked_context(x0, mask)]
    if beat_channels:
        bpm = torch.tensor([float("nan")] + [60.0 + 40.0 * i for i in range(1, b)])
        parts.append(beat_features(bpm, torch.zeros(b), frames * PATCH, grid_w, seconds_per_frame))
    if register_channels:
        pitches = list(REGISTER_MIDI.values())
        midi = torch.tensor([float("nan")] + [pitches[i % len(pitches)] for i in range(1, b)])
        parts.append(register_features(midi, frames, grid_w))
    return torch.cat(parts, dim=-1)


def _vocab(ctx: ExportContext, component: str) -> int:
    cfg = component_config(ctx.model_dir, component)
    if component == "clap":
        cfg = cfg.get("text_config", cfg)
    return int(cfg["vocab_size"])


def load_graph_module(model_dir: Path, component: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The torch module a component's graph is exported from (also the validation reference)."""
    from fluxmusic.components import load_clap_text, load_t5, load_vae, load_vocoder
    from fluxmusic.transformer_io import load_transformer

    if component == "t5":
        return T5Graph(load_t5(model_dir / "text_encoder")).eval()
    if component == "clap":
        return ClapGraph(load_clap_text(model_dir / "clap")).eval()
    if component in ("transformer", STEP_NAME):
        model = load_transformer(model_dir / "transformer", "cpu", dtype)
        geometry = read_index(model_dir).geometry
        cls = TransformerGraph if component == "transformer" else EulerStepGraph
        return cls(model, geometry.latent_width // geometry.patch, dtype).eval()
    if component == "vae_decoder":
        return VaeDecoderGraph(load_vae(model_dir / "vae")).eval()
    if component == "vocoder":
        return VocoderGraph(load_vocoder(model_dir / "vocoder")).eval()
    if component == ENCODER_NAME:
        return VaeEncoderGraph(load_vae(model_dir / "vae")).eval()
    raise FluxMusicError(f"unknown component {component!r}; allowed: {', '.join(ALL_COMPONENTS)}")


def graph_filename(component: str, variant: str = "fp32") -> str:
    return f"{component}.onnx" if variant == "fp32" else f"{component}.{variant}.onnx"


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints its progress to stdout and warns a lot; we report progress ourselves."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        yield buf


def export_graph(
    module: nn.Module,
    spec: ComponentSpec,
    inputs: dict[str, Tensor],
    path: Path,
    opset: int,
    metadata: dict[str, str],
) -> None:
    """Export ``module`` to ``path`` (atomically), check it, infer shapes, and stamp metadata."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}."))
    try:
        tmp = tmpdir / path.name
        args = tuple(inputs[t.name] for t in spec.inputs)
        external = _param_bytes(module) > EXTERNAL_DATA_BYTES
        with _quiet() as buf, torch.no_grad():
            try:
                program = torch.onnx.export(
                    module,
                    args,
                    input_names=[t.name for t in spec.inputs],
                    output_names=[t.name for t in spec.outputs],
                    dynamic_axes=spec.dynamic_axes(),
                    opset_version=opset,
                    dynamo=True,
                    external_data=external,
                    verbose=False,
                )
            except Exception as e:
                raise FluxMusicError(
                    f"ONNX export of {spec.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}\n"
                    + buf.getvalue()[-2000:]
                ) from e
            program.save(str(tmp), external_data=external)
        _rename_dims(tmp, spec, external)
        onnx.shape_inference.infer_shapes_path(str(tmp), str(tmp), check_type=True, strict_mode=True, data_prop=True)
        proto = onnx.load(str(tmp), load_external_data=False)
        for k, v in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save_model(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        assert_no_float64(tmp)
        data = tmp.with_name(tmp.name + ".data")
        target_data = path.with_name(path.name + ".data")
        if data.exists():
            os.replace(data, target_data)
        elif target_data.exists():
            target_data.unlink()
        publish(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _rename_dims(path: Path, spec: ComponentSpec, external: bool) -> None:
    """Name the graph's symbolic dims as the spec does (the exporter may invent its own, e.g. ``s0``)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    changed = False
    for vi in (*proto.graph.input, *proto.graph.output):
        t = by_name.get(vi.name)
        if t is None:
            raise FluxMusicError(f"exported {spec.name} has an unexpected tensor {vi.name!r}")
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise FluxMusicError(f"exported {spec.name}.{vi.name} has rank {len(dims)}, spec says {len(t.shape)}")
        for d, s in zip(dims, t.shape):
            if isinstance(s, str) and d.dim_param != s:
                d.dim_param = s
                changed = True
    if changed:
        onnx.save_model(proto, str(path))


def assert_no_float64(path: str | Path) -> None:
    """No graph may hold a float64 tensor (TensorRT has none): initializers, values, casts, constants."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    bad = graph_float64(proto.graph)
    if bad:
        raise FluxMusicError(f"{path} contains float64: {', '.join(bad[:10])}")


def graph_float64(graph) -> list[str]:
    from onnx import TensorProto

    d = TensorProto.DOUBLE
    bad = [f"initializer {i.name}" for i in graph.initializer if i.data_type == d]
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if vi.type.tensor_type.elem_type == d:
            bad.append(f"value {vi.name}")
    for n in graph.node:
        for a in n.attribute:
            if a.name == "to" and a.i == d:
                bad.append(f"{n.op_type} {n.name} to float64")
            if a.t is not None and a.t.data_type == d:
                bad.append(f"{n.op_type} {n.name} constant")
            if a.g is not None and len(a.g.node):
                bad.extend(graph_float64(a.g))
    return bad


def op_counts(path: str | Path) -> dict[str, int]:
    """Op type -> count over a graph file (including subgraphs and local functions)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}

    def walk(nodes):
        for n in nodes:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            counts[key] = counts.get(key, 0) + 1
            for a in n.attribute:
                if a.g is not None and len(a.g.node):
                    walk(a.g.node)

    walk(proto.graph.node)
    for f in proto.functions:
        walk(f.node)
    return dict(sorted(counts.items()))


# -------------------------------------------------------------------------------------------- manifest
def read_manifest(onnx_dir: str | Path) -> dict:
    onnx_dir = Path(onnx_dir)
    path = onnx_dir / MANIFEST
    if not onnx_dir.is_dir():
        raise FluxMusicError(f"ONNX directory {onnx_dir} does not exist")
    if not path.is_file():
        raise FluxMusicError(f"{onnx_dir} is not a fluxmusic ONNX export: it has no {MANIFEST}")
    m = read_json(path, "ONNX export manifest")
    if m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION:
        raise FluxMusicError(
            f"{path} has format {m.get('format')!r} version {m.get('version')!r}; "
            f"expected {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}"
        )
    return m


def check_manifest_matches(model_dir: str | Path, manifest: dict, components: Iterable[str], weights: bool) -> None:
    """Refuse an ONNX export made from another model: config hashes (and with ``weights``, all files)."""
    model_dir = Path(model_dir)
    bad = []
    for c in components:
        entry = manifest["components"].get(c)
        if entry is None:
            continue
        now = source_hashes(model_dir, c, weights=weights)
        keys = ("config_sha256", "source_sha256") if weights else ("config_sha256",)
        for k in keys:
            if entry.get(k) != now[k]:
                what = "config" if k == "config_sha256" else "files"
                bad.append(
                    f"{c} ({what} of {now['source_dir']}/: export {str(entry.get(k))[:12]}, model {now[k][:12]})"
                )
    if bad:
        raise FluxMusicError(
            f"model/ONNX mismatch: the ONNX export was made from a different model than {model_dir}: "
            + "; ".join(bad)
            + ". Re-export with `fluxmusic export onnx`."
        )


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------- driver
def parse_components(names: Sequence[str] | None, step_graph: bool, encoder: bool = False) -> list[str]:
    if not names:
        chosen = list(COMPONENT_NAMES)
    else:
        chosen = []
        for n in names:
            for part in n.split(","):
                part = part.strip()
                if part not in ALL_COMPONENTS:
                    raise FluxMusicError(f"unknown component {part!r}; allowed: {', '.join(ALL_COMPONENTS)}")
                if part and part not in chosen:
                    chosen.append(part)
    if step_graph and STEP_NAME not in chosen:
        chosen.append(STEP_NAME)
    if encoder and ENCODER_NAME not in chosen:
        chosen.append(ENCODER_NAME)
    return chosen


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise FluxMusicError(f"opset {opset!r} is not supported; allowed: {MIN_OPSET} ... {MAX_OPSET}")
    return opset


def _stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    components: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    step_graph: bool = False,
    int8: bool = False,
    progress: ProgressFn | None = _stderr_progress,
    encoder: bool = False,
) -> dict:
    """Export the chosen components of ``model_dir`` into ``out_dir``; returns the manifest.

    Re-exporting into an existing export directory of the same model replaces the chosen components and
    keeps the others. ``fp16`` adds ``<name>.fp16.onnx`` for the transformer (and the step graph): fp16
    weights and math, fp32 I/O; the VAE and vocoder stay fp32. ``int8`` adds ``transformer.int8.onnx``.
    ``encoder`` adds ``vae_encoder.onnx`` (audio in for the onnx backend and the Triton repository).
    """
    import onnx

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    opset = check_opset(opset)
    chosen = parse_components(components, step_graph, encoder)
    ctx = _load_context(model_dir)
    say = progress or (lambda _m: None)
    if out_dir.exists() and not out_dir.is_dir():
        raise FluxMusicError(f"output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST).is_file():
        manifest = read_manifest(out_dir)
        if manifest.get("model_name") != ctx.index.name:
            raise FluxMusicError(
                f"{out_dir} holds an export of model {manifest.get('model_name')!r}, not {ctx.index.name!r}; "
                "choose a new output directory"
            )
    else:
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "model_name": ctx.index.name,
            "components": {},
        }
    manifest.update(
        {
            "model_dir": str(model_dir.resolve()),
            "model_index_sha256": sha256_file(model_dir / "model_index.json"),
            "exporter": exporter_name(),
            "geometry": ctx.index.geometry.to_dict(),
            "text": {"t5_max_length": ctx.index.t5_max_length, "clap_max_length": ctx.index.clap_max_length},
        }
    )
    jobs: list[tuple[str, str]] = [(c, "fp32") for c in chosen]
    if fp16:
        jobs += [(c, "fp16") for c in chosen if c in ("transformer", STEP_NAME)]
    total = len(jobs) + (1 if int8 else 0)
    for i, (comp, variant) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        fname = graph_filename(comp, variant)
        say(f"[{i}/{total}] {comp} ({variant}): loading")
        dtype = torch.float16 if variant == "fp16" else torch.float32
        module = load_graph_module(model_dir, comp, dtype)
        hashes = source_hashes(model_dir, comp)
        cfg = component_config(model_dir, comp)
        spec = ctx.specs[comp]
        meta = {
            META_PREFIX + "component": comp,
            META_PREFIX + "variant": variant,
            META_PREFIX + "config": json.dumps(cfg, sort_keys=True),
            META_PREFIX + "opset": str(opset),
            META_PREFIX + "exporter": exporter_name(),
            META_PREFIX + "config_sha256": hashes["config_sha256"],
            META_PREFIX + "source_sha256": hashes["source_sha256"],
            META_PREFIX + "source_dir": hashes["source_dir"],
            META_PREFIX + "model_name": ctx.index.name,
        }
        say(f"[{i}/{total}] {comp} ({variant}): exporting {_param_bytes(module) / 1e6:.1f} MB of weights")
        export_graph(module, spec, example_inputs(ctx, comp), out_dir / fname, opset, meta)
        del module
        entry = manifest["components"].setdefault(comp, {})
        entry.update({k: v for k, v in hashes.items()})
        entry["config"] = cfg
        entry["opset"] = opset
        entry["inputs"] = [_spec_json(t) for t in spec.inputs]
        entry["outputs"] = [_spec_json(t) for t in spec.outputs]
        entry.setdefault("variants", {})[variant] = _file_entry(out_dir, fname)
        _write_manifest(out_dir, manifest)
        size = entry["variants"][variant]["bytes"]
        say(
            f"[{i}/{total}] {comp} ({variant}): wrote {fname} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s"
        )
    if int8:
        from fluxmusic.export.quantize import quantize_transformer

        t0 = time.perf_counter()
        say(f"[{total}/{total}] transformer (int8): dynamic quantisation")
        quantize_transformer(out_dir)
        manifest = read_manifest(out_dir)
        say(f"[{total}/{total}] transformer (int8): wrote transformer.int8.onnx in {time.perf_counter() - t0:.1f} s")
    _ = onnx  # imported up front so a missing onnx fails before any work
    return manifest


def _spec_json(t) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def _file_entry(out_dir: Path, fname: str) -> dict:
    path = out_dir / fname
    data = path.with_name(path.name + ".data")
    entry = {"file": fname, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if data.exists():
        entry.update({"external_data": data.name, "bytes": entry["bytes"] + data.stat().st_size,
                      "external_data_sha256": sha256_file(data)})
    return entry


def verify_file_entry(onnx_dir: Path, entry: dict) -> None:
    """Recompute the checksums a manifest entry records (graph and external data) before the graph is used:
    a corrupted weight would otherwise run silently (issue 17, item 7). Entries without them pass."""
    for name_key, sha_key in (("file", "sha256"), ("external_data", "external_data_sha256")):
        name, expected = entry.get(name_key), entry.get(sha_key)
        if not name or not expected:
            continue
        path = onnx_dir / name
        if not path.is_file():
            raise FluxMusicError(f"ONNX export {onnx_dir} lacks {name}, which its manifest lists")
        if sha256_file(path) != expected:
            raise FluxMusicError(
                f"{path} fails its checksum (manifest sha256 {expected[:12]}...): the file changed or was corrupted "
                "after export. Re-export it with `fluxmusic export onnx`"
            )


def exporter_name() -> str:
    import onnx

    try:
        import onnxscript

        osv = onnxscript.__version__
    except ImportError:  # pragma: no cover
        osv = "?"
    return f"torch.onnx dynamo (torch {torch.__version__}, onnxscript {osv}, onnx {onnx.__version__})"


def ops_markdown(onnx_dir: str | Path) -> str:
    """A markdown table (docs/export.md): which ONNX ops each exported graph uses (with counts)."""
    rows = ["| graph | ops (count) |", "|---|---|"]
    for path in sorted(Path(onnx_dir).glob("*.onnx")):
        ops = ", ".join(f"{k} ({v})" for k, v in op_counts(path).items())
        rows.append(f"| {path.name} | {ops} |")
    return "\n".join(rows)
