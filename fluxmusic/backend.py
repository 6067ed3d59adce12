"""The backend protocols and the torch backend: the five component calls a generation makes.

:class:`Backend` declares what every backend provides; :class:`StepBackend` and :class:`EncoderBackend` declare
the optional capabilities (a fused Euler step, a VAE encoder), so callers test for a declared protocol with
``isinstance`` instead of probing for attributes. Other backends (``fluxmusic.runtime``: onnxruntime,
TensorRT) implement the same protocols; the pipeline only talks to these interfaces. Backends are looked up
by name from :data:`BACKENDS` with a lazy import, so the core package never imports the runtime at module load.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.modeldir import ModelIndex, component_dtype
from fluxmusic.ops import opset_for

#: backend name -> "module:factory"; a factory takes (model_dir, index, device, dtype, **options).
BACKENDS = {
    "torch": "fluxmusic.backend:TorchBackend",
    "onnx": "fluxmusic.runtime.onnx_backend:OnnxBackend",
    "tensorrt": "fluxmusic.runtime.tensorrt_backend:TensorRTBackend",
}


@runtime_checkable
class Backend(Protocol):
    """What every backend provides: the five component calls of a generation and the RoPE table.

    The pipeline, the validation and the servers use only these. Backends on exported graphs
    (``fluxmusic.runtime``: onnxruntime, TensorRT; the Triton BLS model's ``InferBackend``) accept ``rope`` in
    :meth:`velocity` for the same call signature but derive the table inside the graph from the lengths.
    """

    name: str
    device: torch.device
    transformer_config: FluxMusicConfig

    def t5_encode(self, input_ids: Tensor) -> Tensor: ...
    def clap_encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...
    def velocity(self, x: Tensor, t: Tensor, txt: Tensor, y: Tensor, rope: Tensor) -> Tensor: ...
    def rope(self, txt_len: int, grid_h: int, grid_w: int) -> Tensor: ...
    def vae_decode(self, latent: Tensor) -> Tensor: ...
    def vocode(self, mel: Tensor) -> Tensor: ...


@runtime_checkable
class StepBackend(Backend, Protocol):
    """A backend that may run a whole Euler CFG step in one call (the fused ``euler_step`` graph or engine).

    ``has_step_graph`` says whether this instance has the fused graph loaded; :meth:`euler_step` computes
    ``x - dt (v_u + g (v_c - v_u))`` with ``v`` the velocity of ``[x; x]`` under ``[txt; null_txt]``.
    """

    has_step_graph: bool

    def euler_step(
        self,
        x: Tensor,
        t: Tensor,
        dt: Tensor,
        txt: Tensor,
        y: Tensor,
        null_txt: Tensor,
        null_y: Tensor,
        guidance: Tensor,
        rope: Tensor,
    ) -> Tensor: ...


@runtime_checkable
class EncoderBackend(Backend, Protocol):
    """A backend that can also encode audio into the VAE latent (training, audio-conditioned generation)."""

    def vae_encode(self, mel: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor: ...


@runtime_checkable
class ContextBackend(Backend, Protocol):
    """A backend whose transformer may take trained masked conditioning (``context_channels``): ``takes_context``
    says whether this model has it, and :meth:`velocity` then accepts ``context`` [B, L, 2C]."""

    takes_context: bool

    def velocity(self, x: Tensor, t: Tensor, txt: Tensor, y: Tensor, rope: Tensor,
                 context: Tensor | None = None) -> Tensor: ...


def fused_step(backend: Backend) -> StepBackend | None:
    """The backend as a :class:`StepBackend` when it has the fused step graph loaded, else ``None``."""
    if isinstance(backend, StepBackend) and backend.has_step_graph:
        return backend
    return None


def make_backend(
    name: str, model_dir: str | Path, index: ModelIndex, device: str, dtype: torch.dtype, **options
) -> Backend:
    """Construct backend ``name`` (see :data:`BACKENDS`); ``options`` go to its constructor."""
    if name not in BACKENDS:
        raise FluxMusicError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    module_name, factory = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FluxMusicError(f"backend {name!r} is not available here: {e}") from e
    backend = getattr(module, factory)(model_dir, index, device=device, dtype=dtype, **options)
    if not isinstance(backend, Backend):  # a programming error in a backend, not a user error
        raise TypeError(f"{BACKENDS[name]} does not implement fluxmusic.backend.Backend")
    return backend


def check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FluxMusicError(f"device {device!r} is not a valid torch device (e.g. cpu, cuda, cuda:1)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FluxMusicError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return dev


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


#: what ``--dtype`` accepts: the names above plus "auto"
DTYPE_CHOICES = ("auto", *DTYPES)


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic in hardware: CUDA with bf16 support (Ampere and later), or an x86
    CPU with AVX512-BF16 or AMX (Linux CPU flags). Elsewhere bf16 is emulated and slower than fp32."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return False  # not a device: check_device reports it with the allowed forms
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def parse_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name; ``auto`` is bf16 where ``device`` computes it natively, else fp32 (the default of every
    front end: on the bundled default bf16 halves the solve at equal eval scores, docs/performance.md)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise FluxMusicError(f"dtype {name!r} is not supported; allowed: {', '.join(DTYPE_CHOICES)}")
    return DTYPES[name]


@torch.library.custom_op("fluxmusic::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    """The op set attention named ``impl`` (fluxmusic.ops.ATTENTION_OPSETS) as one op torch.compile does not
    trace into."""
    from fluxmusic.ops import ATTENTION_OPSETS

    return ATTENTION_OPSETS[impl].attention(q, k, v)


@_attention_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    b, h, lq, _ = q.shape
    return q.new_empty(b, lq, h * v.shape[-1])


def _opaque_attention(attention: Any) -> Any:
    """``attention`` as an op that torch.compile keeps whole: the fused kernel is already at GEMM speed, and
    tracing the blocked loop would unroll it. A registered op keeps the whole forward one graph: a
    ``torch.compiler.disable`` region broke it into ~50 graphs, each with its own guard checks and calling
    overhead (2-3 % of an evaluation at the ``small`` shapes, docs/performance.md). Unknown attention functions
    stay eager behind a graph break."""
    from fluxmusic.ops import ATTENTION_OPSETS

    for name, ops in ATTENTION_OPSETS.items():
        if attention is ops.attention:

            def opaque(q: Tensor, k: Tensor, v: Tensor, impl: str = name) -> Tensor:
                if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                    return attention(q, k, v)  # (under autograd every op set runs SDPA, which is traced)
                return _attention_op(q, k, v, impl)

            return opaque
    return torch.compiler.disable(attention)


def compile_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` (inductor) of the transformer's forward, in place: fuses the elementwise chains between
    the GEMMs (modulation, norms, RoPE, gates). Calls without autograd compile with the weights frozen as
    constants, so later changes to the weights are not seen: compile a model once it is loaded. The attention op
    runs as it is, as one opaque op in the graph (:func:`_opaque_attention`). Compiling takes tens of seconds per
    new input shape (batch size, sequence length), once per process."""
    import dataclasses

    from fluxmusic import ops as reference

    changes: dict[str, Any] = {"attention": _opaque_attention(model.ops.attention)}
    plain_qk = (reference.qk_rmsnorm_rope, reference.fused_qk_rmsnorm_rope)
    if model.ops.qk_rmsnorm_rope in plain_qk and model.ops.project_qkv is reference.project_qkv:
        # RoPE on contiguous halves instead of adjacent pairs, with the projection weights reordered to match
        # (folded into the frozen constants): inductor gathers the pair form element by element, and fuses the
        # halves form with its neighbours, which the eager C kernel cannot be (docs/performance.md).
        changes.update(project_qkv=reference.project_qkv_halves, qk_rmsnorm_rope=reference.qk_rmsnorm_rope_halves)
    model.ops = dataclasses.replace(model.ops, **changes)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    # Freezing folds the weights in as constants, which lets inductor pre-pack them for oneDNN and fuse pointwise
    # ops into the linear layers on the CPU: 9 % faster per evaluation at the `small` shapes (docs/performance.md).
    # It applies to inference graphs only (no autograd), which is what this function is for.
    # (torch.compile's options={"freezing": True} does not reach the freezing pass in torch 2.13, measured: the
    # output and speed were the unfrozen ones; the config has to be set while the first call compiles.)
    compiled = torch.compile(model.forward, dynamic=False)

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(freezing=not torch.is_grad_enabled()):
            return compiled(*args, **kwargs)

    model.forward = forward
    return model


class TorchBackend:
    """Eager PyTorch. ``dtype`` applies to the transformer and text encoders; the VAE and vocoder stay fp32.

    ``autocast_bf16`` runs the transformer under bf16 autocast with fp32 weights (fast on CPUs with
    AVX512-BF16, and on recent GPUs); ``dtype=bfloat16`` stores the weights in bf16 instead (no casts per
    call, half the memory). ``attention`` picks the transformer's attention op (:func:`fluxmusic.ops.opset_for`):
    ``auto`` uses the fused CPU kernel (block-GEMM attention where it cannot run) whenever it runs in bf16/fp16 on
    the CPU; ``sdpa``, ``blocked`` or ``fused`` force one.
    ``compile`` wraps the transformer in ``torch.compile`` (:func:`compile_transformer`): faster per evaluation,
    slow to build (worth it for large models and long-running servers, not for one short clip of a tiny one).
    """

    name = "torch"

    def __init__(
        self,
        model_dir: str | Path,
        index: ModelIndex,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        autocast_bf16: bool = False,
        attention: str = "auto",
        compile: bool = False,
    ) -> None:
        from fluxmusic.components import load_clap_text, load_t5, load_vae, load_vocoder
        from fluxmusic.transformer_io import load_transformer

        model_dir = Path(model_dir)
        self.device = check_device(device)
        self.dtype = dtype
        # Checked before anything loads: a bad choice fails at once.
        ops = opset_for(attention, torch.bfloat16 if autocast_bf16 else dtype, self.device)
        self.transformer = load_transformer(model_dir / "transformer", self.device, dtype)
        self.transformer_config = self.transformer.config
        self.t5 = load_t5(model_dir / "text_encoder", dtype).to(self.device)
        self.clap = load_clap_text(model_dir / "clap", dtype).to(self.device)
        self.vae = load_vae(model_dir / "vae", component_dtype("vae", dtype)).to(self.device)
        self.vocoder = load_vocoder(model_dir / "vocoder", component_dtype("vocoder", dtype)).to(self.device)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.autocast_bf16 = autocast_bf16
        self.transformer.ops = ops
        if compile:
            compile_transformer(self.transformer)

    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def t5_encode(self, input_ids: Tensor) -> Tensor:
        return self.t5(input_ids=input_ids.to(self.device)).last_hidden_state.float()

    @torch.no_grad()
    def clap_encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.clap(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.pooler_output.float()

    @property
    def takes_context(self) -> bool:
        """Whether the transformer has trained masked conditioning (its config's ``context_channels``)."""
        return self.transformer.takes_context

    @torch.no_grad()
    def velocity(self, x: Tensor, t: Tensor, txt: Tensor, y: Tensor, rope: Tensor,
                 context: Tensor | None = None) -> Tensor:
        dt = self.dtype
        with self._autocast():
            v = self.transformer(x.to(dt), t.to(dt), txt.to(dt), y.to(dt), rope,
                                 context=None if context is None else context.to(dt))
        return v.float()

    def rope(self, txt_len: int, grid_h: int, grid_w: int) -> Tensor:
        return self.transformer.rope_for(txt_len, grid_h, grid_w)

    @torch.no_grad()
    def vae_decode(self, latent: Tensor) -> Tensor:
        """Scaled latent [B, C, H, W] -> log-mel [B, frames, n_mels]."""
        mel = self.vae.decode(latent.float() / self.scaling_factor).sample
        return mel.squeeze(1)

    @torch.no_grad()
    def vae_encode(self, mel: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Log-mel [B, frames, n_mels] -> scaled latent (posterior mean, or a sample)."""
        dist = self.vae.encode(mel.float().unsqueeze(1).to(self.device)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return z * self.scaling_factor

    @torch.no_grad()
    def vocode(self, mel: Tensor) -> Tensor:
        """Log-mel [B, frames, n_mels] -> waveform [B, frames * hop]."""
        wave = self.vocoder(mel.float())
        return wave if wave.dim() == 2 else wave.unsqueeze(0)
