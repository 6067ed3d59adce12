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
        transformer_dir = Path(transformer_dir)
        return cls.from_files(transformer_dir / "model.safetensors", transformer_dir / "config.json", device)

    @classmethod
    def from_files(
        cls, weights: str | Path, config: str | Path, device: torch.device | str = "cpu"
    ) -> FirstBlockProbe:
        """Load the probe from a safetensors file holding (at least) its weights under the transformer's
        names (a full ``model.safetensors`` or one written by :func:`write_probe_weights`)."""
        weights, config = Path(weights), Path(config)
        if not weights.is_file():
            raise FluxMusicError(
                f"step caching needs the transformer's first-block weights, but {weights} does not exist"
            )
        cfg = FluxMusicConfig.load(config)
        d = cfg.hidden_size
        probe = cls(nn.Linear(cfg.in_channels, d), MLPEmbedder(256, d), MLPEmbedder(cfg.vec_in_dim, d),
                    Modulation(d, double=True))
        rename = dict(zip(PROBE_PREFIXES, ("img_in.", "time_in.", "vector_in.", "img_mod.")))
        state = {}
        for key, tensor in read_probe_weights(weights).items():
            for src, dst in rename.items():
                if key.startswith(src):
                    state[dst + key[len(src):]] = tensor.float()
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


def read_probe_weights(weights: str | Path) -> dict[str, Tensor]:
    """The probe's tensors (transformer names) from a safetensors file, reading nothing else."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(PROBE_PREFIXES)}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise FluxMusicError(f"{weights} cannot be read for the step-cache probe: {e}") from e


def write_probe_weights(transformer_dir: str | Path, out: str | Path) -> Path:
    """Write just the probe's weights (for a deployment without the full transformer file, e.g. the Triton
    BLS model, whose transformer runs elsewhere)."""
    from fluxmusic.checkpoint import atomic_save_safetensors

    state = {k: v.contiguous() for k, v in read_probe_weights(Path(transformer_dir) / "model.safetensors").items()}
    atomic_save_safetensors(state, Path(out))
    return Path(out)
