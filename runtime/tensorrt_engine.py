"""One deserialized TensorRT engine, run on torch CUDA tensors (TensorRT 10 name-based I/O API).

* the engine is deserialized once; one execution context per optimisation profile, created on first use;
* I/O buffers are torch CUDA tensors owned by the runner, one set per (profile, input shapes) and reused
  while the shapes stay the same -- so the addresses TensorRT sees are stable;
* everything runs on the one CUDA stream the runner is given, ordered against torch's current stream;
* optionally a CUDA graph per (profile, shapes): the first call runs normally (TensorRT's shape-dependent
  setup happens there), then the launch is captured and later calls only copy inputs and replay;
* a static engine (batch fixed at B) serves smaller batches by zero-padding the batch dimension.

``tensorrt`` is passed in by the caller, so this module imports without it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fluxmusic.errors import FluxMusicError

log = logging.getLogger("fluxmusic.runtime.tensorrt")

Shape = tuple[int, ...]


def torch_dtype(trt, dtype) -> torch.dtype:
    """TensorRT DataType -> torch dtype (only the types our graphs can carry at their I/O)."""
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = tdt
    if dtype not in table:
        raise FluxMusicError(f"TensorRT I/O type {dtype} is not supported by the fluxmusic runtime")
    return table[dtype]


@dataclass
class Binding:
    """The buffers (and maybe the CUDA graph) of one (profile, input shapes)."""

    profile: int
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]
    graph: torch.cuda.CUDAGraph | None = None
    capture_tried: bool = False
    key: tuple = field(default=())
    context: object | None = None  # its own execution context when it may be captured in a CUDA graph


class EngineRunner:
    """Run one engine. ``batch_inputs`` names the inputs whose first dim is the batch (padding static engines)."""

    def __init__(
        self,
        trt,
        runtime,
        path: str | Path,
        device: torch.device,
        stream: torch.cuda.Stream,
        batch_inputs: Sequence[str] = (),
        cuda_graphs: bool = False,
        max_bindings: int = 8,
    ) -> None:
        self.path = Path(path)
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise FluxMusicError(
                f"TensorRT cannot load {self.path}: it was built by another TensorRT version or for another GPU; "
                "rebuild it with `fluxmusic export tensorrt`"
            )
        self.trt, self.device, self.stream = trt, device, stream
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.batch_inputs = tuple(n for n in batch_inputs if n in self.inputs)
        # (min, max) per input per profile, as the engine reports them (the authority, not our plan)
        self.ranges: list[dict[str, tuple[Shape, Shape]]] = []
        for p in range(self.engine.num_optimization_profiles):
            r = {}
            for n in self.inputs:
                lo, _opt, hi = self.engine.get_tensor_profile_shape(n, p)
                r[n] = (tuple(lo), tuple(hi))
            self.ranges.append(r)
        self.cuda_graphs = cuda_graphs
        self.max_bindings = max_bindings
        self._contexts: dict[int, object] = {}  # profile -> context shared by the bindings without graphs
        self._active: dict[int, tuple] = {}  # id(context) -> binding key it is configured for
        self._bindings: OrderedDict[tuple, Binding] = OrderedDict()

    # ------------------------------------------------------------------------------------- selection
    def select(self, shapes: Mapping[str, Shape]) -> tuple[int, dict[str, Shape]]:
        """(profile, shapes to bind): the first profile holding the shapes, else one whose fixed batch can hold
        them after zero-padding; raises naming the shapes and what the engine was built for."""
        chosen = select_profile(self.ranges, shapes, self.batch_inputs)
        if chosen is not None:
            return chosen
        built = "; ".join(
            f"profile {p}: " + ", ".join(f"{n} {_fmt(lo)}..{_fmt(hi)}" for n, (lo, hi) in r.items())
            for p, r in enumerate(self.ranges)
        )
        asked = ", ".join(f"{n} {_fmt(s)}" for n, s in shapes.items())
        raise FluxMusicError(
            f"{self.path.name} cannot run shapes {asked}; it was built for {built}. Rebuild with a wider "
            "--max-batch / --durations"
        )

    # ------------------------------------------------------------------------------------- execution
    def _new_context(self, profile: int):
        ctx = self.engine.create_execution_context()
        if ctx is None:
            raise FluxMusicError(f"TensorRT could not create an execution context for {self.path.name}")
        if self.engine.num_optimization_profiles > 1:
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
        return ctx

    def _context(self, binding: Binding):
        """A graph-captured binding owns its context: a captured launch must never see the context re-shaped
        for another binding (TensorRT keeps shape-dependent state in the context). Others share one per profile."""
        if binding.context is not None:
            return binding.context
        if self.cuda_graphs:
            binding.context = self._new_context(binding.profile)
            return binding.context
        if binding.profile not in self._contexts:
            self._contexts[binding.profile] = self._new_context(binding.profile)
        return self._contexts[binding.profile]

    def _configure(self, binding: Binding):
        """Point the binding's context at its shapes and buffers (only when it changes); returns the context."""
        ctx = self._context(binding)
        if self._active.get(id(ctx)) == binding.key:
            return ctx
        for n, t in binding.inputs.items():
            if not ctx.set_input_shape(n, tuple(t.shape)):
                raise FluxMusicError(f"{self.path.name}: TensorRT refused shape {tuple(t.shape)} for {n}")
        if not binding.outputs:
            for n in self.outputs:
                shape = tuple(ctx.get_tensor_shape(n))
                binding.outputs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
        for n, t in (*binding.inputs.items(), *binding.outputs.items()):
            ctx.set_tensor_address(n, t.data_ptr())
        self._active[id(ctx)] = binding.key
        return ctx

    def _binding(self, profile: int, shapes: Mapping[str, Shape]) -> Binding:
        key = (profile, tuple(shapes[n] for n in self.inputs))
        if key in self._bindings:
            self._bindings.move_to_end(key)
            return self._bindings[key]
        if len(self._bindings) >= self.max_bindings:
            old_key, _ = self._bindings.popitem(last=False)
            self._active = {c: k for c, k in self._active.items() if k != old_key}
        # zeros: padded batch rows hold zeros or an earlier call's rows -- finite, and rows are independent
        inputs = {n: torch.zeros(shapes[n], dtype=self.dtypes[n], device=self.device) for n in self.inputs}
        binding = Binding(profile, inputs, {}, key=key)
        self._bindings[key] = binding
        return binding

    def _launch(self, binding: Binding) -> None:
        if binding.graph is not None:
            binding.graph.replay()
            return
        ctx = self._configure(binding)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {self.path.name}")
        if self.cuda_graphs and not binding.capture_tried:
            # capture after a normal run: TensorRT finishes shape-dependent setup on the first enqueue
            binding.capture_tried = True
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    ctx.execute_async_v3(self.stream.cuda_stream)
                binding.graph = graph
            except RuntimeError as e:
                log.warning("CUDA graph capture of %s failed (%s); running it without graphs", self.path.name, e)
                self.cuda_graphs = False

    def __call__(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run on ``feeds`` (any device / dtype: copied into the engine's buffers); fp32 outputs, fresh memory."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise FluxMusicError(f"{self.path.name} needs inputs {', '.join(missing)}")
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        profile, bind_shapes = self.select(shapes)
        binding = self._binding(profile, bind_shapes)
        b = shapes[self.batch_inputs[0]][0] if self.batch_inputs else None
        padded = b is not None and bind_shapes[self.batch_inputs[0]][0] != b
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # inputs were produced on torch's stream
        with torch.cuda.stream(self.stream):
            for n in self.inputs:
                dst = binding.inputs[n]
                (dst[:b] if padded and n in self.batch_inputs else dst).copy_(feeds[n], non_blocking=True)
            self._launch(binding)
            # copies, so a later call reusing the buffers never changes a result the caller holds
            outs = {n: (t[:b] if padded else t).to(torch.float32, copy=True) for n, t in binding.outputs.items()}
        current.wait_stream(self.stream)
        for t in outs.values():
            t.record_stream(current)
        return outs


def select_profile(
    ranges: Sequence[Mapping[str, tuple[Shape, Shape]]], shapes: Mapping[str, Shape], batch_inputs: Sequence[str] = ()
) -> tuple[int, dict[str, Shape]] | None:
    """(profile, shapes to bind) for a call: the first profile whose (min, max) ranges hold ``shapes``; else the
    first whose batch can hold them after zero-padding ``batch_inputs`` up to its min batch (a static engine);
    None if no profile fits."""
    for p, r in enumerate(ranges):
        if all(_within(shapes[n], *r[n]) for n in r):
            return p, dict(shapes)
    if batch_inputs:
        b = shapes[batch_inputs[0]][0]
        for p, r in enumerate(ranges):
            target = max(r[n][0][0] for n in batch_inputs)
            if target < b:
                continue
            padded = {n: ((target, *s[1:]) if n in batch_inputs else s) for n, s in shapes.items()}
            if all(_within(padded[n], *r[n]) for n in r):
                return p, padded
    return None


def _within(shape: Shape, lo: Shape, hi: Shape) -> bool:
    return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape))
