"""The contract of the Triton BLS model ``fluxmusic``: its request/response tensors and its version directory.

It lives in ``fluxmusic.export`` because the repository builder (:mod:`fluxmusic.export.triton_repo`) writes
the BLS model's ``config.pbtxt`` and version directory from it and the repository check
(:mod:`fluxmusic.export.triton_check`) verifies them against it; the BLS logic in
``fluxmusic.runtime.triton_bls`` imports it from here (dependencies flow core <- export <- runtime).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fluxmusic.export.spec import ComponentSpec, component_specs, media_specs

from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.modeldir import INDEX, NULL_EMBEDDINGS, ModelIndex, read_null_embeddings

#: Files of the BLS model's version directory besides ``model.py``.
TOKENIZER_DIR = "tokenizer"
CLAP_TOKENIZER_DIR = "clap_tokenizer"
TRANSFORMER_CONFIG = "transformer_config.json"
#: Optional: the transformer's first-block weights, for step caching (``fluxmusic.step_cache``).
PROBE_WEIGHTS = "step_cache_probe.safetensors"
VERSION_FILES = (INDEX, NULL_EMBEDDINGS, TRANSFORMER_CONFIG, TOKENIZER_DIR, CLAP_TOKENIZER_DIR)
#: Optional, together (image / story conditioning; the repository then holds the image_encoder, image_adapter and
#: story_adapter models): the adapters' config (not their weights: those are in the graphs), the image
#: preprocessing config and the image tower's config (its input size and widths).
ADAPTERS_DIR = "adapters"
IMAGE_PROCESSOR_DIR = "image_processor"
IMAGE_ENCODER_CONFIG = "image_encoder_config.json"
MEDIA_FILES = (f"{ADAPTERS_DIR}/config.json", IMAGE_PROCESSOR_DIR, IMAGE_ENCODER_CONFIG)


@dataclass(frozen=True)
class BlsTensor:
    """One input or output of the BLS model itself, in Triton's terms."""

    name: str
    data_type: str  # Triton TYPE_*
    dims: tuple[int, ...]
    optional: bool = False


#: The BLS model's request inputs: every generation setting is per request (absent = the preset's value when a
#: preset is named, else the model's default), resolved and validated by ``fluxmusic.sampling`` as everywhere.
BLS_INPUTS = (
    BlsTensor("prompt", "TYPE_STRING", (1,)),
    BlsTensor("negative_prompt", "TYPE_STRING", (1,), optional=True),
    BlsTensor("duration", "TYPE_FP32", (1,), optional=True),
    BlsTensor("steps", "TYPE_INT32", (1,), optional=True),
    BlsTensor("guidance", "TYPE_FP32", (1,), optional=True),
    BlsTensor("seed", "TYPE_INT64", (1,), optional=True),
    BlsTensor("solver", "TYPE_STRING", (1,), optional=True),
    BlsTensor("shift", "TYPE_FP32", (1,), optional=True),
    BlsTensor("preset", "TYPE_STRING", (1,), optional=True),
    BlsTensor("guidance_interval_min", "TYPE_FP32", (1,), optional=True),
    BlsTensor("guidance_interval_max", "TYPE_FP32", (1,), optional=True),
    BlsTensor("cache_threshold", "TYPE_FP32", (1,), optional=True),
    # Audio in (continuation, infilling; needs the vae_encoder model in the repository): a mono float32
    # waveform, its sample rate (default: the model's; other rates are resampled) and the mask as in the CLI.
    BlsTensor("audio", "TYPE_FP32", (-1,), optional=True),
    BlsTensor("audio_sample_rate", "TYPE_INT32", (1,), optional=True),
    BlsTensor("keep", "TYPE_STRING", (1,), optional=True),
    BlsTensor("regenerate", "TYPE_STRING", (1,), optional=True),
    BlsTensor("mode", "TYPE_STRING", (1,), optional=True),
    BlsTensor("guidance_schedule", "TYPE_STRING", (1,), optional=True),
    # Audio in, how seams are made (as the Python API's blend= / resample= / splice=).
    BlsTensor("blend", "TYPE_FP32", (1,), optional=True),
    BlsTensor("resample", "TYPE_INT32", (1,), optional=True),
    BlsTensor("splice", "TYPE_BOOL", (1,), optional=True),
    # Long form (a duration beyond the model's window: windowed continuation): seconds of context kept from
    # the previous window, the crossfade at each seam, and prompt sections "START:END prompt" (seconds; then the
    # prompt is "").
    BlsTensor("overlap", "TYPE_FP32", (1,), optional=True),
    BlsTensor("crossfade", "TYPE_FP32", (1,), optional=True),
    BlsTensor("sections", "TYPE_STRING", (-1,), optional=True),
    # Image / story conditioning (needs the image / story models in the repository): the image file's bytes
    # (PNG, JPEG, ...), the story's text, and their weights against the prompt (which weighs 1 and may be "").
    BlsTensor("image", "TYPE_STRING", (1,), optional=True),
    BlsTensor("story", "TYPE_STRING", (1,), optional=True),
    BlsTensor("image_weight", "TYPE_FP32", (1,), optional=True),
    BlsTensor("story_weight", "TYPE_FP32", (1,), optional=True),
    # Given audio / long form: how the known frames condition the solve ("auto", "trained", "replace"; as the
    # gRPC request's and the CLI's --conditioning). "trained" needs a transformer with the context input.
    BlsTensor("conditioning", "TYPE_STRING", (1,), optional=True),
    # Controls of a model that takes them (the bundled default): the beat grid's tempo and the register hint
    # (absent: read from the prompt, as everywhere; docs/generate.md).
    BlsTensor("bpm", "TYPE_FP32", (1,), optional=True),
    BlsTensor("register", "TYPE_STRING", (1,), optional=True),
)
#: Inputs that carry an array, not one value.
BLS_ARRAY_INPUTS = ("audio",)
#: Inputs that carry one string per element (any number of them).
BLS_LIST_INPUTS = ("sections",)
#: BYTES inputs passed on as raw bytes (not UTF-8 text).
BLS_BYTES_INPUTS = ("image",)
#: Outputs: the waveform, the seed used (random when none was given), its sample rate and the transformer
#: evaluations it cost (batched cond+uncond evaluations per waveform, as ``GenerationResult.cfg_evaluations``).
#: In decoupled mode progress responses carry only ``step`` and ``total_steps``; a long-form request also sends
#: each finished window as it is done (``audio`` = that window's new samples, ``window`` of ``windows``,
#: ``start_sample``, ``sample_rate``: the windows concatenate to the final audio); the final response carries
#: ``audio`` (the whole waveform), ``seed_used``, ``sample_rate`` and ``cfg_evaluations``.
BLS_OUTPUTS = (
    BlsTensor("audio", "TYPE_FP32", (-1,)),
    BlsTensor("seed_used", "TYPE_INT64", (1,)),
    BlsTensor("sample_rate", "TYPE_INT32", (1,)),
    BlsTensor("step", "TYPE_INT32", (1,)),
    BlsTensor("total_steps", "TYPE_INT32", (1,)),
    BlsTensor("cfg_evaluations", "TYPE_FP32", (1,)),
    BlsTensor("window", "TYPE_INT32", (1,)),
    BlsTensor("windows", "TYPE_INT32", (1,)),
    BlsTensor("start_sample", "TYPE_INT64", (1,)),
)


def read_version_dir(version_dir: str | Path) -> tuple[ModelIndex, FluxMusicConfig, dict[str, ComponentSpec]]:
    """The model index, transformer config and component contract stored in a BLS version directory."""
    version_dir = Path(version_dir)
    missing = [f for f in VERSION_FILES if not (version_dir / f).exists()]
    if missing:
        raise FluxMusicError(f"BLS version directory {version_dir} is incomplete; missing: {', '.join(missing)}")
    index = ModelIndex.from_dict(json.loads((version_dir / INDEX).read_text()), str(version_dir / INDEX))
    cfg = FluxMusicConfig.load(version_dir / TRANSFORMER_CONFIG)
    null = read_null_embeddings(version_dir)
    specs = component_specs(cfg, index.geometry, int(null.txt.shape[-1]), int(null.y.shape[-1]), include_encoder=True)
    specs.update(read_media_specs(version_dir) or {})
    return index, cfg, specs


def has_media_files(version_dir: str | Path) -> bool:
    """Whether a BLS version directory carries the image / story configs (all of them, or an error)."""
    from fluxmusic.adapters import media_presence

    return media_presence(version_dir, MEDIA_FILES, "BLS version directory")


def read_media_specs(version_dir: str | Path) -> dict[str, ComponentSpec] | None:
    """The image / story models' contract from the configs in a version directory (None: it has none)."""
    from fluxmusic.adapters import read_adapter_config

    version_dir = Path(version_dir)
    if not has_media_files(version_dir):
        return None
    a = read_adapter_config(version_dir / ADAPTERS_DIR)
    tower = json.loads((version_dir / IMAGE_ENCODER_CONFIG).read_text())
    try:
        size, patch = int(tower["image_size"]), int(tower["patch_size"])
        hidden, proj = int(tower["hidden_size"]), int(tower["projection_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise FluxMusicError(f"{version_dir / IMAGE_ENCODER_CONFIG} lacks the image tower's sizes: {e}") from e
    # a CLIP vision tower's tokens: one per patch plus the class token
    return media_specs(size, (size // patch) ** 2 + 1, proj, hidden, a.t5_dim, a.t5_tokens, a.clap_dim, a.max_chunks)
