"""Triton ``config.pbtxt`` files: I/O signatures read from ONNX graphs, rendering from the templates in
``triton_models/``, and parsing with Triton's own model-config protobuf schema (shipped by tritonclient).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from fluxmusic.errors import FluxMusicError

#: ONNX TensorProto element type name -> Triton data type.
ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}
#: numpy dtype name (as in fluxmusic.export.spec) -> Triton data type.
NUMPY_TO_TRITON = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}

PLATFORMS = {"onnx": "onnxruntime_onnx", "plan": "tensorrt_plan"}
MODEL_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")


@dataclass(frozen=True)
class GraphTensor:
    """A graph input or output: Triton data type and dims (a str is a symbolic, i.e. dynamic, dimension)."""

    name: str
    data_type: str
    dims: tuple[int | str, ...]

    def triton_dims(self, batched: bool) -> list[int]:
        dims = self.dims[1:] if batched else self.dims
        return [-1 if isinstance(d, str) else int(d) for d in dims]

    def to_json(self) -> dict:
        return {"name": self.name, "data_type": self.data_type, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, d: dict) -> GraphTensor:
        return cls(d["name"], d["data_type"], tuple(d["dims"]))


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    @property
    def batch_dim(self) -> str | None:
        """The symbolic dim every input and output starts with, if any: then Triton may batch the model.

        Every exported graph is (the transformer derives its RoPE table inside the graph, so it has no shared
        batch-1 input): Triton's dynamic batcher may merge concurrent same-length requests, each of which
        already carries cond and uncond as a batch of 2B.
        """
        firsts = {t.dims[0] if t.dims else None for t in (*self.inputs, *self.outputs)}
        first = firsts.pop() if len(firsts) == 1 else None
        return first if isinstance(first, str) else None

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, d: dict) -> GraphIO:
        return cls(
            tuple(GraphTensor.from_json(t) for t in d["inputs"]), tuple(GraphTensor.from_json(t) for t in d["outputs"])
        )


def onnx_graph_io(path: str | Path) -> GraphIO:
    """Inputs and outputs of an ONNX file (weights stored as external data are not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise FluxMusicError(f"{path} is not a readable ONNX model: {e}") from e
    initializers = {i.name for i in model.graph.initializer}

    def tensor(v) -> GraphTensor:
        tt = v.type.tensor_type
        dtype = onnx.TensorProto.DataType.Name(tt.elem_type)
        if dtype not in ONNX_TO_TRITON:
            raise FluxMusicError(f"{path}: tensor {v.name!r} has ONNX type {dtype}, which Triton cannot serve")
        dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tt.shape.dim)
        return GraphTensor(v.name, ONNX_TO_TRITON[dtype], dims)

    # Old exporters list initializers as inputs too; they are weights, not request tensors.
    inputs = tuple(tensor(v) for v in model.graph.input if v.name not in initializers)
    return GraphIO(inputs, tuple(tensor(v) for v in model.graph.output))


def external_data_files(path: str | Path) -> list[str]:
    """Relative locations of the external-data files an ONNX model references (they must sit next to it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            found.update(e.value for e in init.external_data if e.key == "location")
    return sorted(found)


# ----------------------------------------------------------------------------------------------- rendering
def templates_dir() -> Path:
    """``triton_models/`` of the source tree (an editable install or a checkout)."""
    import fluxmusic.export

    path = Path(fluxmusic.export.__file__).resolve().parents[1] / "triton_models"
    if not (path / "templates").is_dir():
        raise FluxMusicError(f"Triton templates not found at {path}; run from a fluxmusic checkout (pip install -e .)")
    return path


def _tensor_block(kind: str, tensors: tuple[GraphTensor, ...], batched: bool) -> str:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in t.triton_dims(batched))
        sep = "," if i < len(tensors) - 1 else ""
        lines.append(f'  {{ name: "{t.name}", data_type: {t.data_type}, dims: [ {dims} ] }}{sep}')
    lines.append("]")
    return "\n".join(lines)


def render_component_config(
    name: str,
    io: GraphIO,
    platform: str,
    max_batch_size: int,
    instance_kind: str,
    instance_count: int,
    max_queue_delay_us: int,
    templates: Path | None = None,
) -> str:
    """config.pbtxt of one component model. Dynamic batching only when the graph is batchable."""
    if instance_kind not in INSTANCE_KINDS:
        raise FluxMusicError(f"instance kind {instance_kind!r} is not allowed; allowed: {', '.join(INSTANCE_KINDS)}")
    batched = io.batch_dim is not None and max_batch_size > 0
    batching = (
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}"
        if batched
        else "# Not batchable by Triton (inputs do not all start with the batch dimension): no dynamic batching."
    )
    text = string.Template(((templates or templates_dir()) / "templates" / "component.config.pbtxt.in").read_text())
    return text.substitute(
        component=name,
        name=name,
        platform=platform,
        max_batch_size=max_batch_size if batched else 0,
        inputs=_tensor_block("input", io.inputs, batched),
        outputs=_tensor_block("output", io.outputs, batched),
        instance_kind=instance_kind,
        instance_count=instance_count,
        batching=batching,
    )


def render_bls_config(name: str, instance_count: int, decoupled: bool, templates: Path | None = None) -> str:
    text = string.Template(((templates or templates_dir()) / "fluxmusic" / "config.pbtxt.in").read_text())
    return text.substitute(name=name, instance_count=instance_count, decoupled="true" if decoupled else "false")


# ----------------------------------------------------------------------------------------------- parsing
def parse_config(text: str, source: str):
    """Parse config.pbtxt text with Triton's ``ModelConfig`` schema; errors name the file and the line."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise FluxMusicError(f"{source} does not parse as a Triton model config: {e}") from e


def data_type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)
