"""The probe of step caching: the modulated input of the transformer's first block.

TeaCache decides whether an evaluation can be skipped by how much the first block's modulated input,
(1 + scale(vec)) LN(img_in(x)) + shift(vec), changed since the last evaluation: it moves with both the state
and the timestep embedding, and costs one small linear layer and the modulation MLPs (well under 1% of an
evaluation). Any backend can use it: with the torch backend it shares the live transformer's modules; other
backends (onnxruntime, TensorRT) load just these few weights from ``transformer/model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import MLPEmbedder, Modulation, timestep_embedding

#: The weights the probe needs, as prefixes of the transformer's parameter names.
PROBE_PREFIXES = ("img_in.", "time_in.", "vector_in.", "double_blocks.0.img_mod.")


class FirstBlockProbe(nn.Module):
    """probe(x, t, y) -> the first double block's modulated music input [B, L, hidden] (fp32)."""

    def __init__(self, img_in: nn.Linear, time_in: MLPEmbedder, vector_in: MLPEmbedder, img_mod: Modulation):
        super().__init__()
        self.img_in, self.time_in, self.vector_in, self.img_mod = img_in, time_in, vector_in, img_mod

    @classmethod
    def from_transformer(cls, transformer) -> FirstBlockProbe:
        """Share the modules of a loaded :class:`fluxmusic.model.FluxMusicTransformer` (no copy)."""
        return cls(transformer.img_in, transformer.time_in, transformer.vector_in, transformer.double_blocks[0].img_mod)

    @classmethod
    def from_dir(cls, transformer_dir: str | Path, device: torch.device | str = "cpu") -> FirstBlockProbe:
        """Load only the probe's weights from ``transformer_dir`` (config.json + model.safetensors)."""
        from safetensors import safe_open

        transformer_dir = Path(transformer_dir)
        weights = transformer_dir / "model.safetensors"
        if not weights.is_file():
            raise FluxMusicError(
                f"step caching needs the transformer's first-block weights, but {weights} does not exist"
            )
        cfg = FluxMusicConfig.load(transformer_dir / "config.json")
        d = cfg.hidden_size
        probe = cls(nn.Linear(cfg.in_channels, d), MLPEmbedder(256, d), MLPEmbedder(cfg.vec_in_dim, d),
                    Modulation(d, double=True))
        want = {
            "img_in.": "img_in.", "time_in.": "time_in.", "vector_in.": "vector_in.",
            "double_blocks.0.img_mod.": "img_mod.",
        }
        state = {}
        try:
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    for src, dst in want.items():
                        if key.startswith(src):
                            state[dst + key[len(src):]] = f.get_tensor(key).float()
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise FluxMusicError(f"{weights} cannot be read for the step-cache probe: {e}") from e
        missing, unexpected = probe.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FluxMusicError(f"{weights} lacks the step-cache probe weights: missing {sorted(missing)[:4]}")
        return probe.to(device).eval()

    @torch.no_grad()
    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        dtype = self.img_in.weight.dtype
        img = self.img_in(x.to(dtype))
        vec = self.time_in(timestep_embedding(t.to(dtype), 256).to(dtype)) + self.vector_in(y.to(dtype))
        shift, scale = self.img_mod(vec)[:2]
        h = nn.functional.layer_norm(img.float(), (img.shape[-1],), eps=1e-6)
        return (1 + scale.float()[:, None]) * h + shift.float()[:, None]
