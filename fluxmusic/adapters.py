"""Music from an image or a story (issue 18): MusFlow-style adapters into FluxMusic's conditioning space.

FluxMusic conditions on two text streams: the pooled CLAP text vector ``y`` [B, Dy] and the T5 token features
``txt`` [B, L, Dt]. MusFlow (seed 003) maps other modalities' embeddings into the CLAP space with small MLPs, so
a generator conditioned on CLAP follows them without retraining. Here:

- **image**: a ``CLIPVisionModelWithProjection`` (``image_encoder/``, with its ``CLIPImageProcessor`` in
  ``image_processor/``) gives a pooled embedding and patch tokens; an MLP maps the pooled embedding to ``y`` and a
  resampler (learned queries cross-attending to the patch tokens) produces ``L`` T5-like tokens;
- **story**: long text is split into sentences (chunks), each encoded by the model's own T5 and CLAP; the chunk
  features (mean T5 token, CLAP pooled) are pooled by an MLP into ``y`` and resampled into T5-like tokens.

The adapters are our own module in ``adapters/`` (``config.json`` + ``model.safetensors``), loaded strictly: a
missing, unexpected or mis-shaped tensor is one error naming each, as for every other component.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fluxmusic.checkpoint import atomic_save_safetensors, atomic_write_text, read_json
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning
from fluxmusic.integrity import safetensors_metadata, verify_safetensors

ADAPTERS = "adapters"
IMAGE_ENCODER = "image_encoder"
IMAGE_PROCESSOR = "image_processor"
#: Optional model-directory folders of this feature (a directory without them generates from text only).
MEDIA_COMPONENTS = (IMAGE_ENCODER, IMAGE_PROCESSOR, ADAPTERS)
ADAPTER_TYPE = "fluxmusic_media_adapters"
WEIGHTS = "model.safetensors"

#: Decoded images larger than this are refused before their pixels are decoded (decompression bombs).
MAX_IMAGE_PIXELS = 4096 * 4096
#: Encoded image bytes accepted (before decoding).
MAX_IMAGE_BYTES = 32 * 2**20
#: Story characters accepted (a few pages).
MAX_STORY_CHARS = 20000


@dataclass(frozen=True)
class AdapterConfig:
    """Widths of the adapters. ``image_dim`` / ``image_token_dim``: the image tower's projection and hidden
    widths; ``clap_dim`` / ``t5_dim`` / ``t5_tokens``: the conditioning the transformer reads; ``max_chunks``:
    story sentences (chunks) attended to (longer stories are grouped into this many chunks)."""

    image_dim: int = 64
    image_token_dim: int = 64
    clap_dim: int = 128
    t5_dim: int = 128
    t5_tokens: int = 40
    hidden: int = 256
    heads: int = 4
    max_chunks: int = 16

    def to_dict(self) -> dict:
        return {"model_type": ADAPTER_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str) -> AdapterConfig:
        if d.get("model_type") != ADAPTER_TYPE:
            raise FluxMusicError(f"{source} has model_type {d.get('model_type')!r}; expected {ADAPTER_TYPE!r}")
        values = {}
        for f in fields(cls):
            v = d.get(f.name, f.default)
            if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536):
                raise FluxMusicError(f"{source}: {f.name} = {v!r} must be an integer in [1, 65536]")
            values[f.name] = v
        if values["hidden"] % values["heads"]:
            raise FluxMusicError(f"{source}: hidden {values['hidden']} must be divisible by heads {values['heads']}")
        return cls(**values)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, d_out))


class Resampler(nn.Module):
    """``n`` learned queries (shifted by the pooled input) cross-attend to a token sequence -> [B, n, d_out].

    T5 features of short captions are mostly a positional template plus content, so queries per position plus one
    pooled content vector is the right shape for the target; the attention lets each position pick its source."""

    def __init__(self, d_kv: int, d_pooled: int, d_out: int, n: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n, hidden) * 0.02)
        self.pooled = nn.Linear(d_pooled, hidden)
        self.kv = nn.Sequential(nn.Linear(d_kv, hidden), nn.LayerNorm(hidden))
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, d_out))

    def forward(self, tokens: Tensor, pooled: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        q = self.queries.unsqueeze(0) + self.pooled(pooled).unsqueeze(1)
        kv = self.kv(tokens)
        a, _ = self.attn(q, kv, kv, key_padding_mask=pad_mask, need_weights=False)
        h = q + a
        h = h + self.ff(self.norm(h))
        return self.out(h)


class MediaAdapters(nn.Module):
    """The four adapters: image -> (T5 tokens, CLAP pooled), story -> (T5 tokens, CLAP pooled)."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        c = self.config = config
        self.image_clap = _mlp(c.image_dim, c.hidden, c.clap_dim)
        self.image_t5 = Resampler(c.image_token_dim, c.image_dim, c.t5_dim, c.t5_tokens, c.hidden, c.heads)
        chunk = c.t5_dim + c.clap_dim
        self.story_clap = _mlp(chunk, c.hidden, c.clap_dim)
        self.story_t5 = Resampler(chunk, chunk, c.t5_dim, c.t5_tokens, c.hidden, c.heads)

    def image(self, image_embeds: Tensor, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Image tower outputs ([B, image_dim], [B, N, image_token_dim]) -> (txt [B, L, Dt], y [B, Dy])."""
        return self.image_t5(image_tokens, image_embeds), self.image_clap(image_embeds)

    def story(self, chunks: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Chunk features [B, S, Dt + Dy] and validity ``mask`` [B, S] (1 = a chunk) -> (txt, y)."""
        m = mask.to(chunks.dtype).unsqueeze(-1)
        pooled = (chunks * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.story_t5(chunks, pooled, mask < 0.5), self.story_clap(pooled)


# ------------------------------------------------------------------------------------------------ save / load
def save_adapters(module: MediaAdapters, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """``config.json`` + ``model.safetensors`` (with per-tensor checksums) written atomically."""
    directory = Path(directory)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    atomic_save_safetensors(state, directory / WEIGHTS, metadata=safetensors_metadata(state))
    atomic_write_text(directory / "config.json", json.dumps(module.config.to_dict(), indent=2) + "\n")
    return directory


def load_adapters(directory: str | Path, dtype: torch.dtype = torch.float32) -> MediaAdapters:
    """Strict load: every tensor present with its shape, nothing extra, checksums (when stored) matching."""
    from safetensors import safe_open

    from fluxmusic.components import read_config
    from fluxmusic.modelcheck import check_weight_files

    directory = Path(directory)
    config = AdapterConfig.from_dict(read_config(directory, "adapters"), f"{directory / 'config.json'}")
    check_weight_files(directory, "adapters")
    path = directory / WEIGHTS
    if not path.is_file():
        raise FluxMusicError(f"adapters directory {directory} has no {WEIGHTS}")
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        metadata = f.metadata()
    verify_safetensors(state, metadata, str(path))
    module = MediaAdapters(config)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = [f"{label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped keys", shaped)) if keys]
    if problems:
        raise FluxMusicError(f"adapters in {directory} did not load completely (refusing a partial load); "
                             + "; ".join(problems))
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.to(dtype).eval()


def load_image_encoder(directory: str | Path, dtype: torch.dtype = torch.float32):
    """The image tower (transformers ``CLIPVisionModelWithProjection``), strictly."""
    from transformers import CLIPVisionModelWithProjection

    from fluxmusic.components import _from_pretrained

    return _from_pretrained(CLIPVisionModelWithProjection, directory, "image encoder", dtype=dtype)


def load_image_processor(directory: str | Path):
    """The image preprocessing (transformers ``CLIPImageProcessor``: resize, centre crop, normalise)."""
    from transformers import CLIPImageProcessor

    from fluxmusic.components import quiet_libraries
    from fluxmusic.modelcheck import check_json_files

    quiet_libraries()
    directory = Path(directory)
    if not (directory / "preprocessor_config.json").is_file():
        raise FluxMusicError(f"image processor directory {directory} has no preprocessor_config.json")
    check_json_files(directory, "image processor")
    try:
        return CLIPImageProcessor.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise FluxMusicError(f"image processor in {directory} cannot be loaded: {str(e).splitlines()[0]}") from e


def has_media(model_dir: str | Path) -> bool:
    """Whether a model directory carries the image / story adapters."""
    return (Path(model_dir) / ADAPTERS).is_dir()


def media_presence(directory: str | Path, names: Sequence[str], what: str) -> bool:
    """Whether ``directory`` (a ``what``) holds the image / story files or folders ``names``: all of them (True),
    none (False); some of them is one error naming the rest."""
    directory = Path(directory)
    present = [n for n in names if (directory / n).exists()]
    if present and len(present) != len(names):
        missing = [n for n in names if n not in present]
        raise FluxMusicError(f"{what} {directory} has {', '.join(present)} but not {', '.join(missing)}: "
                             "image / story conditioning needs all of them")
    return bool(present)


def check_media_dirs(model_dir: str | Path) -> None:
    """A model directory with any of the media folders must have all of them (else one error naming the rest)."""
    media_presence(model_dir, MEDIA_COMPONENTS, "model directory")


# ------------------------------------------------------------------------------------------------ inputs
ImageInput = Any  # a path, encoded bytes, a PIL image or an array [H, W] / [H, W, 3|4] (uint8 or float in [0, 1])


def decode_image(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES
                 ) -> np.ndarray:
    """Any accepted image input -> RGB uint8 [H, W, 3]. The pixel limit is checked from the header, before
    the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, np.ndarray):
        return _array_image(image, max_pixels)
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FluxMusicError(f"image {str(image)[:100]!r} is not a file")
        if path.stat().st_size > max_bytes:
            raise FluxMusicError(f"image {path} has {path.stat().st_size} bytes; allowed: at most {max_bytes}")
        data, name = path.read_bytes(), str(path)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data, name = bytes(image), "image bytes"
        if len(data) > max_bytes:
            raise FluxMusicError(f"image has {len(data)} bytes; allowed: at most {max_bytes}")
    else:
        raise FluxMusicError(f"image of type {type(image).__name__} is invalid; allowed: a file path, encoded "
                             "bytes (PNG, JPEG, ...), a PIL image or an array [H, W, 3]")
    if not data:
        raise FluxMusicError(f"{name} is empty; allowed: an encoded image (PNG, JPEG, ...)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img.size, max_pixels)  # from the header: nothing decoded yet
            with _no_pil_bomb_limit():
                return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FluxMusicError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL names the buffer by its repr ("<_io.BytesIO object at 0x...>"): noise, and it differs per call
        detail = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e).splitlines()[0] if str(e) else "")
        raise FluxMusicError(f"{name} cannot be decoded as an image ({type(e).__name__}: "
                             f"{detail[:100]}); allowed: PNG, JPEG, BMP, GIF, WebP, ...") from None


class _no_pil_bomb_limit:
    """Our own pixel limit replaces PIL's warning-level one (already checked from the header)."""

    def __enter__(self) -> None:
        import warnings

        from PIL import Image

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    def __exit__(self, *exc) -> None:
        self._w.__exit__(*exc)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise FluxMusicError(f"image of {w} x {h} pixels is invalid; allowed: at least 1 x 1 and at most "
                             f"{max_pixels} pixels")


def _array_image(a: np.ndarray, max_pixels: int) -> np.ndarray:
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise FluxMusicError(f"image array of shape {a.shape} is invalid; allowed: [H, W], [H, W, 3] or [H, W, 4]")
    _check_pixels((a.shape[1], a.shape[0]), max_pixels)
    a = a[..., :3]
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise FluxMusicError("a float image array must hold finite values in [0, 1]")
        return np.round(a * 255).astype(np.uint8)
    raise FluxMusicError(f"image array of dtype {a.dtype} is invalid; allowed: uint8, or float in [0, 1]")


_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n\s*\n")


def split_story(text: str, max_chunks: int) -> list[str]:
    """Sentences of a story; more than ``max_chunks`` are grouped into ``max_chunks`` runs of consecutive
    sentences (so a long story keeps all its facts, coarser)."""
    sentences = [s.strip() for s in _SENTENCE.split(text.strip()) if s and s.strip()]
    if len(sentences) <= max_chunks:
        return sentences
    bounds = np.linspace(0, len(sentences), max_chunks + 1).round().astype(int)
    return [" ".join(sentences[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def check_story(story: object, max_chars: int = MAX_STORY_CHARS) -> str:
    if not isinstance(story, str):
        raise FluxMusicError(f"story of type {type(story).__name__} is invalid; allowed: a string")
    if not story.strip():
        raise FluxMusicError(f"story {story[:40]!r} is empty; allowed: a non-empty text of at most {max_chars} "
                             "characters")
    if len(story) > max_chars:
        raise FluxMusicError(f"story has {len(story)} characters; allowed: at most {max_chars} characters")
    return story


# ------------------------------------------------------------------------------------------------ encoding
def chunk_features(encoders, chunks: list[str], max_chunks: int) -> tuple[Tensor, Tensor]:
    """Encode chunks with the model's text encoders -> features [1, max_chunks, Dt + Dy] and mask [1, S]:
    per chunk its mean T5 token over the non-pad positions and its CLAP pooled vector."""
    return chunk_features_batch(encoders, [chunks], max_chunks)


def chunk_features_batch(encoders, stories: list[list[str]], max_chunks: int, batch: int = 256
                         ) -> tuple[Tensor, Tensor]:
    """:func:`chunk_features` of many stories, their chunks encoded in batches -> [B, max_chunks, D], [B, S]."""
    flat = [c for chunks in stories for c in chunks[:max_chunks]]
    feats = []
    for a in range(0, len(flat), batch):
        part = flat[a : a + batch]
        cond = encoders.encode(part)
        ids = encoders.tokenize_t5(part)
        pad = encoders.t5_tokenizer.pad_token_id or 0
        keep = (ids != pad).unsqueeze(-1).float()
        t5 = (cond.txt * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        feats.append(torch.cat([t5, cond.y], dim=-1))
    allf = torch.cat(feats)
    out = torch.zeros(len(stories), max_chunks, allf.shape[-1])
    mask = torch.zeros(len(stories), max_chunks)
    i = 0
    for b, chunks in enumerate(stories):
        n = min(len(chunks), max_chunks)
        out[b, :n], mask[b, :n] = allf[i : i + n], 1.0
        i += n
    return out, mask


class MediaEncoder:
    """Image and story -> :class:`Conditioning`, with the image tower, processor and adapters of a model dir."""

    def __init__(self, image_encoder, processor, adapters: MediaAdapters, device: torch.device | str = "cpu"
                 ) -> None:
        self.image_encoder, self.processor, self.adapters = image_encoder, processor, adapters
        self.device = torch.device(device)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> MediaEncoder | None:
        """The encoder of a model directory, or None when it has no adapters (text only)."""
        model_dir = Path(model_dir)
        check_media_dirs(model_dir)
        if not has_media(model_dir):
            return None
        return cls(load_image_encoder(model_dir / IMAGE_ENCODER, dtype).to(device),
                    load_image_processor(model_dir / IMAGE_PROCESSOR),
                    load_adapters(model_dir / ADAPTERS, dtype).to(device), device)

    def pixel_values(self, image: np.ndarray) -> Tensor:
        return self.processor(images=[image], return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def encode_image(self, image: np.ndarray) -> Conditioning:
        """RGB uint8 [H, W, 3] -> Conditioning([1, L, Dt], [1, Dy])."""
        dtype = next(self.adapters.parameters()).dtype
        out = self.image_encoder(pixel_values=self.pixel_values(image).to(self.device, dtype))
        txt, y = self.adapters.image(out.image_embeds, out.last_hidden_state)
        return Conditioning(txt.float().cpu(), y.float().cpu())

    @torch.no_grad()
    def encode_story(self, story: str, encoders) -> Conditioning:
        """A story through the model's own text encoders (sentence chunks), pooled by the story adapters."""
        chunks = split_story(check_story(story), self.adapters.config.max_chunks)
        feats, mask = chunk_features(encoders, chunks, self.adapters.config.max_chunks)
        dtype = next(self.adapters.parameters()).dtype
        txt, y = self.adapters.story(feats.to(self.device, dtype), mask.to(self.device, dtype))
        return Conditioning(txt.float().cpu(), y.float().cpu())


def mix(parts: list[tuple[Conditioning, float]]) -> Conditioning:
    """Weighted mean of conditionings (both streams: the pooled CLAP vector and the T5 tokens)."""
    total = sum(w for _, w in parts)
    if total <= 0:
        raise FluxMusicError("the conditioning weights sum to 0; give at least one source a positive weight")
    txt = sum(c.txt * (w / total) for c, w in parts)
    y = sum(c.y * (w / total) for c, w in parts)
    return Conditioning(txt, y)


def read_text_file(path: str | Path, what: str = "story", max_chars: int = MAX_STORY_CHARS) -> str:
    """A UTF-8 text file (``-``: standard input), checked."""
    import sys

    if str(path) == "-":
        text = sys.stdin.read(max_chars + 1)
    else:
        p = Path(path)
        if not p.is_file():
            raise FluxMusicError(f"{what} file {str(path)[:100]!r} does not exist")
        if p.stat().st_size > 4 * max_chars + 4:
            raise FluxMusicError(f"{what} file {p} has {p.stat().st_size} bytes; allowed: at most {max_chars} "
                                 "characters")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise FluxMusicError(f"{what} file {p} is not UTF-8 text") from None
    return check_story(text, max_chars)


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    return AdapterConfig.from_dict(read_json(Path(directory) / "config.json", "adapters config"),
                                   str(Path(directory) / "config.json"))
