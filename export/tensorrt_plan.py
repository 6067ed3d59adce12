"""What a TensorRT build will do, decided in pure Python (no ``tensorrt`` import, no GPU needed).

* optimisation profiles from request limits: the transformer sees the CFG batch (2 x requests), music
  length follows the duration range through the latent geometry, text lengths are fixed per encoder, and
  VAE / vocoder frames follow the durations;
* the precision policy per component (VAE and vocoder stay fp32 until ``validate`` shows parity) and
  whether the network can be built strongly typed;
* engine file names carrying TensorRT version, precision and GPU compute capability, so a stale engine is
  never loaded.

``fluxmusic export tensorrt --dry-run`` prints a :class:`BuildPlan`; ``tensorrt_build`` executes one.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fluxmusic.export.spec import COMPONENT_NAMES, CONTEXT_INPUT, STEP_NAME, ComponentSpec, component_specs

from fluxmusic.checkpoint import read_json
from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.latent import LatentGeometry
from fluxmusic.modeldir import INDEX, ModelIndex, read_index

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
#: Lowest GPU compute capability (major*10+minor) with fast native support for each precision.
MIN_SM = {"fp32": 75, "fp16": 75, "bf16": 80, "fp8": 89}
#: Components a CFG sampling loop calls with [cond; uncond] stacked: their batch is twice the requests.
CFG_COMPONENTS = ("transformer",)
ALL_COMPONENTS = (*COMPONENT_NAMES, STEP_NAME)
#: Precision an ONNX graph was exported in -> the numpy dtype names of its float inputs.
ONNX_FLOAT_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ENGINE_SUFFIX = ".plan"
MANIFEST = "engines.json"
MANIFEST_FORMAT = "fluxmusic-tensorrt"
UNKNOWN_VERSION = "X.Y"

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------- precision
def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise FluxMusicError(f"precision {precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    return precision


def default_component_precision(component: str, precision: str) -> str:
    """The precision policy: what each component is built in when ``precision`` is asked for.

    * VAE decoder and vocoder: fp32 (DESIGN.md: lower only after ``validate`` measures parity; override).
    * T5: never fp16 -- T5 v1.1 activations overflow the fp16 range; fp32 instead. Under fp8 the text
      encoders use bf16 (fp8 needs a quantized graph, which only the transformer gets).
    * transformer (and the fused euler step): as asked.
    """
    check_precision(precision)
    if component in ("vae_decoder", "vocoder"):
        return "fp32"
    if component == "t5" and precision == "fp16":
        return "fp32"
    if component in ("t5", "clap") and precision == "fp8":
        return "bf16"
    return precision


def parse_component_precisions(items: Iterable[str]) -> dict[str, str]:
    """``["vae_decoder=fp16", ...]`` -> {component: precision} overrides of the policy."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, prec = item.partition("=")
        if not sep or name not in ALL_COMPONENTS:
            raise FluxMusicError(
                f"component precision {item!r} is not COMPONENT=PRECISION with COMPONENT one of "
                + ", ".join(ALL_COMPONENTS)
            )
        out[name] = check_precision(prec)
    return out


def strongly_typed(precision: str, onnx_precision: str) -> bool:
    """A strongly typed network takes every type from the graph, so it fits when the ONNX already is in the
    target precision (fp32 graph for fp32, fp16 graph for fp16) or carries FP8 Q/DQ nodes. Otherwise the
    builder must be allowed to lower types (weak typing plus the FP16/BF16 builder flag)."""
    return precision == "fp8" or precision == onnx_precision


# --------------------------------------------------------------------------------------------- engine names
@dataclass(frozen=True)
class EngineName:
    """``<component>.trt<major>.<minor>.<precision>.sm<cc>.plan``; e.g. ``transformer.trt10.8.fp16.sm89.plan``."""

    component: str
    trt_version: str  # "10.8" (major.minor; the full version is checked from the manifest)
    precision: str
    sm: int  # compute capability as major*10+minor: 89 for 8.9, 120 for 12.0

    @property
    def filename(self) -> str:
        sm = f"sm{self.sm}" if self.sm else "smXX"  # smXX: a dry run that does not know the target GPU
        return f"{self.component}.trt{self.trt_version}.{self.precision}.{sm}{ENGINE_SUFFIX}"

    def matches(self, trt_version: str, sm: int) -> bool:
        return self.trt_version == short_version(trt_version) and self.sm == sm


_ENGINE_RE = re.compile(
    r"^(?P<component>[a-z0-9_]+)\.trt(?P<trt>\d+\.\d+)\.(?P<precision>"
    + "|".join(PRECISIONS)
    + r")\.sm(?P<sm>\d+)"
    + re.escape(ENGINE_SUFFIX)
    + "$"
)


def short_version(version: str | None) -> str:
    """'10.8.0.43' -> '10.8' (engine names carry major.minor); None (unknown, dry run) -> 'X.Y'."""
    if version is None or version == UNKNOWN_VERSION:
        return UNKNOWN_VERSION
    m = re.match(r"^(\d+)\.(\d+)", str(version))
    if not m:
        raise FluxMusicError(f"TensorRT version {version!r} is not of the form MAJOR.MINOR[.PATCH]")
    return f"{m.group(1)}.{m.group(2)}"


def sm_of(capability: tuple[int, int] | str | int | None) -> int:
    """(8, 9) / '8.9' / 'sm89' / 89 -> 89; None (unknown, dry run) -> 0."""
    if capability is None:
        return 0
    if isinstance(capability, tuple):
        return capability[0] * 10 + capability[1]
    if isinstance(capability, int):
        return capability
    text = str(capability).lower().removeprefix("sm").removeprefix("_")
    m = re.fullmatch(r"(\d+)\.(\d)", text)
    if m:
        return int(m.group(1)) * 10 + int(m.group(2))
    if text.isdigit():
        return int(text)
    raise FluxMusicError(f"compute capability {capability!r} is not like 8.9 or sm89")


def engine_name(component: str, trt_version: str, precision: str, capability) -> EngineName:
    return EngineName(component, short_version(trt_version), check_precision(precision), sm_of(capability))


def parse_engine_filename(filename: str) -> EngineName | None:
    m = _ENGINE_RE.match(filename)
    if not m:
        return None
    return EngineName(m.group("component"), m.group("trt"), m.group("precision"), int(m.group("sm")))


def find_engine(
    engine_dir: str | Path, component: str, trt_version: str, capability, precision: str | None = None
) -> Path | None:
    """The engine for ``component`` built by this TensorRT version for this GPU, or None if there is none.

    Engines of the component built for another TensorRT version or compute capability are stale: they are
    never loaded, and if only stale ones exist this raises, naming them, rather than silently falling back.
    """
    engine_dir = Path(engine_dir)
    sm = sm_of(capability)
    found = [
        n for p in sorted(engine_dir.glob(f"{component}.*{ENGINE_SUFFIX}")) if (n := parse_engine_filename(p.name))
    ]
    found = [n for n in found if n.component == component]
    if precision is not None:
        found = [n for n in found if n.precision == check_precision(precision)]
    fresh = [n for n in found if n.matches(trt_version, sm)]
    if len(fresh) > 1:
        raise FluxMusicError(
            f"{engine_dir} has several {component} engines for this GPU ({', '.join(n.filename for n in fresh)}); "
            "choose one with precision=fp32|fp16|bf16|fp8"
        )
    if fresh:
        return engine_dir / fresh[0].filename
    if found:
        raise FluxMusicError(
            f"{component} engines in {engine_dir} are stale ({', '.join(n.filename for n in found)}): this is "
            f"TensorRT {short_version(trt_version)} on sm{sm}; rebuild them with `fluxmusic export tensorrt`"
        )
    return None


def installed_tensorrt_version() -> str | None:
    """The installed tensorrt package version, read from its metadata (does not import it)."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


# --------------------------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class RequestLimits:
    """What the deployment must serve. ``durations``: one value = fixed length; two = a range MIN..MAX (one
    profile); three or more = buckets (one exact-length profile each, best kernels per bucket)."""

    max_batch: int = 1
    opt_batch: int = 1
    durations: tuple[float, ...] = (10.24,)
    static: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.max_batch, int) and self.max_batch >= 1):
            raise FluxMusicError(f"max batch {self.max_batch!r} must be an integer >= 1")
        if not (isinstance(self.opt_batch, int) and 1 <= self.opt_batch <= self.max_batch):
            raise FluxMusicError(f"opt batch {self.opt_batch!r} must be an integer in [1, max batch {self.max_batch}]")
        if not self.durations:
            raise FluxMusicError("durations must hold at least one value")

    @property
    def is_range(self) -> bool:
        return len(self.durations) == 2


def parse_durations(text: str | Sequence[float] | None, geometry: LatentGeometry) -> tuple[float, ...]:
    """'5,10.24' (range) / '2.56,5.12,10.24' (buckets) / '10.24' (fixed) / None (the model's max duration)."""
    if text is None:
        return (float(geometry.max_duration),)
    if isinstance(text, str):
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError as e:
            raise FluxMusicError(f"durations {text!r} must be comma-separated seconds, e.g. 5,10.24") from e
    else:
        values = [float(v) for v in text]
    if not values:
        raise FluxMusicError(f"durations {text!r} hold no value; give MIN,MAX or a list of seconds")
    for v in values:
        geometry.check_duration(v)
    if len(values) == 2 and values[0] > values[1]:
        raise FluxMusicError(f"duration range {text!r} has MIN > MAX")
    if len(values) == 2 and values[0] == values[1]:
        values = values[:1]
    return tuple(sorted(set(values))) if len(values) != 2 else tuple(values)


# --------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def __str__(self) -> str:
        def f(s: Shape) -> str:
            return "x".join(map(str, s))

        if self.min == self.max:
            return f(self.min)
        return f"{f(self.min)} .. {f(self.opt)} .. {f(self.max)}"


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: a min/opt/max shape for every input of a component."""

    shapes: tuple[tuple[str, ShapeRange], ...]
    label: str = ""

    def __getitem__(self, name: str) -> ShapeRange:
        return dict(self.shapes)[name]

    def contains(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        ranges = dict(self.shapes)
        return all(name in ranges and ranges[name].contains(s) for name, s in shapes.items())

    def to_dict(self) -> dict:
        return {n: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for n, r in self.shapes}


DimRange = tuple[int, int, int]


def _duration_cases(limits: RequestLimits) -> list[tuple[str, float, float, float]]:
    """(label, min, opt, max) seconds of each profile the durations ask for."""
    d = limits.durations
    if limits.is_range and not limits.static:
        return [(f"{d[0]:g}-{d[1]:g}s", d[0], d[1], d[1])]
    # static with a range: the longest length only (a static engine serves one shape per profile)
    values = (d[1],) if limits.is_range else d
    return [(f"{v:g}s", v, v, v) for v in values]


def symbol_ranges(
    component: str, limits: RequestLimits, geometry: LatentGeometry, index: ModelIndex
) -> list[tuple[str, dict[str, DimRange]]]:
    """Per profile: symbol -> (min, opt, max). Symbols are the ones of :mod:`fluxmusic.export.spec`."""
    k = 2 if component in CFG_COMPONENTS else 1
    if limits.static:
        batch = (k * limits.max_batch,) * 3
    else:
        # min 1 even for the CFG transformer: validate and unguided calls run it on a single row
        batch = (1, k * limits.opt_batch, k * limits.max_batch)
    t5_len, clap_len = index.t5_max_length, index.clap_max_length
    g = geometry

    def tokens(seconds: float) -> int:
        gh, gw = g.grid(g.latent_frames(seconds))
        return gh * gw

    out = []
    cases = _duration_cases(limits) if component not in ("t5", "clap") else [("text", 0.0, 0.0, 0.0)]
    for label, lo, opt, hi in cases:
        dims: dict[str, DimRange] = {"batch": batch, "txt_len": (t5_len,) * 3, "clap_len": (clap_len,) * 3}
        if component not in ("t5", "clap"):
            music = (tokens(lo), tokens(opt), tokens(hi))
            frames = (g.latent_frames(lo), g.latent_frames(opt), g.latent_frames(hi))
            dims["music_len"] = music
            dims["latent_frames"] = frames
            dims["mel_frames"] = tuple(f * g.vae_downsample for f in frames)
        out.append((label, dims))
    return out


def component_profiles(
    spec: ComponentSpec, limits: RequestLimits, geometry: LatentGeometry, index: ModelIndex
) -> list[Profile]:
    """The optimisation profiles of one component (duplicates removed, order kept)."""
    profiles: list[Profile] = []
    for label, dims in symbol_ranges(spec.name, limits, geometry, index):
        shapes = []
        for t in spec.inputs:
            lo, opt, hi = [], [], []
            for d in t.shape:
                if isinstance(d, int):
                    r = (d, d, d)
                elif d in dims:
                    r = dims[d]
                else:
                    raise FluxMusicError(f"{spec.name} input {t.name} has a dimension {d!r} no profile can size")
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            shapes.append((t.name, ShapeRange(tuple(lo), tuple(opt), tuple(hi))))
        p = Profile(tuple(shapes), label)
        if all(p.shapes != q.shapes for q in profiles):
            profiles.append(p)
    return profiles


def batch_inputs(spec: ComponentSpec) -> tuple[str, ...]:
    """Inputs whose first dimension is the batch."""
    return tuple(t.name for t in spec.inputs if t.shape and t.shape[0] == "batch")


# --------------------------------------------------------------------------------------------- sources
#: ONNX variants ``fluxmusic export onnx`` writes beside ``<c>.onnx`` (fp32): ``<c>.fp16.onnx`` holds fp16
#: math behind fp32 I/O; ``<c>.fp8.onnx`` is an FP8 Q/DQ graph made outside this project (NVIDIA ModelOpt).
ONNX_VARIANTS = ("fp32", "fp16", "bf16", "fp8")


def onnx_variant_filename(component: str, variant: str) -> str:
    return f"{component}.onnx" if variant == "fp32" else f"{component}.{variant}.onnx"


@dataclass(frozen=True)
class OnnxGraph:
    path: Path
    precision: str  # the math the graph carries: fp32 | fp16 | bf16 | fp8
    quantized: bool = False  # has QuantizeLinear/DequantizeLinear nodes


@dataclass(frozen=True)
class ExportDescription:
    """What a build needs to know about an ONNX export: specs with concrete fixed dims, the geometry, and the
    graph variants per component (empty when planned from a model directory alone)."""

    specs: dict[str, ComponentSpec]
    index: ModelIndex
    graphs: dict[str, dict[str, OnnxGraph]] = field(default_factory=dict)  # component -> variant -> graph

    def graph_for(self, component: str, precision: str) -> OnnxGraph | None:
        """The graph to build ``precision`` from: the variant in that precision if exported, else fp32."""
        variants = self.graphs.get(component, {})
        return variants.get(precision) or variants.get("fp32")


def specs_from_model_dir(
    model_dir: str | Path, include_step: bool = True
) -> tuple[dict[str, ComponentSpec], ModelIndex]:
    """Specs computed from the model directory's configs only (no weights are read)."""
    model_dir = Path(model_dir)
    index = read_index(model_dir)
    cfg_path = model_dir / "transformer" / "config.json"
    try:
        cfg = FluxMusicConfig.load(cfg_path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise FluxMusicError(f"transformer config {cfg_path} cannot be read: {e}") from e
    specs = component_specs(cfg, index.geometry, cfg.context_in_dim, cfg.vec_in_dim, include_step=include_step)
    return specs, index


def _index_from_manifest(onnx_dir: Path, manifest: dict) -> ModelIndex | None:
    """The geometry and text lengths the ONNX export recorded (``fluxmusic export onnx`` writes both)."""
    if isinstance(manifest.get("geometry"), dict):
        text = manifest.get("text", {})
        return ModelIndex(
            geometry=LatentGeometry.from_dict(manifest["geometry"]),
            t5_max_length=int(text.get("t5_max_length", 256)),
            clap_max_length=int(text.get("clap_max_length", 77)),
            name=str(manifest.get("model_name", "fluxmusic")),
        )
    if (onnx_dir / INDEX).is_file():
        return ModelIndex.from_dict(json.loads((onnx_dir / INDEX).read_text()), str(onnx_dir / INDEX))
    return None


def _symbol_template() -> dict[str, ComponentSpec]:
    """Specs whose *symbolic* dims are the contract's; their fixed dims are placeholders, read from ONNX. The
    template has the optional ``context`` input (trained masked conditioning); a graph without it drops it."""
    cfg = FluxMusicConfig(context_channels=2 * FluxMusicConfig().in_channels)
    return component_specs(cfg, LatentGeometry(), 1, 1, include_step=True)


def _onnx_inputs(path: Path) -> tuple[dict[str, tuple[str, tuple]], bool]:
    """name -> (numpy dtype, dims: int or None for dynamic) of the graph inputs, and whether it has Q/DQ."""
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / OSError variants
        raise FluxMusicError(f"{path} is not a readable ONNX model: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        out[inp.name] = (helper.tensor_dtype_to_np_dtype(tt.elem_type).name, dims)
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    return out, qdq


def _spec_from_graph(path: Path, template: ComponentSpec, graph_inputs: dict) -> ComponentSpec:
    inputs = []
    for t in template.inputs:
        if t.name == CONTEXT_INPUT and t.name not in graph_inputs:
            continue  # a plain model: no trained-conditioning input
        if t.name not in graph_inputs:
            raise FluxMusicError(f"{path} has no input {t.name!r} (inputs: {', '.join(graph_inputs)})")
        dtype, dims = graph_inputs[t.name]
        if len(dims) != len(t.shape):
            raise FluxMusicError(f"{path} input {t.name!r} has rank {len(dims)}; the contract says {len(t.shape)}")
        if any(not isinstance(d, str) and g is None for d, g in zip(t.shape, dims)):
            raise FluxMusicError(f"{path} input {t.name!r} is dynamic where the contract says fixed: {t.shape}")
        # a fixed graph dim wins (a static export); a dynamic one takes the contract's symbol
        inputs.append(type(t)(t.name, dtype, tuple(d if d is not None else sym for sym, d in zip(t.shape, dims))))
    return ComponentSpec(template.name, tuple(inputs), template.outputs)


def describe_onnx_dir(
    onnx_dir: str | Path, model_dir: str | Path | None = None, components: Sequence[str] | None = None
) -> ExportDescription:
    """Read an ONNX export: which components and variants exist, their inputs (fixed dims from the graphs,
    symbolic dims from the spec contract), and the latent geometry (from the export's manifest, or
    ``model_dir``)."""
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise FluxMusicError(f"ONNX directory {onnx_dir} does not exist; create it with `fluxmusic export onnx`")
    manifest_path = onnx_dir / "manifest.json"
    manifest = {}
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "ONNX export manifest")
    index = read_index(model_dir) if model_dir is not None else _index_from_manifest(onnx_dir, manifest)
    if index is None:
        raise FluxMusicError(f"cannot tell the latent geometry of the export {onnx_dir}: pass --model DIR")
    template = _symbol_template()
    wanted = list(components) if components else list(ALL_COMPONENTS)
    for c in wanted:
        if c not in ALL_COMPONENTS:
            raise FluxMusicError(f"unknown component {c!r}; allowed: {', '.join(ALL_COMPONENTS)}")
    specs: dict[str, ComponentSpec] = {}
    graphs: dict[str, dict[str, OnnxGraph]] = {}
    for name in wanted:
        for variant in ONNX_VARIANTS:
            path = onnx_dir / onnx_variant_filename(name, variant)
            if not path.is_file():
                continue
            graph_inputs, qdq = _onnx_inputs(path)
            spec = _spec_from_graph(path, template[name], graph_inputs)
            # profiles are sized from the fp32 graph; variants share its I/O contract
            specs.setdefault(name, spec)
            graphs.setdefault(name, {})[variant] = OnnxGraph(path, variant, qdq)
    if not specs:
        raise FluxMusicError(
            f"{onnx_dir} holds no component ONNX file; expected some of "
            + ", ".join(t.filename for t in template.values())
        )
    return ExportDescription(specs, index, graphs)


def describe_model_dir(model_dir: str | Path, components: Sequence[str] | None = None) -> ExportDescription:
    """An export description from the model directory alone (for ``--dry-run`` before any ONNX exists)."""
    specs, index = specs_from_model_dir(model_dir)
    keep = set(components) if components else set(COMPONENT_NAMES)
    return ExportDescription({c: s for c, s in specs.items() if c in keep}, index)


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ComponentBuild:
    component: str
    precision: str
    strongly_typed: bool
    profiles: tuple[Profile, ...]
    engine: EngineName
    onnx: Path | None = None
    batch_inputs: tuple[str, ...] = ()

    @property
    def builder_flags(self) -> tuple[str, ...]:
        """TensorRT ``BuilderFlag`` names this build sets (weak typing lowers through flags)."""
        if self.strongly_typed:
            return ()
        return {"fp16": ("FP16",), "bf16": ("BF16",), "fp32": ()}.get(self.precision, ())

    def to_dict(self) -> dict:
        return {
            "component": self.component,
            "file": self.engine.filename,
            "precision": self.precision,
            "strongly_typed": self.strongly_typed,
            "builder_flags": list(self.builder_flags),
            "profiles": [{"label": p.label, "shapes": p.to_dict()} for p in self.profiles],
            "onnx": str(self.onnx) if self.onnx else None,
        }


@dataclass(frozen=True)
class BuildPlan:
    precision: str
    limits: RequestLimits
    trt_version: str
    sm: int
    builds: tuple[ComponentBuild, ...]
    opt_level: int = 3
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "tensorrt": self.trt_version,
            "sm": self.sm,
            "opt_level": self.opt_level,
            "limits": {
                "max_batch": self.limits.max_batch,
                "opt_batch": self.limits.opt_batch,
                "durations": list(self.limits.durations),
                "static": self.limits.static,
            },
            "components": {b.component: b.to_dict() for b in self.builds},
        }

    def format(self) -> str:
        """Human-readable plan: what will be built, in which precision, with which shapes."""
        L = self.limits
        kind = "static" if L.static else "range" if L.is_range else "buckets" if len(L.durations) > 2 else "fixed"
        lines = [
            f"TensorRT build plan: precision {self.precision}, TensorRT {self.trt_version}, "
            f"{f'sm{self.sm}' if self.sm else 'GPU unknown (smXX; pass --sm)'}, "
            f"builder optimisation level {self.opt_level}",
            f"requests: max batch {L.max_batch} (opt {L.opt_batch}); durations "
            f"{', '.join(f'{d:g}' for d in L.durations)} s ({kind})",
        ]
        for b in self.builds:
            typing = (
                "strongly typed" if b.strongly_typed else "weakly typed, flags " + ("+".join(b.builder_flags) or "-")
            )
            lines.append(f"  {b.component:<12} {b.precision:<5} {typing:<28} -> {b.engine.filename}")
            for i, p in enumerate(b.profiles):
                lines.append(f"    profile {i} ({p.label})")
                for name, r in p.shapes:
                    lines.append(f"      {name:<16} {r}")
        lines += [f"  note: {w}" for w in self.warnings]
        return "\n".join(lines)


def make_plan(
    desc: ExportDescription,
    precision: str,
    limits: RequestLimits,
    trt_version: str | None,
    capability,
    overrides: Mapping[str, str] | None = None,
    opt_level: int = 3,
) -> BuildPlan:
    """Decide every engine: its precision, typing, profiles and file name."""
    check_precision(precision)
    if not (isinstance(opt_level, int) and 0 <= opt_level <= 5):
        raise FluxMusicError(f"builder optimisation level {opt_level!r} must be an integer in 0..5")
    sm = sm_of(capability)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(desc.specs))
    if unknown:
        raise FluxMusicError(f"precision given for {', '.join(unknown)}, which the export does not hold")
    builds, warnings = [], []
    for name in ALL_COMPONENTS:
        if name not in desc.specs:
            continue
        spec = desc.specs[name]
        prec = overrides.get(name, default_component_precision(name, precision))
        if sm and sm < MIN_SM[prec]:
            raise FluxMusicError(
                f"{name} in {prec} needs a GPU of compute capability >= sm{MIN_SM[prec]}; this plan targets sm{sm}"
            )
        graph = desc.graph_for(name, prec)
        onnx_prec = graph.precision if graph else "fp32"
        if prec == "fp8" and desc.graphs and not (graph and graph.quantized):
            raise FluxMusicError(
                f"precision fp8 for {name} needs an FP8-quantized ONNX graph {onnx_variant_filename(name, 'fp8')} "
                "(QuantizeLinear/DequantizeLinear nodes, e.g. from NVIDIA ModelOpt); the export has none"
            )
        typed = strongly_typed(prec, onnx_prec)
        if not typed and prec == "fp32":
            warnings.append(f"{name}: the ONNX graph is {onnx_prec}; an fp32 engine of it keeps the graph's types")
            typed = True
        builds.append(
            ComponentBuild(
                name,
                prec,
                typed,
                tuple(component_profiles(spec, limits, desc.index.geometry, desc.index)),
                engine_name(name, trt_version, prec, sm),
                graph.path if graph else None,
                batch_inputs(spec),
            )
        )
    if any(b.precision == "fp32" for b in builds):
        warnings.append("fp32 engines clear the TF32 builder flag so they keep fp32 parity (max-abs <= 1e-4)")
    return BuildPlan(precision, limits, short_version(trt_version), sm, tuple(builds), opt_level, tuple(warnings))
