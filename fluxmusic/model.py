"""The FluxMusic transformer: double-stream then single-stream MMDiT blocks with 3-axis RoPE.

Written from the paper and DESIGN.md section 4. Parameter names and shapes equal the official ones, so
official checkpoints load unchanged (checked against shared/testdata/official_configs.json).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fluxmusic.config import FluxMusicConfig
from fluxmusic.ops import REFERENCE_OPS, OpSet
from fluxmusic.rope import RopeCache, rope_table


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of ``time_factor * t``: cos half first, then sin."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    """Holds the learnable q and k RMSNorm scales; the normalisation itself is in the op set."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    """The qkv projection, its QK norm and the output projection of one stream of a double block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """adaLN: Linear(SiLU(vec)) split into (shift, scale, gate) once or twice."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return self.lin(nn.functional.silu(vec)).chunk(self.multiplier, dim=-1)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    # The GELU module only holds index 1 (the official keys are *_mlp.0 / *_mlp.2); forward runs the op set's
    # gelu through _run_mlp instead, so a fast bf16 form can stand in for it.
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def _run_mlp(ops: OpSet, mlp: nn.Sequential, x: Tensor) -> Tensor:
    """The block MLP with the op set's GELU (the Sequential keeps the official state-dict keys)."""
    return mlp[2](ops.gelu(mlp[0](x)))


class DoubleStreamBlock(nn.Module):
    """Separate weights for music and text, joint attention over [text; music]."""

    def __init__(self, cfg: FluxMusicConfig) -> None:
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_heads
        self.num_heads = h
        self.img_mod = Modulation(d, double=True)
        self.img_attn = SelfAttention(d, h, cfg.qkv_bias)
        self.img_mlp = _mlp(d, cfg.mlp_hidden_dim)
        self.txt_mod = Modulation(d, double=True)
        self.txt_attn = SelfAttention(d, h, cfg.qkv_bias)
        self.txt_mlp = _mlp(d, cfg.mlp_hidden_dim)

    def _qkv(self, ops: OpSet, x: Tensor, attn: SelfAttention, shift: Tensor, scale: Tensor, rope: Tensor):
        x = ops.layernorm_modulate(x, shift, scale)
        qkv = ops.project_qkv(attn.qkv, x, self.num_heads, attn.qkv.in_features // self.num_heads)
        return ops.qk_rmsnorm_rope(qkv, attn.norm.query_norm.scale, attn.norm.key_norm.scale, rope, self.num_heads)

    def forward(self, ops: OpSet, img: Tensor, txt: Tensor, vec: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        n_txt = txt.shape[1]
        # q and k are RMS-normed then rotated per stream; RoPE positions are those of [text; music].
        tq, tk, tv = self._qkv(ops, txt, self.txt_attn, t_shift1, t_scale1, rope[:, :n_txt])
        iq, ik, iv = self._qkv(ops, img, self.img_attn, i_shift1, i_scale1, rope[:, n_txt:])
        out = ops.attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2))
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]

        img, img_mod = ops.gated_residual_modulate(img, i_gate1, self.img_attn.proj(img_out), i_shift2, i_scale2)
        img = ops.gated_residual(img, i_gate2, _run_mlp(ops, self.img_mlp, img_mod))
        txt, txt_mod = ops.gated_residual_modulate(txt, t_gate1, self.txt_attn.proj(txt_out), t_shift2, t_scale2)
        txt = ops.gated_residual(txt, t_gate2, _run_mlp(ops, self.txt_mlp, txt_mod))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text; music]: parallel attention and MLP from one fused input projection."""

    def __init__(self, cfg: FluxMusicConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.hidden_size = d
        self.mlp_hidden_dim = cfg.mlp_hidden_dim
        self.linear1 = nn.Linear(d, 3 * d + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(d + self.mlp_hidden_dim, d)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(d, double=False)

    def forward(self, ops: OpSet, x: Tensor, vec: Tensor, rope: Tensor) -> Tensor:
        d = self.hidden_size
        shift, scale, gate = self.modulation(vec)
        h = ops.project_qkv(self.linear1, ops.layernorm_modulate(x, shift, scale), self.num_heads, d // self.num_heads)
        qkv, mlp = h[..., : 3 * self.hidden_size], h[..., 3 * self.hidden_size :]
        q, k, v = ops.qk_rmsnorm_rope(qkv, self.norm.query_norm.scale, self.norm.key_norm.scale, rope, self.num_heads)
        out = self.linear2(torch.cat((ops.attention(q, k, v), ops.gelu(mlp)), dim=2))
        return ops.gated_residual(x, gate, out)


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, ops: OpSet, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(ops.layernorm_modulate(x, shift, scale))


class FluxMusicTransformer(nn.Module):
    """Velocity model v(x_t, t | txt, y) on patchified latents ``x`` [B, L_music, in_channels]."""

    def __init__(self, cfg: FluxMusicConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.time_in = MLPEmbedder(256, d)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d)
        self.txt_in = nn.Linear(cfg.context_in_dim, d)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(d, cfg.in_channels)
        # Trained masked conditioning: [masked clean latent, mask] per token, projected and added to the noisy
        # latent's projection (the same as one input projection over the concatenation, while img_in keeps its
        # official name and shape). Zero-initialised, so a model extended from a plain checkpoint starts out
        # exactly equal to it.
        self.context_in = nn.Linear(cfg.context_channels, d) if cfg.context_channels else None
        if self.context_in is not None:
            nn.init.zeros_(self.context_in.weight)
            nn.init.zeros_(self.context_in.bias)
        self.ops: OpSet = REFERENCE_OPS
        self.rope_cache = RopeCache(cfg.axes_dim, cfg.theta)

    def rope_for(self, txt_len: int, grid_h: int, grid_w: int) -> Tensor:
        """The cached RoPE table for a [text; music] sequence (depends only on these shapes)."""
        return self.rope_cache.get(txt_len, grid_h, grid_w, self.img_in.weight.device)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        txt: Tensor,
        y: Tensor,
        rope: Tensor | None = None,
        img_ids: Tensor | None = None,
        txt_ids: Tensor | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Predict the velocity.

        Either ``rope`` (a table from :meth:`rope_for`, the fast path) or both position-id tensors
        (the official calling convention, tables computed in this call) must be given. ``context``
        [B, L_music, context_channels] (:func:`masked_context`) is for models with ``context_channels``;
        None there means no known audio (plain text-to-music), the same as an all-zero context.
        """
        if rope is None:
            if img_ids is None or txt_ids is None:
                raise ValueError("pass rope=model.rope_for(...) or both img_ids and txt_ids")
            rope = rope_table(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.theta)
        ops = self.ops
        img = self.img_in(x)
        if self.context_in is not None:
            img = img + (self.context_in.bias if context is None else self.context_in(context.to(img.dtype)))
        elif context is not None:
            raise ValueError("this transformer has no context input (context_channels 0); pass context=None")
        vec = self.time_in(timestep_embedding(t, 256).to(img.dtype)) + self.vector_in(y)
        txt_h = self.txt_in(txt)
        for block in self.double_blocks:
            img, txt_h = block(ops, img, txt_h, vec, rope)
        h = torch.cat((txt_h, img), dim=1)
        for block in self.single_blocks:
            h = block(ops, h, vec, rope)
        return self.final_layer(ops, h[:, txt_h.shape[1] :], vec)

    @property
    def takes_beat(self) -> bool:
        """Whether the context input also takes the beat grid (``beat_channels`` > 0, :mod:`fluxmusic.beat`)."""
        return self.config.beat_channels > 0

    @property
    def control_channels(self) -> int:
        """The context input's trailing control columns: the beat grid's plus the register hint's."""
        return self.config.beat_channels + self.config.register_channels

    @property
    def takes_context(self) -> bool:
        """Whether the model was built for trained masked conditioning (``context_channels`` > 0)."""
        return self.context_in is not None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def masked_context(x0: Tensor, mask: Tensor) -> Tensor:
    """The context input of trained masked conditioning: [x0 * mask, mask] per token, from patchified clean
    latents ``x0`` [B, L, C] and a mask broadcastable to them (1 = known, 0 = to generate) -> [B, L, 2C]."""
    m = mask.to(x0.dtype).expand_as(x0)
    return torch.cat((x0 * m, m), dim=-1)


def add_context_input(model: FluxMusicTransformer, beat_channels: int = 0,
                      register_channels: int = 0) -> FluxMusicTransformer:
    """A copy of ``model`` extended with the (zero-initialised) context input, or, for a model that has one, with
    more columns of it: the beat grid (``beat_channels``, :mod:`fluxmusic.beat`) and / or the register hint
    (``register_channels``, :mod:`fluxmusic.register`). It computes exactly what ``model`` computes until the new
    weights are trained; columns the model already has keep their weights."""
    import dataclasses

    old = model.config
    want = {"beat_channels": beat_channels, "register_channels": register_channels}
    have = {k: getattr(old, k) for k in want}
    if model.takes_context and (want == have or any(have[k] and not want[k] for k in want)):
        raise ValueError(f"the transformer already takes a context input ({have}); cannot extend it to {want}")
    cfg = dataclasses.replace(old, context_channels=2 * old.in_channels + beat_channels + register_channels, **want)
    new = FluxMusicTransformer(cfg)
    p = next(model.parameters())
    new = new.to(p.device, p.dtype)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("context_in.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"context_in.weight", "context_in.bias"}:
        raise ValueError(f"unexpected state dict difference: missing {missing}, unexpected {unexpected}")
    if model.context_in is not None:  # the trained context columns keep their weights; the new ones start at 0
        two_c = 2 * old.in_channels
        w_old, w_new = model.context_in.weight, new.context_in.weight
        with torch.no_grad():
            w_new[:, :two_c] = w_old[:, :two_c]
            if have["beat_channels"]:
                w_new[:, two_c : two_c + beat_channels] = w_old[:, two_c : two_c + beat_channels]
            if have["register_channels"]:
                w_new[:, -register_channels:] = w_old[:, -register_channels:]
            new.context_in.bias.copy_(model.context_in.bias)
    new.ops = model.ops
    return new
