"""``fluxmusic bench``: per-component latency and real-time factor, backends side by side in one run.

Backends: torch fp32 (the reference of every ratio), torch with bf16 autocast, onnxruntime fp32 and
onnxruntime int8 (dynamically quantised transformer). Two targets:

- a model directory (``--model``; default: the bundled default): T5, CLAP, one batched CFG transformer call,
  VAE decoder, vocoder, and a whole generation (real-time factor = wall time / audio seconds);
- a named config at real shapes (``--config small``): the transformer alone with random weights on the
  published shapes (batch 2 = cond + uncond, 1024 music tokens, 256 text tokens of 4096, y 768); the
  real-time factor there is projected from ``--steps`` transformer calls (the encoders and decoders are
  not part of it).

Each number is the median of ``--repeats`` timed calls after ``--warmup`` untimed ones. Speed-ups are
torch fp32 time / backend time, measured in the same process one after another.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fluxmusic.errors import FluxMusicError

BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")
PROMPT = "a fast cheerful melody on a plucked string"


def timeit(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ model dir
def bench_model_dir(
    model_dir: Path, backends, repeats: int, warmup: int, steps: int | None, onnx_dir: Path | None, threads: int = 0
) -> dict:
    from fluxmusic.export.onnx_export import export_onnx
    from fluxmusic.export.validate import _pipeline

    from fluxmusic.backend import make_backend
    from fluxmusic.modeldir import read_index

    index = read_index(model_dir)
    tmp = None
    if any(b.startswith("onnx") for b in backends) and onnx_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fluxmusic-bench-")
        onnx_dir = Path(tmp.name) / "onnx"
        _say(f"exporting {model_dir} to ONNX (fp32 + int8) in {onnx_dir}")
        export_onnx(model_dir, onnx_dir, int8=True, progress=_say)
    results: dict[str, dict[str, float]] = {}
    try:
        for name in backends:
            _say(f"model dir: {name}")
            if name == "torch":
                be = make_backend("torch", model_dir, index, "cpu", torch.float32)
            elif name == "torch-bf16":
                be = make_backend("torch", model_dir, index, "cpu", torch.float32, autocast_bf16=True)
            else:
                be = make_backend(
                    "onnx",
                    model_dir,
                    index,
                    "cpu",
                    torch.float32,
                    onnx_dir=onnx_dir,
                    variant="int8" if name == "onnx-int8" else "fp32",
                    intra_op_threads=threads,
                )
            results[name] = _bench_backend(be, _pipeline(model_dir, be), index, repeats, warmup, steps)
            del be
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def _bench_backend(be, pipe, index, repeats: int, warmup: int, steps: int | None) -> dict[str, float]:
    from fluxmusic.latent import patchify
    from fluxmusic.pipeline import noise_for

    geo = index.geometry
    ids = pipe.encoders.tokenize_t5([PROMPT])
    cids, cmask = pipe.encoders.tokenize_clap([PROMPT])
    cond = pipe.encode_text([PROMPT])
    frames = geo.max_latent_frames
    gh, gw = geo.grid(frames)
    x = patchify(noise_for(0, (geo.latent_channels, frames, geo.latent_width))[None])
    x2, t2 = torch.cat((x, x)), torch.ones(2)
    txt2, y2 = torch.cat((cond.txt, pipe.null.txt)), torch.cat((cond.y, pipe.null.y))
    rope = be.rope(txt2.shape[1], gh, gw)
    latent = torch.randn(1, geo.latent_channels, frames, geo.latent_width)
    mel = be.vae_decode(latent)
    r = {
        "t5": timeit(lambda: be.t5_encode(ids), repeats, warmup),
        "clap": timeit(lambda: be.clap_encode(cids, cmask), repeats, warmup),
        "transformer (CFG batch 2)": timeit(lambda: be.velocity(x2, t2, txt2, y2, rope), repeats, warmup),
        "vae_decoder": timeit(lambda: be.vae_decode(latent), repeats, warmup),
        "vocoder": timeit(lambda: be.vocode(mel), repeats, warmup),
    }
    request = pipe.request(PROMPT, seed=0, steps=steps or None)  # the model's settings, resolved once
    gen = timeit(lambda: pipe.generate(request), max(1, repeats // 2), 0)
    st = request.settings
    r[f"generation RTF ({st.solver} {st.steps} steps, {geo.max_duration:g} s)"] = gen / geo.max_duration
    return r


# --------------------------------------------------------------------------------------- named config
def bench_config(
    config_name: str, backends, repeats: int, warmup: int, steps: int, threads: int = 0, batch: int = 2
) -> dict:
    from fluxmusic.export.onnx_export import TransformerGraph, export_graph
    from fluxmusic.export.quantize import quantize_file
    from fluxmusic.export.spec import component_specs
    from fluxmusic.runtime.onnx_backend import OrtGraph, session_options

    from fluxmusic.config import get_config
    from fluxmusic.latent import LatentGeometry
    from fluxmusic.model import FluxMusicTransformer

    cfg = get_config(config_name)
    geo = LatentGeometry()
    t5_width, clap_width, txt_len = cfg.context_in_dim, cfg.vec_in_dim, 256
    torch.manual_seed(0)
    _say(f"{config_name}: building a random-weight transformer")
    model = FluxMusicTransformer(cfg).eval()
    frames = geo.max_latent_frames
    gh, gw = geo.grid(frames)
    inputs = {
        "x": torch.randn(batch, gh * gw, cfg.in_channels),
        "t": torch.rand(batch),
        "txt": torch.randn(batch, txt_len, t5_width),
        "y": torch.randn(batch, clap_width),
    }
    rope = model.rope_for(txt_len, gh, gw)  # torch's cached table; the ONNX graph derives its own from the lengths
    results: dict[str, dict[str, float]] = {}
    label = f"transformer ({config_name}, batch {batch}, {gh * gw}+{txt_len} tokens)"
    with tempfile.TemporaryDirectory(prefix="fluxmusic-bench-") as tmp:
        spec = component_specs(cfg, geo, t5_width, clap_width)["transformer"]
        paths = {}
        if any(b.startswith("onnx") for b in backends):
            _say(f"{config_name}: exporting the transformer to ONNX")
            paths["onnx"] = Path(tmp) / "transformer.onnx"
            export_graph(TransformerGraph(model, gw), spec, inputs, paths["onnx"], 18, {})
            if "onnx-int8" in backends:
                _say(f"{config_name}: int8 dynamic quantisation")
                paths["onnx-int8"] = quantize_file(paths["onnx"], Path(tmp) / "transformer.int8.onnx")
        for name in backends:
            _say(f"{config_name}: {name}")
            if name in ("torch", "torch-bf16"):
                ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "torch-bf16" else None

                def run(ctx=ctx):
                    with torch.no_grad():
                        if ctx is None:
                            return model(**inputs, rope=rope)
                        with ctx():
                            return model(**inputs, rope=rope)
            else:
                g = OrtGraph(
                    paths[name],
                    spec,
                    ["CPUExecutionProvider"],
                    session_options(intra_op_threads=threads),
                    torch.device("cpu"),
                )

                def run(g=g):
                    return g.run(tuple(inputs["x"].shape), **inputs)

            sec = timeit(run, repeats, warmup)
            results[name] = {
                label: sec,
                f"projected RTF ({steps} steps, transformer only)": sec * steps / geo.max_duration,
            }
            run = None
    return results


# ------------------------------------------------------------------------------------------- reporting
def table(results: dict[str, dict[str, float]], title: str) -> str:
    names = list(results)
    rows = list(next(iter(results.values())))
    ref = results.get("torch")
    head = f"| {title} | " + " | ".join(names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = []
        for n in names:
            v = results[n].get(row)
            if v is None:
                cells.append("")
                continue
            is_rtf = "RTF" in row
            val = f"{v:.3f}" if is_rtf else f"{v * 1e3:.1f} ms"
            if ref is not None and n != "torch" and ref.get(row):
                val += f" ({ref[row] / v:.2f}x)"
            cells.append(val)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="latency and real-time factor of torch / onnxruntime backends, side by side")
    b.add_argument("--model", help="model directory (default: the bundled default model, if installed)")
    b.add_argument("--no-model", action="store_true", help="skip the model-directory benchmark")
    b.add_argument("--config", nargs="*", default=[], help="named transformer configs at real shapes, e.g. small")
    b.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    b.add_argument("--onnx-dir", help="an existing ONNX export of --model (default: export to a temporary dir)")
    b.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median; default 3)")
    b.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    b.add_argument("--steps", type=int, help="solver steps (model dir: its default; configs: 50)")
    b.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    b.add_argument("--json", help="also write the results as JSON")
    b.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from fluxmusic.pipeline import default_model_dir

    if args.repeats < 1 or args.warmup < 0:
        raise FluxMusicError(f"--repeats {args.repeats} must be >= 1 and --warmup {args.warmup} >= 0")
    if "torch" not in args.backends:
        raise FluxMusicError("--backends must include torch (every ratio is to torch fp32)")
    out: dict[str, dict] = {}
    tables = []
    torch_threads = torch.get_num_threads()
    print(f"# fluxmusic bench: {torch_threads} torch threads, repeats {args.repeats}, warmup {args.warmup}")
    if not args.no_model:
        model_dir = Path(args.model) if args.model else default_model_dir()
        res = bench_model_dir(
            model_dir,
            args.backends,
            args.repeats,
            args.warmup,
            args.steps,
            Path(args.onnx_dir) if args.onnx_dir else None,
            args.threads,
        )
        out[str(model_dir)] = res
        tables.append(table(res, f"{model_dir.name} (model dir)"))
        print(tables[-1] + "\n", flush=True)
    for name in args.config:
        res = bench_config(name, args.backends, args.repeats, args.warmup, args.steps or 50, args.threads)
        out[name] = res
        tables.append(table(res, f"{name} config"))
        print(tables[-1] + "\n", flush=True)
    if args.json:
        from fluxmusic.checkpoint import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0
