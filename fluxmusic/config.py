"""Transformer hyper-parameters as plain data, with the official named configs."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fluxmusic.checkpoint import read_json
from fluxmusic.errors import FluxMusicError


def _pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class FluxMusicConfig:
    """Hyper-parameters of the FluxMusic transformer (the official ``FluxParams`` fields).

    ``guidance_embed`` is kept for fidelity with the official configs, but the published model
    has no guidance embedding in its forward pass and no ``guidance_in`` weights, so it is unused.
    """

    in_channels: int = 32
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 512
    mlp_ratio: float = 4.0
    num_heads: int = 16
    depth: int = 8
    depth_single_blocks: int = 16
    axes_dim: tuple[int, ...] = (8, 12, 12)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True
    #: Trained masked conditioning (MusicFlow-style continuation / infilling): 0 = off (the official models);
    #: 2 x in_channels = the model also takes, per token, [masked clean latent, mask] (see ``context_in``).
    context_channels: int = 0
    #: Beat-grid conditioning (fluxmusic.beat): 0 = off; BEAT_CHANNELS = the context input also takes, per token,
    #: the phase of a pulse train at the requested BPM (after the masked latent and mask; needs the context input).
    beat_channels: int = 0
    #: Register hint (fluxmusic.register): 0 = off; REGISTER_CHANNELS = the context input also takes, per token, the
    #: melody's target pitch (after the beat grid's channels; needs the context input).
    register_channels: int = 0
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Configs come from files: check types first, so a string or a zero is one clear error, not a traceback.
        ints = ("in_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads", "theta")
        bad = [f"{k} = {getattr(self, k)!r} (a positive integer)" for k in ints if not _pos_int(getattr(self, k))]
        bad += [
            f"{k} = {getattr(self, k)!r} (an integer >= 0)"
            for k in ("depth", "depth_single_blocks")
            if not (_pos_int(getattr(self, k)) or getattr(self, k) == 0)
        ]
        r = self.mlp_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            bad.append(f"mlp_ratio = {r!r} (a finite number > 0)")
        bad += [f"{k} = {getattr(self, k)!r} (true or false)" for k in ("qkv_bias", "guidance_embed")
                if not isinstance(getattr(self, k), bool)]
        axes = self.axes_dim
        if not (isinstance(axes, (list, tuple)) and axes and all(_pos_int(a) for a in axes)):
            bad.append(f"axes_dim = {axes!r} (a list of positive integers)")
        from fluxmusic.beat import BEAT_CHANNELS
        from fluxmusic.register import REGISTER_CHANNELS

        extra = 0  # the channels the beat grid and the register hint add to the context input
        for name, allowed, what in (("beat_channels", BEAT_CHANNELS, "beat grid"),
                                    ("register_channels", REGISTER_CHANNELS, "register hint")):
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool) and v in (0, allowed):
                extra += v
            else:
                bad.append(f"{name} = {v!r} (0: no {what}, or {allowed})")
        cc = self.context_channels
        two_c = 2 * self.in_channels if _pos_int(self.in_channels) else "in_channels * 2"
        if extra:
            want = two_c + extra if isinstance(two_c, int) else None
            if not (isinstance(cc, int) and not isinstance(cc, bool) and cc == want):
                bad.append(f"context_channels = {cc!r} (with beat_channels {self.beat_channels} and register_channels "
                           f"{self.register_channels}: 2 x in_channels + both = {want}: the masked clean latent, "
                           "its mask, then the beat grid and the register hint)")
        elif not (isinstance(cc, int) and not isinstance(cc, bool) and cc in (0, two_c)):
            bad.append(f"context_channels = {cc!r} (0: no context input, or 2 x in_channels = {two_c}: the masked "
                       "clean latent and its mask)")
        if bad:
            raise FluxMusicError("transformer config is invalid: " + "; ".join(bad))
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise FluxMusicError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise FluxMusicError(f"sum(axes_dim) = {sum(self.axes_dim)} must equal head_dim = {self.head_dim}")
        if any(a % 2 for a in self.axes_dim):
            raise FluxMusicError(f"every axes_dim entry must be even, got {list(self.axes_dim)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        d.pop("extra")
        for k in ("context_channels", "beat_channels", "register_channels"):
            if not d[k]:  # absent = off: configs without it read and write as before
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FluxMusicConfig:
        if not isinstance(d, dict):
            raise FluxMusicError(f"a transformer config must be a JSON object, not a {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FluxMusicError(f"unknown transformer config keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FluxMusicConfig:
        try:
            return cls.from_dict(read_json(path, "transformer config"))
        except FluxMusicError as e:
            if str(path) in str(e):
                raise
            raise FluxMusicError(f"{path}: {e}") from None


_OFFICIAL = dict(in_channels=32, vec_in_dim=768, context_in_dim=4096, mlp_ratio=4.0, num_heads=16)

#: The official configs (paper Table 1), plus tiny ones for tests and the bundled default.
CONFIGS: dict[str, FluxMusicConfig] = {
    "small": FluxMusicConfig(**_OFFICIAL, hidden_size=512, depth=8, depth_single_blocks=16, axes_dim=(8, 12, 12)),
    "base": FluxMusicConfig(**_OFFICIAL, hidden_size=768, depth=12, depth_single_blocks=24, axes_dim=(16, 16, 16)),
    "large": FluxMusicConfig(**_OFFICIAL, hidden_size=1024, depth=12, depth_single_blocks=24, axes_dim=(16, 24, 24)),
    "giant": FluxMusicConfig(**_OFFICIAL, hidden_size=1408, depth=16, depth_single_blocks=32, axes_dim=(16, 36, 36)),
    "giant_full": FluxMusicConfig(
        **_OFFICIAL, hidden_size=1408, depth=12, depth_single_blocks=24, axes_dim=(16, 36, 36)
    ),
    "biggiant": FluxMusicConfig(**_OFFICIAL, hidden_size=2048, depth=19, depth_single_blocks=38, axes_dim=(32, 48, 48)),
    # Tiny configs: same architecture, sizes small enough for tests and a CPU-trained default.
    "tiny": FluxMusicConfig(
        in_channels=32,
        vec_in_dim=32,
        context_in_dim=48,
        hidden_size=64,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 6, 6),
    ),
}


def get_config(name: str) -> FluxMusicConfig:
    """Return a named config, or raise one clear error listing the allowed names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise FluxMusicError(f"unknown config {name!r}; allowed: {', '.join(CONFIGS)}") from None
