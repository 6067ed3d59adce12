"""Random inputs of one CFG transformer evaluation at the real shapes, shared by the transformer benchmarks.

10.24 s is a 128 x 8 patch grid (1024 music tokens) next to 256 T5 tokens; cond and uncond conditioning,
guidance 7. Everything is drawn after ``torch.manual_seed(0)`` in one order, so every benchmark sees the same
model and inputs for a config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from fluxmusic.config import get_config
from fluxmusic.flow import Conditioning
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.rope import music_ids, text_ids

GRID_W = 8  # patch columns: 64 mel bins / 4x VAE / 2x2 patches


def add_shape_arguments(ap: argparse.ArgumentParser, repeats: int) -> None:
    ap.add_argument("--config", default="small")
    ap.add_argument("--model", help="a model directory instead of --config: its transformer with its weights, at its "
                                    "own shapes (a full window, its T5 length) and guidance, on a real prompt")
    ap.add_argument("--music-tokens", type=int, default=1024, help="1024 = 10.24 s: a 128 x 8 patch grid")
    ap.add_argument("--txt-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())


def real_shape_inputs(args: argparse.Namespace, t: float):
    """Sets the thread count and seed, then returns (cfg, model, x, t, cond, null, g, gh, gw). With ``--model``
    the shapes come from the model directory (``args.txt_len``, ``args.music_tokens`` and ``args.config`` are set
    to match)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if getattr(args, "model", None):
        return _model_dir_inputs(args, t)
    cfg = get_config(args.config)
    model = FluxMusicTransformer(cfg).eval()
    gh, gw = args.music_tokens // GRID_W, GRID_W
    x = torch.randn(1, gh * gw, cfg.in_channels)
    tt = torch.full((1,), t)
    cond = Conditioning(torch.randn(1, args.txt_len, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim))
    null = Conditioning(torch.randn(1, args.txt_len, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim))
    return cfg, model, x, tt, cond, null, torch.tensor([7.0]), gh, gw


def _model_dir_inputs(args: argparse.Namespace, t: float):
    from fluxmusic.pipeline import FluxMusicPipeline

    pipe = FluxMusicPipeline.from_pretrained(args.model, dtype="float32")
    model = pipe.backend.transformer.eval()
    geo = pipe.geometry
    gh, gw = geo.grid(geo.max_latent_frames)
    item = pipe.request("a slow Bach chorale on church organ").items[0]  # the model's defaults resolved
    cond, null = pipe.conditioning([item.prompt]), pipe.conditioning([item.negative_prompt])
    args.txt_len, args.music_tokens, args.config = cond.txt.shape[1], gh * gw, f"model {args.model}"
    x = torch.randn(1, gh * gw, model.config.in_channels)
    guidance = torch.tensor([float(item.guidance)])
    return model.config, model, x, torch.full((1,), t), cond, null, guidance, gh, gw


def official_cfg_evaluation(model, x, t, cond, null, g, gh: int, gw: int) -> Callable[[], torch.Tensor]:
    """The official sampler's guided evaluation as a callable: two B=1 forwards, each computing its RoPE table
    from the position ids (made once here, as the official code makes them once per sampling run)."""
    img_ids, txt_ids = music_ids(1, gh, gw), text_ids(1, cond.txt.shape[1])

    def evaluate() -> torch.Tensor:
        vc = model(x, t, cond.txt, cond.y, img_ids=img_ids, txt_ids=txt_ids)
        vu = model(x, t, null.txt, null.y, img_ids=img_ids, txt_ids=txt_ids)
        return vu + g.view(-1, 1, 1) * (vc - vu)

    return evaluate
