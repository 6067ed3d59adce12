"""One CFG transformer evaluation of a config at the real shapes: optimized vs the unoptimized way.

optimized   : cond + uncond in ONE batched forward (batch 2), RoPE table from the per-shape cache
unoptimized : two forwards (batch 1 each), RoPE recomputed from position ids in every call (official sampler)
bf16        : the optimized path under CPU bf16 autocast (fp32 weights)

Variants run interleaved, round-robin, in one process so machine noise hits them alike; we report the
median per variant and ratios to the unoptimized path.

    python benchmarks/bench_transformer.py --config small --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fluxmusic.config import get_config
from fluxmusic.flow import Conditioning, cfg_velocity
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.rope import music_ids, text_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small")
    ap.add_argument("--music-tokens", type=int, default=1024, help="1024 = 10.24 s: a 128 x 8 patch grid")
    ap.add_argument("--txt-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = get_config(args.config)
    model = FluxMusicTransformer(cfg).eval()
    gw = 8
    gh = args.music_tokens // gw
    x = torch.randn(1, gh * gw, cfg.in_channels)
    t = torch.full((1,), 0.5)
    cond = Conditioning(torch.randn(1, args.txt_len, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim))
    null = Conditioning(torch.randn(1, args.txt_len, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim))
    g = torch.tensor([7.0])
    img_ids, txt_ids = music_ids(1, gh, gw), text_ids(1, args.txt_len)

    batched = cfg_velocity(model, cond, null, g, model.rope_for(args.txt_len, gh, gw))

    def optimized():
        return batched(x, t)

    def unoptimized():
        vc = model(x, t, cond.txt, cond.y, img_ids=img_ids, txt_ids=txt_ids)
        vu = model(x, t, null.txt, null.y, img_ids=img_ids, txt_ids=txt_ids)
        return vu + g.view(-1, 1, 1) * (vc - vu)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return batched(x, t)

    variants = {
        "unoptimized (2 passes, RoPE each call)": unoptimized,
        "optimized (batched CFG, cached RoPE)": optimized,
        "optimized + bf16 autocast": bf16,
    }
    with torch.no_grad():
        ref = unoptimized()
        for name, fn in variants.items():
            err = (fn().float() - ref).abs().max().item()
            print(f"check {name}: max-abs vs unoptimized {err:.2e} ({err / ref.abs().max().item():.1e} of the peak)")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["unoptimized (2 passes, RoPE each call)"])
    print(f"\n{args.config}: {gh * gw} music + {args.txt_len} text tokens, CFG batch 2, "
          f"{args.threads} threads, median of {args.repeats}")
    print("| variant | ms per CFG evaluation | speed-up vs unoptimized |\n|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
