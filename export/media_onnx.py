"""ONNX export of the image / story components (issue 18): the image tower and the two adapters.

Three graphs in ``OUT/media/`` with a ``media_manifest.json`` (per file sha256, inputs, outputs, parity):

- ``image_encoder.onnx``: ``pixel_values`` [B, 3, S, S] -> ``image_embeds`` [B, Di], ``image_tokens`` [B, N, Dh]
  (the preprocessing stays the ``image_processor/`` config: resize, crop, normalise, done by the caller);
- ``image_adapter.onnx``: (``image_embeds``, ``image_tokens``) -> (``txt`` [B, L, Dt], ``y`` [B, Dy]);
- ``story_adapter.onnx``: (``chunks`` [B, S, Dt + Dy], ``chunk_mask`` [B, S]) -> (``txt``, ``y``); the chunk
  features come from the T5 / CLAP graphs the main export already has (:func:`fluxmusic.adapters.chunk_features`).

Each graph is checked against PyTorch fp32 with onnxruntime on random inputs before it is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxmusic.adapters import (
    ADAPTERS,
    IMAGE_ENCODER,
    has_media,
    load_adapters,
    load_image_encoder,
)
from fluxmusic.checkpoint import atomic_write_text
from fluxmusic.errors import FluxMusicError

MEDIA_DIR = "media"
MANIFEST = "media_manifest.json"
#: fp32 parity limit of every output (max-abs against PyTorch)
MAX_ABS = 1e-4


class ImageTowerGraph(nn.Module):
    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        out = self.tower(pixel_values=pixel_values)
        return out.image_embeds, out.last_hidden_state


class ImageAdapterGraph(nn.Module):
    def __init__(self, adapters: nn.Module) -> None:
        super().__init__()
        self.adapters = adapters

    def forward(self, image_embeds: Tensor, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.adapters.image(image_embeds, image_tokens)


class StoryAdapterGraph(nn.Module):
    def __init__(self, adapters: nn.Module) -> None:
        super().__init__()
        self.adapters = adapters

    def forward(self, chunks: Tensor, chunk_mask: Tensor) -> tuple[Tensor, Tensor]:
        return self.adapters.story(chunks, chunk_mask)


def _graphs(model_dir: Path, batch: int = 2) -> dict[str, tuple[nn.Module, dict[str, Tensor], list[str]]]:
    tower = load_image_encoder(model_dir / IMAGE_ENCODER).float().eval()
    adapters = load_adapters(model_dir / ADAPTERS).float().eval()
    c, tc = adapters.config, tower.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, tc.image_size, tc.image_size, generator=g)
    with torch.no_grad():
        embeds, tokens = ImageTowerGraph(tower)(pixels)
    mask = torch.ones(batch, c.max_chunks)
    mask[1:, c.max_chunks // 2:] = 0  # a shorter story in the batch: the padding path is exported too
    return {
        "image_encoder": (ImageTowerGraph(tower), {"pixel_values": pixels}, ["image_embeds", "image_tokens"]),
        "image_adapter": (ImageAdapterGraph(adapters), {"image_embeds": embeds, "image_tokens": tokens},
                          ["txt", "y"]),
        "story_adapter": (StoryAdapterGraph(adapters), {
            "chunks": torch.randn(batch, c.max_chunks, c.t5_dim + c.clap_dim, generator=g), "chunk_mask": mask},
            ["txt", "y"]),
    }


def export_media(model_dir: str | Path, out_dir: str | Path, opset: int = 18) -> dict:
    """Export the three graphs of a model directory with adapters; returns the manifest written."""
    import onnxruntime as ort
    from fluxmusic.export.onnx_export import sha256_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not has_media(model_dir):
        raise FluxMusicError(f"model directory {model_dir} has no image / story adapters to export")
    target = out_dir / MEDIA_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{MEDIA_DIR}."))
    manifest: dict = {"format": "fluxmusic-media-onnx", "opset": opset, "graphs": {}}
    try:
        for name, (module, inputs, outputs) in _graphs(model_dir).items():
            path = tmp / f"{name}.onnx"
            axes = {k: {0: "batch"} for k in [*inputs, *outputs]}
            import warnings

            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=list(inputs),
                                  output_names=outputs, dynamic_axes=axes, opset_version=opset, dynamo=False)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
            with torch.no_grad():
                want = module(*inputs.values())
            err = max(float((torch.from_numpy(a) - b).abs().max()) for a, b in zip(got, want))
            if not err <= MAX_ABS:
                raise FluxMusicError(f"ONNX {name} misses parity with PyTorch: max-abs {err:.2e} > {MAX_ABS:g}")
            manifest["graphs"][name] = {
                "file": path.name, "sha256": sha256_file(path), "inputs": list(inputs), "outputs": outputs,
                "max_abs_vs_torch": err,
            }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
