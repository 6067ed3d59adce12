"""Peak resident memory of loading the transformer, per config and target dtype, one subprocess per load.

For each config a ``config.json`` + ``model.safetensors`` directory with random weights is written under
``--workdir`` without ever holding the model in memory (the structure comes from a meta-device model, each
tensor is produced and streamed to disk on its own). Each load then runs in a fresh subprocess, so peaks
do not mix, and reports:

  weights   the parameters' bytes in the target dtype
  base      RSS after imports, before the load
  peak      the process's peak RSS (ru_maxrss) after the load
  ratio     (peak - base) / weights: what the load costs beyond the interpreter; the goal is <= 1.15

``--old`` adds the previous loader (safetensors ``load_file`` of the whole file, fp32 parameters
materialised, ``load_state_dict`` copy, then a cast) for the configs small enough to afford it.
Files are deleted afterwards unless ``--keep``. Each config is skipped, with a message, when the machine's
available memory is below 1.3x its weights + 1 GiB, so this never pushes a shared machine into the OOM killer.

    python benchmarks/bench_memory.py --configs tiny small base --dtypes float32 bfloat16 --old
    python benchmarks/bench_memory.py --configs giant biggiant --dtypes bfloat16 --disk-dtype bfloat16 \
        --forward 64 16 --workdir /tmp/fluxmusic-mem
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
spec = json.loads(sys.argv[1])
import torch
from fluxmusic.backend import parse_dtype
from fluxmusic.transformer_io import load_transformer

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
dtype = parse_dtype(spec["dtype"])
base = rss()
t0 = time.perf_counter()
if spec["old"]:
    from fluxmusic.checkpoint import load_weights, read_state_dict
    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.model import FluxMusicTransformer
    cfg = FluxMusicConfig.load(spec["dir"] + "/config.json")
    with torch.device("meta"):
        model = FluxMusicTransformer(cfg)
    model = model.to_empty(device="cpu")
    load_weights(model, read_state_dict(spec["dir"] + "/model.safetensors"))
    model = model.to(dtype=dtype).eval()
else:
    model = load_transformer(spec["dir"], dtype=dtype)
secs = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
res = {"weights": weights, "base": base, "peak": peak, "after": rss(), "seconds": secs}
if spec.get("forward"):
    # generation: one batched CFG evaluation at a short shape (music tokens on the real 8-column grid)
    from fluxmusic.flow import Conditioning, cfg_velocity
    cfg, (music, txt) = model.config, spec["forward"]
    gh, gw = max(music // 8, 1), 8
    torch.manual_seed(0)
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype)
    x = rand(1, gh * gw, cfg.in_channels)
    cond = Conditioning(rand(1, txt, cfg.context_in_dim), rand(1, cfg.vec_in_dim))
    null = Conditioning(rand(1, txt, cfg.context_in_dim), rand(1, cfg.vec_in_dim))
    velocity = cfg_velocity(model, cond, null, torch.tensor([4.0]), model.rope_for(txt, gh, gw))
    t1 = time.perf_counter()
    with torch.no_grad():
        v = velocity(x, torch.full((1,), 0.7, dtype=dtype))
    res.update(forward_seconds=time.perf_counter() - t1, forward_finite=bool(torch.isfinite(v).all()),
               peak_forward=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               forward_tokens=[gh * gw, txt])
print(json.dumps(res))
"""


def write_random_transformer(name: str, out: Path, disk_dtype: str) -> int:
    """Write ``out/config.json`` + ``out/model.safetensors`` with random weights, streaming; return file bytes."""
    import torch

    from fluxmusic.backend import parse_dtype
    from fluxmusic.checkpoint import atomic_write_text
    from fluxmusic.config import get_config
    from fluxmusic.model import FluxMusicTransformer
    from fluxmusic.streaming import save_streaming
    from fluxmusic.transformer_io import CONFIG_NAME, WEIGHTS_NAME, _config_json

    cfg = get_config(name)
    with torch.device("meta"):
        model = FluxMusicTransformer(cfg)
    dt = parse_dtype(disk_dtype)
    specs = {k: (dt, tuple(v.shape)) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tile = torch.randn(1 << 16, generator=g) * 0.02  # tiled: random enough for memory, cheap for 5 B values

    def produce(k: str):
        n = math.prod(specs[k][1])
        reps = -(-n // tile.numel())
        return tile.repeat(reps)[:n].view(specs[k][1]).to(dt)

    out.mkdir(parents=True, exist_ok=True)
    save_streaming(specs, produce, out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_text(out / CONFIG_NAME, _config_json(cfg))
    return (out / WEIGHTS_NAME).stat().st_size


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--disk-dtype", default="float32", help="dtype of the written files (official: float32)")
    ap.add_argument("--old", action="store_true", help="also measure the previous whole-file loader")
    ap.add_argument("--workdir", default=None, help="where the random model files go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the written files (and write them even when the load must be skipped for memory, "
                         "so a later run with the same --workdir only loads)")
    ap.add_argument("--forward", type=int, nargs=2, metavar=("MUSIC_TOKENS", "TEXT_TOKENS"),
                    help="after the load, one batched CFG evaluation at this short shape (e.g. 64 16): the peak "
                         "RSS of loading and generating")
    args = ap.parse_args()
    from fluxmusic.config import get_config

    root = Path(args.workdir or tempfile.mkdtemp(prefix="fluxmusic-mem-"))
    gib = 1 << 30
    print("| config | params | on disk | target dtype | loader | weights GiB | base GiB | peak GiB "
          "| (peak - base) / weights | load s |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    try:
        for name in args.configs:
            cfg_dir = root / name
            params = None
            for dtype in args.dtypes:
                loaders = ["streamed", "old"] if args.old else ["streamed"]
                for loader in loaders:
                    elsize = 2 if dtype in ("bfloat16", "bf16", "float16", "fp16") else 4
                    est = _param_count(get_config(name)) * elsize
                    need = 1.3 * est + gib if loader == "streamed" else 3.2 * est + gib
                    if available_bytes() < need and not args.keep:
                        print(f"| {name} | | | {dtype} | {loader} | skipped: {available_bytes() / gib:.1f} GiB "
                              f"available, needs {need / gib:.1f} | | | | |", flush=True)
                        continue
                    if not (cfg_dir / "model.safetensors").is_file():
                        size = write_random_transformer(name, cfg_dir, args.disk_dtype)
                    else:
                        size = (cfg_dir / "model.safetensors").stat().st_size
                    if available_bytes() < need:  # again: writing a large file takes minutes on a shared machine
                        print(f"| {name} | | | {dtype} | {loader} | skipped after writing: "
                              f"{available_bytes() / gib:.1f} GiB available, needs {need / gib:.1f} | | | | |",
                              flush=True)
                        continue
                    spec = json.dumps({"dir": str(cfg_dir), "dtype": dtype, "old": loader == "old",
                                       "forward": args.forward})
                    out = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"| {name} | | | {dtype} | {loader} | failed: {out.stderr.strip()[-300:]} |", flush=True)
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    params = params or _param_count(get_config(name))
                    ratio = (r["peak"] - r["base"]) / r["weights"]
                    print(f"| {name} | {params / 1e6:.1f} M | {size / gib:.2f} GiB {args.disk_dtype} | {dtype} "
                          f"| {loader} | {r['weights'] / gib:.3f} | {r['base'] / gib:.2f} | {r['peak'] / gib:.2f} "
                          f"| {ratio:.2f} | {r['seconds']:.1f} |", flush=True)
                    if "peak_forward" in r:
                        m, t = r["forward_tokens"]
                        print(f"|   + one CFG evaluation ({m} music + {t} text tokens, finite: "
                              f"{r['forward_finite']}) | | | | | | | {r['peak_forward'] / gib:.2f} "
                              f"| {(r['peak_forward'] - r['base']) / r['weights']:.2f} "
                              f"| {r['forward_seconds']:.1f} |", flush=True)
            if not args.keep:
                shutil.rmtree(cfg_dir, ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _param_count(cfg) -> int:
    import torch

    from fluxmusic.model import FluxMusicTransformer

    with torch.device("meta"):
        return FluxMusicTransformer(cfg).num_parameters()


if __name__ == "__main__":
    main()
