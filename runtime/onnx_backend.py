"""The onnxruntime backend: the :class:`fluxmusic.backend.Backend` calls on exported ONNX graphs.

``FluxMusicPipeline.from_pretrained(model_dir, backend="onnx", onnx_dir=...)`` or
``fluxmusic generate --backend onnx --onnx-dir DIR``.

- Providers: TensorRT EP, then CUDA EP, then CPU EP, whichever this onnxruntime build has; ``providers=``
  overrides (names or (name, options) pairs, as onnxruntime takes them).
- Session options: ``graph_optimization_level`` ("disable", "basic", "extended", "all"), ``intra_op_threads``
  and ``inter_op_threads`` (0 = onnxruntime's default), ``enable_profiling``.
- IO binding: inputs are bound to the caller's torch tensors' memory and outputs to torch tensors this
  backend allocates, on the tensors' device (CPU, or CUDA with a CUDA build). So ``velocity`` in the
  sampling loop copies nothing: no numpy conversion of the [B, L, 4096] text tensor or the state every step
  (the graphs derive the RoPE table themselves from the lengths); the fused step graph (:meth:`euler_step`) is
  one call per Euler step of the one sampler loop. On CPU this saves the per-step
  copies of the inputs and the output (``session.run`` with numpy arrays copies every output into a new
  array); on a GPU it also keeps host-device transfers out of the loop.
- ``variant``: which transformer graph to run, "fp32" (default), "fp16" or "int8" (dynamic quantisation,
  CPU).
- A component missing from the ONNX directory runs on PyTorch instead, with a log line saying so.
- The export must come from this model directory: the config hash of every component is checked at load
  (``fluxmusic export validate`` checks the hash of every file too).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fluxmusic.backend import check_device
from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.modeldir import ModelIndex

log = logging.getLogger("fluxmusic.onnx")

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
OPT_LEVELS = ("disable", "basic", "extended", "all")
_NP = {"float32": np.float32, "int64": np.int64, "float16": np.float16}
_TORCH = {"float32": torch.float32, "int64": torch.int64, "float16": torch.float16}


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [p for p in PROVIDER_ORDER if p in available]


def session_options(
    graph_optimization_level: str = "all",
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    enable_profiling: bool = False,
):
    import onnxruntime as ort

    if graph_optimization_level not in OPT_LEVELS:
        raise FluxMusicError(
            f"graph optimisation level {graph_optimization_level!r} is not one of: {', '.join(OPT_LEVELS)}"
        )
    for name, v in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise FluxMusicError(f"{name} {v!r} must be an integer >= 0 (0 = onnxruntime's default)")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization_level]
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.enable_profiling = enable_profiling
    so.log_severity_level = 3
    return so


class OrtGraph:
    """One onnxruntime session with IO binding against torch tensors (zero-copy in and out)."""

    def __init__(self, path: Path, spec, providers, options, device: torch.device) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise FluxMusicError(
                f"{path} cannot be loaded by onnxruntime (corrupt or not an ONNX model?): "
                f"{str(e).splitlines()[0][:300]}"
            ) from e
        self.path, self.spec, self.device = path, spec, device
        names = [i.name for i in self.session.get_inputs()]
        want = [t.name for t in spec.inputs]
        if names != want:
            raise FluxMusicError(f"{path} has inputs {names}; the export contract says {want} (an export made "
                                 "before this model's config or this fluxmusic version: re-export it with "
                                 "`fluxmusic export onnx`)")
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def _ort_device(self, t: Tensor) -> tuple[str, int]:
        return ("cuda", t.device.index or 0) if t.device.type == "cuda" else ("cpu", 0)

    def run(self, out_shape: tuple[int, ...], **inputs: Tensor) -> Tensor:
        """Bind inputs (as contiguous tensors of the spec's dtype) and one output of ``out_shape``; run."""
        binding = self.session.io_binding()
        keep = []
        for t_spec in self.spec.inputs:
            t = inputs[t_spec.name]
            t = t.to(device=self.device, dtype=_TORCH[t_spec.dtype]).contiguous()
            keep.append(t)
            dev, idx = self._ort_device(t)
            binding.bind_input(t_spec.name, dev, idx, _NP[t_spec.dtype], tuple(t.shape), t.data_ptr())
        o_spec = self.spec.outputs[0]
        out = torch.empty(out_shape, dtype=_TORCH[o_spec.dtype], device=self.device)
        dev, idx = self._ort_device(out)
        binding.bind_output(o_spec.name, dev, idx, _NP[o_spec.dtype], tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        del keep
        return out


class OnnxBackend:
    """onnxruntime sessions per component, torch for components the export does not have."""

    name = "onnx"

    def __init__(
        self,
        model_dir: str | Path,
        index: ModelIndex,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        onnx_dir: str | Path | None = None,
        providers: list | None = None,
        variant: str = "fp32",
        graph_optimization_level: str = "all",
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        enable_profiling: bool = False,
        **unknown,
    ) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise FluxMusicError("the onnx backend needs onnxruntime: pip install 'fluxmusic[onnx]'") from e
        from fluxmusic.export.onnx_export import (
            SOURCE_DIRS,
            check_manifest_matches,
            component_config,
            graph_filename,
            read_manifest,
            verify_file_entry,
        )
        from fluxmusic.export.spec import ENCODER_NAME, STEP_NAME, component_specs

        if unknown:
            raise FluxMusicError(f"unknown onnx backend options {sorted(unknown)}")
        if onnx_dir is None:
            raise FluxMusicError("the onnx backend needs an exported ONNX directory: --onnx-dir DIR (onnx_dir=...)")
        model_dir, onnx_dir = Path(model_dir), Path(onnx_dir)
        self.model_dir, self.onnx_dir, self.index = model_dir, onnx_dir, index
        self.device = check_device(device)
        if dtype != torch.float32:
            log.info("onnx backend: dtype %s ignored; precision is the graph's (variant=%r)", dtype, variant)
        if variant not in ("fp32", "fp16", "int8"):
            raise FluxMusicError(f"variant {variant!r} is not one of: fp32, fp16, int8")
        self.variant = variant
        manifest = read_manifest(onnx_dir)
        check_manifest_matches(model_dir, manifest, manifest["components"], weights=False)
        self.transformer_config = FluxMusicConfig.from_dict(component_config(model_dir, "transformer"))
        t5_width = int(component_config(model_dir, "t5")["d_model"])
        clap_cfg = component_config(model_dir, "clap")
        clap_width = int(clap_cfg.get("text_config", clap_cfg).get("hidden_size", 768))
        self.specs = component_specs(self.transformer_config, index.geometry, t5_width, clap_width, include_step=True,
                                     include_encoder=True)
        if providers is None:
            providers = default_providers()
            if self.device.type == "cpu":
                providers = ["CPUExecutionProvider"]
        options = session_options(graph_optimization_level, intra_op_threads, inter_op_threads, enable_profiling)
        self.graphs: dict[str, OrtGraph] = {}
        self.fallback: list[str] = []
        for comp in (*SOURCE_DIRS,):
            want = variant if comp in ("transformer", STEP_NAME) else "fp32"
            entry = manifest["components"].get(comp, {}).get("variants", {})
            if comp == STEP_NAME and want not in entry:
                continue  # an fp32 step graph would silently replace the requested transformer variant
            fname = graph_filename(comp, want if want in entry else "fp32")
            if want not in entry and comp in ("transformer",) and want != "fp32":
                raise FluxMusicError(
                    f"{onnx_dir} has no {variant} transformer ({graph_filename(comp, want)}); export it with "
                    f"`fluxmusic export onnx --{variant}` or choose variant fp32"
                )
            path = onnx_dir / fname
            if not entry or not path.is_file():
                if comp not in (STEP_NAME, ENCODER_NAME):  # optional graphs (the encoder falls back quietly)
                    self.fallback.append(comp)
                continue
            verify_file_entry(onnx_dir, entry.get(want if want in entry else "fp32", {}))
            self.graphs[comp] = OrtGraph(path, self.specs[comp], providers, options, self.device)
        self.providers = next(iter(self.graphs.values())).providers if self.graphs else []
        if self.fallback:
            log.warning(
                "onnx backend: %s not in %s; running %s on torch",
                ", ".join(self.fallback),
                onnx_dir,
                "it" if len(self.fallback) == 1 else "them",
            )
        self._torch: dict[str, object] = {}
        self._rope_cache = None
        self._vocoder_cfg = component_config(model_dir, "vocoder")
        self.scaling_factor = float(component_config(model_dir, "vae_decoder").get("scaling_factor", 1.0))
        log.info("onnx backend: %s on %s (variant %s)", ", ".join(self.graphs), self.providers, variant)

    # ----------------------------------------------------------------------------------- torch fallback
    def _torch_module(self, comp: str):
        if comp not in self._torch:
            from fluxmusic.export.onnx_export import load_graph_module

            self._torch[comp] = load_graph_module(self.model_dir, comp).to(self.device)
        return self._torch[comp]

    # ------------------------------------------------------------------------------------ the protocol
    @torch.no_grad()
    def t5_encode(self, input_ids: Tensor) -> Tensor:
        if "t5" not in self.graphs:
            return self._torch_module("t5")(input_ids.to(self.device))
        b, lt = input_ids.shape
        width = self.specs["t5"].outputs[0].shape[2]
        return self.graphs["t5"].run((b, lt, width), input_ids=input_ids)

    @torch.no_grad()
    def clap_encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if "clap" not in self.graphs:
            return self._torch_module("clap")(input_ids.to(self.device), attention_mask.to(self.device))
        width = self.specs["clap"].outputs[0].shape[1]
        return self.graphs["clap"].run((input_ids.shape[0], width), input_ids=input_ids, attention_mask=attention_mask)

    @property
    def takes_context(self) -> bool:
        """Whether the transformer has trained masked conditioning: its graph then has the ``context`` input
        (the contract checked at load), so ``conditioning auto`` picks the trained route as on torch."""
        return self.transformer_config.context_channels > 0

    def _context(self, x: Tensor, context: Tensor | None) -> dict[str, Tensor]:
        """The ``context`` feed of a context model: the given one, or zeros for "no known audio" (exactly the
        torch model's ``context=None``: the context Linear of zeros is its bias)."""
        from fluxmusic.export.spec import CONTEXT_INPUT

        if not self.takes_context:
            if context is not None:
                raise FluxMusicError("this transformer has no context input (context_channels 0); pass context=None")
            return {}
        if context is None:
            context = x.new_zeros(*x.shape[:2], self.transformer_config.context_channels)
        return {CONTEXT_INPUT: context}

    @torch.no_grad()
    def velocity(self, x: Tensor, t: Tensor, txt: Tensor, y: Tensor, rope: Tensor,
                 context: Tensor | None = None) -> Tensor:
        """``rope`` is accepted for the protocol; the graph (and its torch twin) derive it from the lengths.
        ``context`` [B, L, context_channels]: trained masked conditioning (a model with ``takes_context``)."""
        feeds = self._context(x, context)
        if "transformer" not in self.graphs:
            return self._torch_module("transformer")(x.to(self.device), t, txt, y, *feeds.values())
        return self.graphs["transformer"].run(tuple(x.shape), x=x, t=t, txt=txt, y=y, **feeds)

    def rope(self, txt_len: int, grid_h: int, grid_w: int) -> Tensor:
        from fluxmusic.rope import RopeCache

        if self._rope_cache is None:
            self._rope_cache = RopeCache(self.transformer_config.axes_dim, self.transformer_config.theta)
        return self._rope_cache.get(txt_len, grid_h, grid_w, self.device)

    @torch.no_grad()
    def vae_decode(self, latent: Tensor) -> Tensor:
        if "vae_decoder" not in self.graphs:
            return self._torch_module("vae_decoder")(latent.float().to(self.device))
        g = self.index.geometry
        b, _, frames, _ = latent.shape
        return self.graphs["vae_decoder"].run((b, frames * g.vae_downsample, g.mel_bins), latent=latent)

    @torch.no_grad()
    def vae_encode(self, mel: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Log-mel [B, frames, n_mels] -> scaled latent (posterior mean): ``vae_encoder.onnx`` when exported
        (``fluxmusic export onnx --encoder``), else the torch VAE encoder. Audio in needs no sampling."""
        from fluxmusic.export.spec import ENCODER_NAME

        if sample:
            raise FluxMusicError("the onnx backend's VAE encoder gives the posterior mean only (sample=False)")
        g = self.index.geometry
        b, frames = mel.shape[0], mel.shape[1] // g.vae_downsample
        if ENCODER_NAME not in self.graphs:
            return self._torch_module(ENCODER_NAME)(mel.float().to(self.device))
        return self.graphs[ENCODER_NAME].run((b, g.latent_channels, frames, g.latent_width), mel=mel.float())

    @torch.no_grad()
    def vocode(self, mel: Tensor) -> Tensor:
        if "vocoder" not in self.graphs:
            return self._torch_module("vocoder")(mel.float().to(self.device))
        b, frames, _ = mel.shape
        return self.graphs["vocoder"].run((b, self.vocoder_length(frames)), mel=mel)

    def vocoder_length(self, frames: int) -> int:
        """Samples the vocoder makes from ``frames`` mel frames. The iSTFT vocoder (``fluxmusic_vocos``, the
        bundled default's) makes exactly frames * hop; in the HiFi-GAN each transposed conv (kernel k, stride u,
        padding (k - u) // 2) maps L to (L - 1) u - 2 ((k - u) // 2) + k, a few samples over frames * hop."""
        if "upsample_kernel_sizes" not in self._vocoder_cfg:
            return frames * int(self._vocoder_cfg["hop_length"])
        n = frames
        for u, k in zip(self._vocoder_cfg["upsample_rates"], self._vocoder_cfg["upsample_kernel_sizes"]):
            n = (n - 1) * u - 2 * ((k - u) // 2) + k
        return n

    # ------------------------------------------------------------------------------ the fused step graph
    @property
    def has_step_graph(self) -> bool:
        from fluxmusic.export.spec import STEP_NAME

        return STEP_NAME in self.graphs

    @torch.no_grad()
    def euler_step(self, x, t, dt, txt, y, null_txt, null_y, guidance, rope, context=None) -> Tensor:
        """One Euler CFG step in one graph call: x - dt (v_u + g (v_c - v_u)). The pipeline plugs it into
        ``flow.sample`` as the step function (the one sampler loop) when :attr:`has_step_graph`. ``rope`` is
        accepted for the protocol; the step graph derives the table from the lengths. ``context`` [B, L, 2C]
        (a context model; None = zeros) goes to the cond and the uncond rows alike."""
        from fluxmusic.export.spec import STEP_NAME

        if STEP_NAME not in self.graphs:
            raise FluxMusicError(f"{self.onnx_dir} has no {STEP_NAME} graph; export it with --step-graph")
        return self.graphs[STEP_NAME].run(
            tuple(x.shape), x=x, t=t, dt=dt, txt=txt, y=y, null_txt=null_txt, null_y=null_y, guidance=guidance,
            **self._context(x, context),
        )
