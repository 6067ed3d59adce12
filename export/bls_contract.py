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

from fluxmusic.export.spec import ComponentSpec, component_specs

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
)
#: Inputs that carry an array, not one value.
BLS_ARRAY_INPUTS = ("audio",)
#: Outputs: the waveform, the seed used (random when none was given) and its sample rate. In decoupled mode
#: progress responses carry only ``step`` and ``total_steps``; the final response carries the rest.
BLS_OUTPUTS = (
    BlsTensor("audio", "TYPE_FP32", (-1,)),
    BlsTensor("seed_used", "TYPE_INT64", (1,)),
    BlsTensor("sample_rate", "TYPE_INT32", (1,)),
    BlsTensor("step", "TYPE_INT32", (1,)),
    BlsTensor("total_steps", "TYPE_INT32", (1,)),
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
    return index, cfg, specs
