"""The I/O contract of every exported component: names, dtypes and (symbolic) shapes.

ONNX export, TensorRT profiles, the onnxruntime/TensorRT backends and the Triton model repository all read
their tensor names and shapes from here, so they cannot drift apart. A dimension is an int (fixed) or a
symbol name (dynamic): ``batch``, ``txt_len``, ``clap_len``, ``music_len``, ``latent_frames``, ``mel_frames``,
``samples``. Every dynamic dim of a graph is free: no rule ties one to another (the transformer derives its
RoPE table from ``txt_len`` and ``music_len`` inside the graph), so stock tools can run the graphs with any
values they pick.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxmusic.config import FluxMusicConfig
from fluxmusic.latent import LatentGeometry

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "float32", "int64"
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes for this component."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }


#: Export order: also the order a generation uses them.
COMPONENT_NAMES = ("t5", "clap", "transformer", "vae_decoder", "vocoder")
#: The optional fused sampling step (CFG concat + combine + Euler update inside the graph).
STEP_NAME = "euler_step"
#: The optional VAE encoder (audio in: continuation, infilling): log-mel -> scaled posterior-mean latent.
ENCODER_NAME = "vae_encoder"
#: The transformer's (and step graph's) extra input on a model with trained masked conditioning
#: (``context_channels`` > 0): [x0 * mask, mask] per music token; all zeros = no known audio (text-to-music).
CONTEXT_INPUT = "context"


def component_specs(
    cfg: FluxMusicConfig,
    geometry: LatentGeometry,
    t5_width: int,
    clap_width: int,
    include_step: bool = False,
    include_encoder: bool = False,
) -> dict[str, ComponentSpec]:
    """Concrete specs for one model directory. A transformer with ``context_channels`` gets the
    :data:`CONTEXT_INPUT` input last (in the transformer and the step graph); plain models have none."""
    f32, i64 = "float32", "int64"
    patch_ch = cfg.in_channels
    g = geometry
    context = (TensorSpec(CONTEXT_INPUT, f32, ("batch", "music_len", cfg.context_channels)),) if (
        cfg.context_channels) else ()
    specs = {
        "t5": ComponentSpec(
            "t5",
            (TensorSpec("input_ids", i64, ("batch", "txt_len")),),
            (TensorSpec("last_hidden_state", f32, ("batch", "txt_len", t5_width)),),
        ),
        "clap": ComponentSpec(
            "clap",
            (
                TensorSpec("input_ids", i64, ("batch", "clap_len")),
                TensorSpec("attention_mask", i64, ("batch", "clap_len")),
            ),
            (TensorSpec("pooler_output", f32, ("batch", clap_width)),),
        ),
        "transformer": ComponentSpec(
            "transformer",
            (
                TensorSpec("x", f32, ("batch", "music_len", patch_ch)),
                TensorSpec("t", f32, ("batch",)),
                TensorSpec("txt", f32, ("batch", "txt_len", t5_width)),
                TensorSpec("y", f32, ("batch", clap_width)),
                *context,
            ),
            (TensorSpec("v", f32, ("batch", "music_len", patch_ch)),),
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            # Scaled latent in (the graph divides by the VAE scaling factor), log-mel out.
            (TensorSpec("latent", f32, ("batch", g.latent_channels, "latent_frames", g.latent_width)),),
            (TensorSpec("mel", f32, ("batch", "mel_frames", g.mel_bins)),),
        ),
        "vocoder": ComponentSpec(
            "vocoder",
            (TensorSpec("mel", f32, ("batch", "mel_frames", g.mel_bins)),),
            (TensorSpec("waveform", f32, ("batch", "samples")),),
        ),
    }
    if include_step:
        specs[STEP_NAME] = ComponentSpec(
            STEP_NAME,
            (
                TensorSpec("x", f32, ("batch", "music_len", patch_ch)),
                TensorSpec("t", f32, ("batch",)),
                TensorSpec("dt", f32, ("batch",)),
                TensorSpec("txt", f32, ("batch", "txt_len", t5_width)),
                TensorSpec("y", f32, ("batch", clap_width)),
                TensorSpec("null_txt", f32, ("batch", "txt_len", t5_width)),
                TensorSpec("null_y", f32, ("batch", clap_width)),
                TensorSpec("guidance", f32, ("batch",)),
                *context,
            ),
            (TensorSpec("x_next", f32, ("batch", "music_len", patch_ch)),),
        )
    if include_encoder:
        specs[ENCODER_NAME] = ComponentSpec(
            ENCODER_NAME,
            # Log-mel in, the posterior mean times the scaling factor out (what the sampler's known region uses).
            (TensorSpec("mel", f32, ("batch", "mel_frames", g.mel_bins)),),
            (TensorSpec("latent", f32, ("batch", g.latent_channels, "latent_frames", g.latent_width)),),
        )
    return specs


#: The optional image / story models (issue 18; ``fluxmusic export onnx --media``): the image tower and the two
#: adapters. Their graphs are always fp32 ONNX (``fluxmusic.export.media_onnx``).
IMAGE_ENCODER_NAME = "image_encoder"
IMAGE_ADAPTER_NAME = "image_adapter"
STORY_ADAPTER_NAME = "story_adapter"
MEDIA_NAMES = (IMAGE_ENCODER_NAME, IMAGE_ADAPTER_NAME, STORY_ADAPTER_NAME)


def media_specs(
    image_size: int,
    image_tokens: int,
    image_dim: int,
    image_token_dim: int,
    t5_dim: int,
    t5_tokens: int,
    clap_dim: int,
    max_chunks: int,
) -> dict[str, ComponentSpec]:
    """Specs of the image / story graphs: widths from the adapters' config and the image tower's (only the batch
    dim is dynamic; ``image_tokens`` = patches + the class token)."""
    f32 = "float32"
    cond = (TensorSpec("txt", f32, ("batch", t5_tokens, t5_dim)), TensorSpec("y", f32, ("batch", clap_dim)))
    embeds = (TensorSpec("image_embeds", f32, ("batch", image_dim)),
              TensorSpec("image_tokens", f32, ("batch", image_tokens, image_token_dim)))
    return {
        IMAGE_ENCODER_NAME: ComponentSpec(
            IMAGE_ENCODER_NAME, (TensorSpec("pixel_values", f32, ("batch", 3, image_size, image_size)),), embeds
        ),
        IMAGE_ADAPTER_NAME: ComponentSpec(IMAGE_ADAPTER_NAME, embeds, cond),
        STORY_ADAPTER_NAME: ComponentSpec(
            STORY_ADAPTER_NAME,
            (TensorSpec("chunks", f32, ("batch", max_chunks, t5_dim + clap_dim)),
             TensorSpec("chunk_mask", f32, ("batch", max_chunks))),
            cond,
        ),
    }
