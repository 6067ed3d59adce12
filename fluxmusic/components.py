"""Loading the published system's components through the libraries that own them, strictly.

Every load goes through the owning library's ``from_pretrained`` with ``output_loading_info=True`` and
refuses any missing, unexpected or mis-shaped key. This is stricter than upstream FluxMusic, whose
``ClapTextModel.from_pretrained`` on a full ``ClapModel`` checkpoint matches none of the (``text_model.``
prefixed) keys and silently runs a randomly initialised text tower (FluxMusic issue #5). We load a full CLAP
checkpoint through ``ClapTextModelWithProjection``, whose key layout matches it, and allow only the audio
tower's keys to be left unused.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fluxmusic.checkpoint import read_json
from fluxmusic.errors import FluxMusicError

#: Keys of a full ClapModel checkpoint that the text tower does not use.
CLAP_AUDIO_PREFIXES = ("audio_model.", "audio_projection.", "logit_scale_a", "logit_scale_t")


def quiet_libraries() -> None:
    """The libraries print progress bars and load reports; we report problems ourselves, as errors."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def read_config(directory: str | Path, what: str) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FluxMusicError(f"{what} directory {directory} has no config.json")
    return read_json(path, f"{what} config")


def check_loading_info(info: dict, source: str, allowed_unexpected: Iterable[str] = ()) -> None:
    """Turn a library's loading report into one error naming every key that did not load."""
    allowed = tuple(allowed_unexpected)
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if not k.startswith(allowed))
    mismatched = sorted(str(m[0]) if isinstance(m, tuple) else str(m) for m in (info.get("mismatched_keys") or []))
    errors = list(info.get("error_msgs") or [])
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", mismatched),
            ("errors", errors),
        )
        if keys
    ]
    if problems:
        raise FluxMusicError(f"{source} did not load completely (refusing a partial load); " + "; ".join(problems))


def _from_pretrained(cls: Any, directory: str | Path, what: str, allowed_unexpected: Iterable[str] = (), **kw):
    from safetensors import SafetensorError

    from fluxmusic.modelcheck import check_weight_files

    quiet_libraries()
    read_config(directory, what)
    check_weight_files(directory, what)  # truncated files and pickle-only folders: one message, before the library
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(
                str(directory), output_loading_info=True, use_safetensors=True, **kw
            )
    except FluxMusicError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as e:
        raise FluxMusicError(f"{what} in {directory} cannot be loaded: {str(e).splitlines()[0]}") from e
    check_loading_info(info, f"{what} in {directory}", allowed_unexpected)
    return model.eval()


def load_t5(directory: str | Path, dtype: torch.dtype = torch.float32):
    """T5 encoder (transformers ``T5EncoderModel``); its ``last_hidden_state`` is the fine-grained text."""
    from transformers import T5EncoderModel

    return _from_pretrained(T5EncoderModel, directory, "T5 encoder", dtype=dtype)


def load_clap_text(directory: str | Path, dtype: torch.dtype = torch.float32):
    """CLAP text tower (transformers ``ClapTextModel``) from a full ``ClapModel`` or a text-only checkpoint."""
    from transformers import ClapTextModel, ClapTextModelWithProjection

    model_type = read_config(directory, "CLAP").get("model_type")
    if model_type == "clap":
        full = _from_pretrained(
            ClapTextModelWithProjection, directory, "CLAP text tower", CLAP_AUDIO_PREFIXES, dtype=dtype
        )
        return full.text_model
    if model_type == "clap_text_model":
        return _from_pretrained(ClapTextModel, directory, "CLAP text tower", dtype=dtype)
    raise FluxMusicError(
        f"CLAP directory {directory} has model_type {model_type!r}; allowed: 'clap' (full) or 'clap_text_model'"
    )


def load_vae(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Mel VAE (diffusers ``AutoencoderKL``, 1 input channel)."""
    from diffusers import AutoencoderKL

    return _from_pretrained(AutoencoderKL, directory, "VAE", torch_dtype=dtype)


#: vocoder config ``model_type`` -> (module, class): AudioLDM2's HiFi-GAN or our iSTFT-head vocoder
VOCODER_CLASSES = {
    "speecht5_hifigan": ("transformers", "SpeechT5HifiGan"),
    "hifigan": ("transformers", "SpeechT5HifiGan"),
    "fluxmusic_vocos": ("fluxmusic.vocos", "VocosVocoder"),
}


def load_vocoder(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Vocoder: log-mel [B, T, n_mels] -> waveform [B, T * hop]. The config's ``model_type`` names the class:
    ``hifigan`` (transformers ``SpeechT5HifiGan``, AudioLDM2's) or ``fluxmusic_vocos`` (``VocosVocoder``)."""
    import importlib

    model_type = read_config(directory, "vocoder").get("model_type", "speecht5_hifigan")
    if model_type not in VOCODER_CLASSES:
        raise FluxMusicError(f"vocoder directory {directory} has model_type {model_type!r}; "
                             f"allowed: {', '.join(repr(k) for k in VOCODER_CLASSES)}")
    module, name = VOCODER_CLASSES[model_type]
    return _from_pretrained(getattr(importlib.import_module(module), name), directory, "vocoder", dtype=dtype)


def load_tokenizer(directory: str | Path, what: str):
    quiet_libraries()
    from transformers import AutoTokenizer

    from fluxmusic.modelcheck import check_json_files

    if not Path(directory).is_dir():
        raise FluxMusicError(f"{what} directory {directory} does not exist")
    check_json_files(directory, what)  # lists and deep nesting: one message, not a library traceback
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise FluxMusicError(f"{what} in {directory} cannot be loaded: {str(e).splitlines()[0]}") from e
