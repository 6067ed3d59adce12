"""The ``tensorrt`` backend: the Backend protocol of :mod:`fluxmusic.backend` on TensorRT engines.

Engines come from ``fluxmusic export tensorrt --out DIR`` and are looked up by name for *this* TensorRT
version and GPU (a stale engine is refused, never loaded). All engines share one CUDA stream. A component
without an engine runs on onnxruntime (when ``onnx_dir`` is given) or on torch, loaded for that component
only. ``cuda_graphs`` captures one CUDA graph per (component, shape) for the components of the sampling
loop (the transformer, and the fused Euler step when it is used).

Imports without a GPU or TensorRT; constructing it without CUDA raises one clear FluxMusicError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from fluxmusic.export.spec import COMPONENT_NAMES, CONTEXT_INPUT, STEP_NAME
from fluxmusic.export.tensorrt_plan import MANIFEST, find_engine, sm_of
from torch import Tensor

from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.modeldir import ModelIndex
from fluxmusic.rope import RopeCache

log = logging.getLogger("fluxmusic.runtime.tensorrt")

NEEDS_CUDA = (
    "the tensorrt backend needs a CUDA GPU, and CUDA is not available here; use --backend torch or --backend onnx"
)
#: Inputs whose first dim is the batch, per component (every input of the exported graphs).
BATCH_INPUTS = {
    "t5": ("input_ids",),
    "clap": ("input_ids", "attention_mask"),
    "transformer": ("x", "t", "txt", "y", CONTEXT_INPUT),
    "vae_decoder": ("latent",),
    "vocoder": ("mel",),
    STEP_NAME: ("x", "t", "dt", "txt", "y", "null_txt", "null_y", "guidance", CONTEXT_INPUT),
}
#: Components the sampling loop calls every step: the ones CUDA graphs pay off for.
LOOP_COMPONENTS = ("transformer", STEP_NAME)


class TensorRTBackend:
    """Backend on TensorRT engines, with per-component fallback to onnxruntime or torch."""

    name = "tensorrt"

    def __init__(
        self,
        model_dir: str | Path,
        index: ModelIndex,
        device: str = "cuda",
        dtype: torch.dtype = torch.float32,
        engine_dir: str | Path | None = None,
        onnx_dir: str | Path | None = None,
        precision: str | None = None,
        cuda_graphs: bool | Sequence[str] = False,
        step_graph: bool = False,
        **fallback_options,
    ) -> None:
        if not torch.cuda.is_available():
            raise FluxMusicError(NEEDS_CUDA)
        dev = torch.device(device)
        if dev.type != "cuda":
            raise FluxMusicError(f"the tensorrt backend runs on a CUDA device; got device {device!r} (use cuda)")
        if engine_dir is None:
            raise FluxMusicError("the tensorrt backend needs engine_dir (the --out DIR of `fluxmusic export tensorrt`)")
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir():
            raise FluxMusicError(f"engine directory {engine_dir} does not exist")
        from fluxmusic.export.tensorrt_build import make_logger, require_tensorrt
        from fluxmusic.runtime.tensorrt_engine import EngineRunner

        trt = require_tensorrt()
        self.model_dir, self.index, self.dtype = Path(model_dir), index, dtype
        self.device = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device)  # the one stream every engine runs on
        self.trt_version = trt.__version__
        self.sm = sm_of(torch.cuda.get_device_capability(self.device))
        self._runtime = trt.Runtime(make_logger(trt))
        graphs = set(LOOP_COMPONENTS if cuda_graphs is True else (cuda_graphs or ()))
        manifest = _read_manifest(engine_dir)
        self.engines: dict[str, EngineRunner] = {}
        wanted = (*COMPONENT_NAMES, STEP_NAME) if step_graph else COMPONENT_NAMES
        for comp in wanted:
            path = find_engine(engine_dir, comp, self.trt_version, self.sm, precision)
            if path is None:
                continue
            built_with = manifest.get(path.name, {}).get("tensorrt")
            if built_with and built_with != self.trt_version:
                raise FluxMusicError(
                    f"{path} was built by TensorRT {built_with}; this is {self.trt_version}: rebuild the engines"
                )
            self.engines[comp] = EngineRunner(
                trt, self._runtime, path, self.device, self.stream, BATCH_INPUTS[comp], cuda_graphs=comp in graphs
            )
        if not self.engines:
            raise FluxMusicError(
                f"{engine_dir} holds no TensorRT engine for TensorRT {self.trt_version} on sm{self.sm}"
                + (f" in {precision}" if precision else "")
            )
        self.transformer_config = FluxMusicConfig.load(self.model_dir / "transformer" / "config.json")
        check_context_inputs(self.transformer_config, {c: r.inputs for c, r in self.engines.items()})
        self._rope = RopeCache(self.transformer_config.axes_dim, self.transformer_config.theta)
        missing = [c for c in COMPONENT_NAMES if c not in self.engines]
        self._fallback = _Fallback(self.model_dir, index, self.device, dtype, onnx_dir, missing, fallback_options)
        #: component -> what runs it ("tensorrt:<engine file>", "onnx", "torch")
        self.placement = {c: f"tensorrt:{r.path.name}" for c, r in self.engines.items()}
        self.placement.update({c: self._fallback.kind for c in missing})
        if missing:
            log.warning("no TensorRT engine for %s: running on %s", ", ".join(missing), self._fallback.kind)

    # ------------------------------------------------------------------------------------- Backend protocol
    @torch.no_grad()
    def t5_encode(self, input_ids: Tensor) -> Tensor:
        if "t5" in self.engines:
            return self.engines["t5"]({"input_ids": input_ids})["last_hidden_state"]
        return self._fallback.t5_encode(input_ids)

    @torch.no_grad()
    def clap_encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if "clap" in self.engines:
            return self.engines["clap"]({"input_ids": input_ids, "attention_mask": attention_mask})["pooler_output"]
        return self._fallback.clap_encode(input_ids, attention_mask)

    @property
    def takes_context(self) -> bool:
        """Whether the transformer has trained masked conditioning (its engine then has the ``context`` input)."""
        return self.transformer_config.context_channels > 0

    @torch.no_grad()
    def velocity(self, x: Tensor, t: Tensor, txt: Tensor, y: Tensor, rope: Tensor,
                 context: Tensor | None = None) -> Tensor:
        """``rope`` feeds only the torch fallback; the engine derives the table from the lengths. ``context``:
        trained masked conditioning (None on a context model = zeros, exactly the torch model's None)."""
        if "transformer" in self.engines:
            feeds = {"x": x, "t": t, "txt": txt, "y": y, **context_feed(self.transformer_config, x, context)}
            return self.engines["transformer"](feeds)["v"]
        if context is None:
            return self._fallback.velocity(x, t, txt, y, rope)
        return self._fallback.velocity(x, t, txt, y, rope, context=context)

    def rope(self, txt_len: int, grid_h: int, grid_w: int) -> Tensor:
        return self._rope.get(txt_len, grid_h, grid_w, self.device)

    @torch.no_grad()
    def vae_decode(self, latent: Tensor) -> Tensor:
        """Scaled latent [B, C, H, W] -> log-mel [B, frames, n_mels] (the graph divides by the scaling factor)."""
        if "vae_decoder" in self.engines:
            return self.engines["vae_decoder"]({"latent": latent})["mel"]
        return self._fallback.vae_decode(latent)

    @torch.no_grad()
    def vocode(self, mel: Tensor) -> Tensor:
        if "vocoder" in self.engines:
            return self.engines["vocoder"]({"mel": mel})["waveform"]
        return self._fallback.vocode(mel)

    # ------------------------------------------------------------------------------------- extras
    @property
    def has_step_graph(self) -> bool:
        return STEP_NAME in self.engines

    @torch.no_grad()
    def euler_step(self, x, t, dt, txt, y, null_txt, null_y, guidance, rope, context=None) -> Tensor:
        """One fused CFG Euler step on the ``euler_step`` engine (needs ``step_graph=True`` and the engine);
        the engine derives RoPE from the lengths, so ``rope`` is not fed. ``context`` as in :meth:`velocity`."""
        if STEP_NAME not in self.engines:
            raise FluxMusicError("no euler_step engine loaded (build it and pass step_graph=True)")
        feeds = {"x": x, "t": t, "dt": dt, "txt": txt, "y": y, "null_txt": null_txt, "null_y": null_y,
                 **context_feed(self.transformer_config, x, context)}
        return self.engines[STEP_NAME]({**feeds, "guidance": guidance})["x_next"]


def context_feed(cfg: FluxMusicConfig, x: Tensor, context: Tensor | None) -> dict[str, Tensor]:
    """The ``context`` feed of an engine: the given context, zeros for "no known audio" on a context model
    (``context_in`` of zeros is exactly its bias, the torch model's ``context=None``), nothing on a plain one."""
    if not cfg.context_channels:
        if context is not None:
            raise FluxMusicError("this transformer has no context input (context_channels 0); pass context=None")
        return {}
    if context is None:
        context = x.new_zeros(*x.shape[:2], cfg.context_channels)
    return {CONTEXT_INPUT: context}


def check_context_inputs(cfg: FluxMusicConfig, engine_inputs: dict[str, Sequence[str]]) -> None:
    """Refuse a transformer / step engine whose ``context`` input disagrees with the model's config (an engine
    built from an export made before the model had trained conditioning would ignore the given audio)."""
    for comp in ("transformer", STEP_NAME):
        if comp not in engine_inputs:
            continue
        has = CONTEXT_INPUT in engine_inputs[comp]
        if has != bool(cfg.context_channels):
            raise FluxMusicError(
                f"the {comp} engine {'has' if has else 'lacks'} the {CONTEXT_INPUT!r} input but the model's "
                f"transformer has context_channels {cfg.context_channels}: re-export the ONNX graphs "
                "(`fluxmusic export onnx`) and rebuild the engines"
            )


def _read_manifest(engine_dir: Path) -> dict:
    path = engine_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("engines", {}))
    except (json.JSONDecodeError, AttributeError) as e:
        raise FluxMusicError(f"{path} is not a valid engine manifest: {e}") from e


class _Fallback:
    """The components without an engine: onnxruntime if an ONNX export is given, else torch -- loading only
    those components (a T5-XXL is not loaded into GPU memory just because the VAE has no engine)."""

    def __init__(self, model_dir, index, device, dtype, onnx_dir, components: Sequence[str], options: dict) -> None:
        self.kind = "onnx" if onnx_dir is not None else "torch"
        self._fns: dict[str, Callable] = {}
        if not components:
            return
        if onnx_dir is not None:
            from fluxmusic.backend import make_backend

            be = make_backend("onnx", model_dir, index, device=str(device), dtype=dtype, onnx_dir=onnx_dir, **options)
            self._fns = {c: getattr(be, _METHOD[c]) for c in components}
        else:
            self._fns = {c: _torch_component(model_dir, c, device, dtype) for c in components}

    def __getattr__(self, method: str):
        comp = _COMPONENT_OF.get(method)
        if comp is None or comp not in self.__dict__.get("_fns", {}):
            raise AttributeError(method)
        return self._fns[comp]


_METHOD = {
    "t5": "t5_encode",
    "clap": "clap_encode",
    "transformer": "velocity",
    "vae_decoder": "vae_decode",
    "vocoder": "vocode",
}
_COMPONENT_OF = {m: c for c, m in _METHOD.items()}


def _torch_component(model_dir: Path, component: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """One component on torch, with the TorchBackend's semantics (VAE and vocoder in fp32)."""
    from fluxmusic.components import load_clap_text, load_t5, load_vae, load_vocoder
    from fluxmusic.transformer_io import load_transformer

    if component == "t5":
        t5 = load_t5(model_dir / "text_encoder", dtype).to(device)
        return lambda ids: t5(input_ids=ids.to(device)).last_hidden_state.float()
    if component == "clap":
        clap = load_clap_text(model_dir / "clap", dtype).to(device)
        return lambda ids, mask: clap(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output.float()
    if component == "transformer":
        model = load_transformer(model_dir / "transformer", device, dtype)

        def velocity(x: Tensor, t: Tensor, txt: Tensor, y: Tensor, rope: Tensor,
                     context: Tensor | None = None) -> Tensor:
            ctx = None if context is None else context.to(device, dtype)
            return model(x.to(dtype), t.to(dtype), txt.to(dtype), y.to(dtype), rope, context=ctx).float()

        return velocity
    if component == "vae_decoder":
        vae = load_vae(model_dir / "vae").to(device)
        scale = float(vae.config.scaling_factor)
        return lambda latent: vae.decode(latent.float() / scale).sample.squeeze(1)
    if component == "vocoder":
        vocoder = load_vocoder(model_dir / "vocoder").to(device)

        def vocode(mel: Tensor) -> Tensor:
            wave = vocoder(mel.float())
            return wave if wave.dim() == 2 else wave.unsqueeze(0)

        return vocode
    raise FluxMusicError(f"unknown component {component!r}")
