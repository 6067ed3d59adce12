"""The logic of the Triton BLS model ``fluxmusic``, free of Triton so it can be tested without a server.

One request = one generation: prompt, negative prompt, duration, steps, guidance and seed come in as request
tensors; float32 audio and the seed used go out. Everything between is the project's own pipeline
(:class:`fluxmusic.pipeline.FluxMusicPipeline`: tokenization, null embeddings for "", seeded noise, patchify,
the batched cond+uncond CFG velocity and the one sampler loop, with settings resolved and validated by
``fluxmusic.sampling`` exactly as for the CLI and the gRPC server). Only the component calls are different: they go
through an ``infer(model_name, inputs) -> outputs`` function over numpy arrays, which is
``pb_utils.InferenceRequest(...).exec()`` inside Triton (``triton_models/fluxmusic/1/model.py``) and
onnxruntime sessions in tests (:class:`OnnxRuntimeInfer`).

The version directory of the BLS model holds what the pipeline needs besides the components: the tokenizers,
``null_embeddings.safetensors``, ``model_index.json`` and the transformer's ``config.json`` (for RoPE tables),
and with the image / story models the adapters' and image tower's configs and the image preprocessing.

Every request goes through :func:`fluxmusic.sampling.build_request`, so its errors are the Python API's and the
gRPC server's word for word: long form (a duration beyond the model's window) runs the pipeline's windowed
continuation, and an image / a story is decoded and checked by the same functions before the image tower and
adapter models (``image_encoder``, ``image_adapter``, ``story_adapter``) map it into the conditioning space.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fluxmusic.export.bls_contract import (  # noqa: F401  (re-exported: model.py imports them from here)
    ADAPTERS_DIR,
    BLS_ARRAY_INPUTS,
    BLS_BYTES_INPUTS,
    BLS_INPUTS,
    BLS_LIST_INPUTS,
    BLS_OUTPUTS,
    CLAP_TOKENIZER_DIR,
    IMAGE_PROCESSOR_DIR,
    PROBE_WEIGHTS,
    TOKENIZER_DIR,
    TRANSFORMER_CONFIG,
    VERSION_FILES,
    BlsTensor,
    read_version_dir,
)
from fluxmusic.export.spec import (
    COMPONENT_NAMES,
    CONTEXT_INPUT,
    ENCODER_NAME,
    IMAGE_ADAPTER_NAME,
    IMAGE_ENCODER_NAME,
    MEDIA_NAMES,
    STORY_ADAPTER_NAME,
    ComponentSpec,
)
from torch import Tensor

from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning
from fluxmusic.modeldir import read_null_embeddings
from fluxmusic.pipeline import FluxMusicPipeline, ProgressFn, StreamChunk
from fluxmusic.rope import RopeCache
from fluxmusic.sampling import FULL_INTERVAL, GenerationRequest

#: ``infer(model_name, {input name: array}) -> {output name: array}``: one call of a component model.
InferFn = Callable[[str, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass
class BlsRequest:
    """The request's values; None = not given."""

    prompt: str
    negative_prompt: str | None = None
    duration: float | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    solver: str | None = None
    shift: float | None = None
    preset: str | None = None
    guidance_interval_min: float | None = None
    guidance_interval_max: float | None = None
    cache_threshold: float | None = None
    audio: np.ndarray | None = None
    audio_sample_rate: int | None = None
    keep: str | None = None
    regenerate: str | None = None
    mode: str | None = None
    guidance_schedule: str | None = None
    blend: float | None = None
    resample: int | None = None
    splice: bool | None = None
    overlap: float | None = None
    crossfade: float | None = None
    sections: list[str] | None = None
    image: bytes | None = None
    story: str | None = None
    image_weight: float | None = None
    story_weight: float | None = None
    conditioning: str | None = None
    bpm: float | None = None
    register: str | None = None

    def options(self) -> dict:
        """Keywords for ``fluxmusic.sampling.build_request`` (the one resolution and validation)."""
        interval = None
        if self.guidance_interval_min is not None or self.guidance_interval_max is not None:
            lo, hi = FULL_INTERVAL
            interval = (
                lo if self.guidance_interval_min is None else self.guidance_interval_min,
                hi if self.guidance_interval_max is None else self.guidance_interval_max,
            )
        return {
            "negative_prompt": self.negative_prompt, "duration": self.duration, "steps": self.steps,
            "guidance": self.guidance, "seed": self.seed, "solver": self.solver, "shift": self.shift,
            "preset": self.preset, "guidance_interval": interval, "cache_threshold": self.cache_threshold,
            **self.audio_options(),
            "guidance_schedule": self.guidance_schedule,
            "overlap": self.overlap, "crossfade": self.crossfade, "sections": self.parsed_sections(),
            "image": self.image, "story": self.story, "image_weight": self.image_weight,
            "story_weight": self.story_weight, "bpm": self.bpm, "register": self.register,
        }

    def parsed_sections(self) -> list | None:
        """The prompt sections, parsed as the gRPC server parses its ``sections`` (one function, one error)."""
        if not self.sections:
            return None
        from fluxmusic.continuation import parse_section_strings

        return parse_section_strings(self.sections)

    def prompt_value(self) -> str | None:
        """The prompt for build_request: "" with sections means "not given" (the sections give the prompts)."""
        return self.prompt or (None if self.sections else self.prompt)

    def audio_options(self) -> dict:
        """Audio-in keywords (only those given: absent ones stay absent, so build_request's checks apply)."""
        out: dict = {}
        if self.audio is not None:
            out["audio"] = self.audio if self.audio_sample_rate is None else (self.audio, self.audio_sample_rate)
        elif self.audio_sample_rate is not None:
            raise FluxMusicError("input 'audio_sample_rate' is given without 'audio'")
        for k in ("keep", "regenerate", "mode", "blend", "resample", "splice", "conditioning"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def parse_request(inputs: Mapping[str, np.ndarray | None]) -> BlsRequest:
    """Request tensors (numpy, ``None`` for an absent optional input) -> a request; errors name the input."""
    known = {t.name for t in BLS_INPUTS}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise FluxMusicError(f"unknown input(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    values: dict[str, object] = {}
    for spec in BLS_INPUTS:
        arr = inputs.get(spec.name)
        if arr is None:
            if not spec.optional:
                raise FluxMusicError(f"input {spec.name!r} is required")
            continue
        arr = np.asarray(arr)
        if spec.name in BLS_LIST_INPUTS:
            if arr.ndim > 2 or (arr.ndim == 2 and arr.shape[0] != 1):
                raise FluxMusicError(f"input {spec.name!r} must be a list of strings [n]; got shape {list(arr.shape)}")
            items = [_scalar(spec, v) for v in arr.reshape(-1)]
            values[spec.name] = items or None  # an empty list is "not given", as on the gRPC wire
            continue
        if spec.name in BLS_ARRAY_INPUTS:
            if arr.dtype.kind != "f" or arr.ndim > 2 or (arr.ndim == 2 and arr.shape[0] != 1) or arr.size == 0:
                raise FluxMusicError(f"input {spec.name!r} must be a non-empty mono float32 waveform [samples]; got "
                                     f"{arr.dtype} of shape {list(arr.shape)}")
            values[spec.name] = np.ascontiguousarray(arr.reshape(-1), dtype=np.float32)
            continue
        if arr.size != 1:
            raise FluxMusicError(f"input {spec.name!r} must hold exactly one value; got shape {list(arr.shape)}")
        values[spec.name] = _scalar(spec, arr.reshape(-1)[0])
    return BlsRequest(**values)


def _scalar(spec: BlsTensor, v: object) -> object:
    if spec.name in BLS_BYTES_INPUTS:  # an encoded file: its bytes as they are
        if isinstance(v, (bytes, np.bytes_)):
            return bytes(v)
        raise FluxMusicError(f"input {spec.name!r} must be the file's bytes (BYTES); got {type(v).__name__}")
    if spec.data_type == "TYPE_STRING":
        if isinstance(v, bytes):
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FluxMusicError(f"input {spec.name!r} is not valid UTF-8: {e}") from e
        if isinstance(v, str):
            return v
        raise FluxMusicError(f"input {spec.name!r} must be a string (BYTES); got {type(v).__name__}")
    if spec.data_type == "TYPE_BOOL":
        if not isinstance(v, (bool, np.bool_)):
            raise FluxMusicError(f"input {spec.name!r} must be a boolean (TYPE_BOOL); got {v!r}")
        return bool(v)
    if spec.data_type in ("TYPE_INT32", "TYPE_INT64"):
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
            raise FluxMusicError(f"input {spec.name!r} must be an integer ({spec.data_type}); got {v!r}")
        return int(v)
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
        raise FluxMusicError(f"input {spec.name!r} must be a number ({spec.data_type}); got {v!r}")
    return float(v)


class InferBackend:
    """The pipeline's backend interface (see ``fluxmusic.backend.Backend``) over ``infer`` calls.

    Tensor names and dtypes come from the export contract (``fluxmusic.export.spec``), the same one the
    exported graphs and the generated ``config.pbtxt`` files follow.
    """

    name = "triton-bls"

    def __init__(self, infer: InferFn, transformer_config: FluxMusicConfig, specs: Mapping[str, ComponentSpec]):
        self.infer = infer
        self.transformer_config = transformer_config
        self.specs = specs
        self.device = torch.device("cpu")
        self._rope = RopeCache(transformer_config.axes_dim, transformer_config.theta)
        self.calls: dict[str, int] = dict.fromkeys(COMPONENT_NAMES, 0)  # per model, for tests and metrics
        self.has_encoder = False  # the repository holds the vae_encoder model (audio in)

    def call(self, component: str, **inputs: Tensor) -> Tensor:
        """Send exactly the contract's inputs (cast to its dtypes) and return its first output as fp32."""
        return self.call_all(component, **inputs)[self.specs[component].outputs[0].name]

    def call_all(self, component: str, **inputs: Tensor) -> dict[str, Tensor]:
        """Send exactly the contract's inputs (cast to its dtypes) and return every output it declares, as fp32."""
        spec = self.specs[component]
        arrays = {
            t.name: np.ascontiguousarray(inputs[t.name].detach().cpu().numpy(), dtype=t.dtype) for t in spec.inputs
        }
        self.calls[component] = self.calls.get(component, 0) + 1
        out = self.infer(component, arrays)
        missing = [t.name for t in spec.outputs if t.name not in out]
        if missing:
            raise RuntimeError(f"model {component!r} returned {sorted(out)}; expected output(s) {missing}")
        return {t.name: torch.from_numpy(np.array(out[t.name], dtype=np.float32)) for t in spec.outputs}

    def t5_encode(self, input_ids: Tensor) -> Tensor:
        return self.call("t5", input_ids=input_ids)

    def clap_encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.call("clap", input_ids=input_ids, attention_mask=attention_mask)

    @property
    def takes_context(self) -> bool:
        """Whether the repository's transformer takes trained masked conditioning (the ``context`` input of the
        contract, from the version directory's transformer config; ``--check`` verifies the model has it)."""
        return any(t.name == CONTEXT_INPUT for t in self.specs["transformer"].inputs)

    def velocity(self, x: Tensor, t: Tensor, txt: Tensor, y: Tensor, rope: Tensor,
                 context: Tensor | None = None) -> Tensor:
        # cfg_velocity already stacked [cond; uncond]: one transformer request of 2B items per step.
        if self.takes_context:
            if context is None:  # no known audio: zeros are exactly the torch model's context=None
                context = x.new_zeros(*x.shape[:2], self.transformer_config.context_channels)
            return self.call("transformer", x=x, t=t, txt=txt, y=y, context=context)
        if context is not None:
            raise FluxMusicError("this transformer has no context input (context_channels 0); pass context=None")
        return self.call("transformer", x=x, t=t, txt=txt, y=y)

    def rope(self, txt_len: int, grid_h: int, grid_w: int) -> Tensor:
        return self._rope.get(txt_len, grid_h, grid_w)

    def vae_decode(self, latent: Tensor) -> Tensor:
        return self.call("vae_decoder", latent=latent)

    def vocode(self, mel: Tensor) -> Tensor:
        return self.call("vocoder", mel=mel)

    def vae_encode(self, mel: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Log-mel -> scaled posterior-mean latent through the repository's ``vae_encoder`` model."""
        if not self.has_encoder:
            raise FluxMusicError("audio in needs the vae_encoder model in the Triton repository: export it with "
                                 "`fluxmusic export onnx --encoder` and rebuild the repository")
        if sample:
            raise FluxMusicError("the BLS VAE encoder gives the posterior mean only (sample=False)")
        return self.call(ENCODER_NAME, mel=mel)


class InferMediaEncoder:
    """Image and story -> :class:`Conditioning` through the repository's image / story models: the interface of
    :class:`fluxmusic.adapters.MediaEncoder` (which the pipeline calls), with the same preprocessing, story
    chunking and chunk features (the model's own T5 / CLAP, here the ``t5`` / ``clap`` models), only the tower
    and adapter calls going through ``infer``."""

    def __init__(self, backend: InferBackend, version_dir: str | Path) -> None:
        from fluxmusic.adapters import load_image_processor, read_adapter_config

        self.backend = backend
        self.processor = load_image_processor(Path(version_dir) / IMAGE_PROCESSOR_DIR)
        self.config = read_adapter_config(Path(version_dir) / ADAPTERS_DIR)

    def pixel_values(self, image: np.ndarray) -> Tensor:
        return self.processor(images=[image], return_tensors="pt")["pixel_values"]

    def encode_image(self, image: np.ndarray) -> Conditioning:
        """RGB uint8 [H, W, 3] (decoded and checked by ``build_request``) -> Conditioning([1, L, Dt], [1, Dy])."""
        tower = self.backend.call_all(IMAGE_ENCODER_NAME, pixel_values=self.pixel_values(image))
        out = self.backend.call_all(IMAGE_ADAPTER_NAME, **tower)
        return Conditioning(out["txt"], out["y"])

    def encode_story(self, story: str, encoders) -> Conditioning:
        """A story in sentence chunks through the ``t5`` / ``clap`` models, pooled by the story adapter model."""
        from fluxmusic.adapters import check_story, chunk_features, split_story

        chunks = split_story(check_story(story), self.config.max_chunks)
        feats, mask = chunk_features(encoders, chunks, self.config.max_chunks)
        out = self.backend.call_all(STORY_ADAPTER_NAME, chunks=feats, chunk_mask=mask)
        return Conditioning(out["txt"], out["y"])


class FluxMusicBls:
    """Generate one waveform per request through component-model calls."""

    def __init__(self, version_dir: str | Path, infer: InferFn) -> None:
        from fluxmusic.components import load_tokenizer

        version_dir = Path(version_dir)
        index, cfg, specs = read_version_dir(version_dir)
        self.backend = InferBackend(infer, cfg, specs)
        self.backend.has_encoder = ENCODER_NAME in specs and _repository_has(version_dir, ENCODER_NAME)
        #: the repository holds the image / story models (and the version directory their configs)
        self.has_media = all(m in specs and _repository_has(version_dir, m) for m in MEDIA_NAMES)
        tokenizers = (
            load_tokenizer(version_dir / TOKENIZER_DIR, "T5 tokenizer"),
            load_tokenizer(version_dir / CLAP_TOKENIZER_DIR, "CLAP tokenizer"),
        )
        def probe_loader():
            from fluxmusic.step_cache import FirstBlockProbe

            return FirstBlockProbe.from_files(version_dir / PROBE_WEIGHTS, version_dir / TRANSFORMER_CONFIG)

        def media_loader():
            if not self.has_media:
                raise FluxMusicError(
                    "this Triton repository has no image / story models (image_encoder, image_adapter, "
                    "story_adapter); build it with `fluxmusic export triton` from a model directory that has "
                    "adapters/, image_encoder/ and image_processor/ (the bundled default does)"
                )
            return InferMediaEncoder(self.backend, version_dir)

        self.pipeline = FluxMusicPipeline(
            self.backend, index, read_null_embeddings(version_dir), tokenizers, probe_loader=probe_loader,
            media_loader=media_loader,
        )

    @property
    def sample_rate(self) -> int:
        return self.pipeline.sample_rate

    def resolve(self, request: BlsRequest) -> GenerationRequest:
        """A parsed request -> the resolved generation, through the one validation of every front end; an image
        or a story on a repository without their models fails here, before any step (as on the gRPC server)."""
        resolved = self.pipeline.request(request.prompt_value(), **request.options())
        if resolved.media is not None:
            self.pipeline.media_encoder()
        return resolved

    def prepare(self, inputs: Mapping[str, np.ndarray | None]) -> GenerationRequest:
        """Request tensors -> the resolved generation, or one FluxMusicError naming the bad input."""
        return self.resolve(parse_request(inputs))

    def generate(self, request: BlsRequest, progress: ProgressFn | None = None) -> tuple[np.ndarray, int]:
        """-> (float32 audio [samples], seed used), with the settings the gRPC server and the CLI would use."""
        result = self.pipeline.generate(self.resolve(request), progress)
        return result.audio[0], result.seeds[0]

    def run(
        self,
        request: GenerationRequest,
        progress: ProgressFn | None = None,
        on_window: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Generate a resolved request -> the final response's tensors. A long-form request hands each finished
        window's response tensors (:func:`window_tensors`) to ``on_window`` as it is done (decoupled mode)."""
        on_chunk = None if on_window is None else (lambda chunk: on_window(window_tensors(chunk, self.sample_rate)))
        result = self.pipeline.generate(request, progress, on_chunk=on_chunk)
        return {
            "audio": result.audio[0].astype(np.float32, copy=False),
            "seed_used": np.array([result.seeds[0]], dtype=np.int64),
            "sample_rate": np.array([self.sample_rate], dtype=np.int32),
            "cfg_evaluations": np.array([result.cfg_evaluations], dtype=np.float32),
        }

    def execute(
        self,
        inputs: Mapping[str, np.ndarray | None],
        progress: ProgressFn | None = None,
        on_window: Callable[[dict[str, np.ndarray]], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Request tensors -> the final response's tensors (``audio``, ``seed_used``, ``sample_rate``,
        ``cfg_evaluations``)."""
        return self.run(self.prepare(inputs), progress, on_window)


def window_tensors(chunk: StreamChunk, sample_rate: int) -> dict[str, np.ndarray]:
    """A decoupled-mode window response: one finished window's new audio and where it starts (long form)."""
    return {
        "audio": np.asarray(chunk.audio[0], dtype=np.float32),
        "window": np.array([chunk.window], dtype=np.int32),
        "windows": np.array([chunk.windows], dtype=np.int32),
        "start_sample": np.array([chunk.start], dtype=np.int64),
        "sample_rate": np.array([sample_rate], dtype=np.int32),
    }


def _repository_has(version_dir: Path, component: str) -> bool:
    """Whether the BLS version directory's components.json lists ``component`` (written by the repo builder)."""
    import json

    path = version_dir / "components.json"
    if not path.is_file():
        return False
    return component in json.loads(path.read_text()).get("components", {})


def progress_tensors(step: int, total: int) -> dict[str, np.ndarray]:
    """A decoupled-mode progress response."""
    return {"step": np.array([step], dtype=np.int32), "total_steps": np.array([total], dtype=np.int32)}


class OnnxRuntimeInfer:
    """``infer`` over onnxruntime sessions of ``<component>.onnx`` files: the BLS calls without a server."""

    def __init__(self, onnx_files: Mapping[str, str | Path], providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sessions = {
            name: ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
            for name, path in onnx_files.items()
        }

    def __call__(self, model_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[model_name]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, dict(inputs))))
