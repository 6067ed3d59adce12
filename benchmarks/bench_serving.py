"""Serving benchmark, in one run: dynamic batching on vs off at several concurrencies, and gRPC end-to-end
latency vs the in-process pipeline (the overhead of serving).

    python benchmarks/bench_serving.py --model DIR [--steps 4 --duration 2 --threads 2]

Starts ``fluxmusic serve`` as a subprocess on a free loopback port (once with --max-batch 1, once with
--max-batch B), drives it with the load-test client from this process, then times the same request on an
in-process pipeline with the server stopped. Without --model it uses the bundled default model, or, when that
is missing, builds a tiny random model and says so. Prints a markdown table (and JSON with --json-out).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path


def start_server(model: Path, max_batch: int, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "fluxmusic.cli", "serve", "--model", str(model), "--port", "0",
           "--max-batch", str(max_batch), "--max-delay-ms", str(args.max_delay_ms), "--max-queue", "256",
           "--log-level", "WARNING"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # "serving on HOST:PORT" once the model is loaded and warmed up
        lines.append(line)
        m = re.match(r"serving on (\S+?)(,|$)", line.strip())
        if m:
            # Keep draining its log so a full pipe can never block the server.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError("the server did not start:\n" + "".join(lines))


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


_PIPES: dict = {}


def in_process_latency(model: Path, args, request: dict, repeats: int) -> list[float]:
    """Latency of the same requests on a pipeline in this process (loaded and warmed up once)."""
    import torch

    from fluxmusic.pipeline import FluxMusicPipeline

    opts = dict(duration=request.get("duration"), steps=request.get("steps"))
    if model not in _PIPES:
        if args.threads:
            torch.set_num_threads(args.threads)
        _PIPES[model] = FluxMusicPipeline.from_pretrained(model)
        _PIPES[model]("music", seed=0, **opts)  # warm-up, as the server does
    pipe = _PIPES[model]
    from fluxmusic.runtime.loadtest import DEFAULT_PROMPTS

    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pipe(DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)], seed=i, **opts)
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (default: the bundled default, else a tiny random model)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    ap.add_argument("--requests", type=int, default=32, help="requests per (mode, concurrency), over all rounds")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of off/on (and in-process) runs")
    ap.add_argument("--max-batch", type=int, default=16, help="max batch of the batching-on server")
    ap.add_argument("--max-delay-ms", type=float, default=10.0)
    ap.add_argument("--steps", type=int, help="solver steps (default: the model's)")
    ap.add_argument("--duration", type=float, help="seconds (default: the model's maximum)")
    ap.add_argument("--threads", type=int, help="torch threads of the server and the in-process pipeline")
    ap.add_argument("--json-out", help="also write the results here as JSON")
    args = ap.parse_args()

    from fluxmusic.runtime.client import FluxMusicClient
    from fluxmusic.runtime.loadtest import LoadReport, run_loadtest

    from fluxmusic.pipeline import default_model_dir

    tmp = None
    if args.model:
        model, label = Path(args.model), args.model
    elif (default_model_dir() / "model_index.json").is_file():
        model, label = default_model_dir(), "bundled default"
    else:
        from fluxmusic.tiny import build_tiny_model_dir

        tmp = tempfile.TemporaryDirectory()
        model, label = build_tiny_model_dir(Path(tmp.name) / "tiny"), "TINY RANDOM model (bundled default missing)"
    levels = [int(c) for c in args.concurrency.split(",")]
    request = {k: v for k, v in (("steps", args.steps), ("duration", args.duration)) if v is not None}
    print(f"model: {label}; request: {request or 'model defaults'}; {args.requests} requests per level",
          file=sys.stderr)

    # Both servers stay up and are driven in alternation, round after round, so slow drifts of a shared
    # machine's load hit both modes alike; the in-process pipeline is timed in the same rounds.
    servers = {mode: start_server(model, mb, args) for mode, mb in (("off", 1), ("on", args.max_batch))}
    reports: dict[tuple[str, int], list] = {(m, c): [] for m in servers for c in levels}
    local: list[float] = []
    pipe_args = (model, args, request)
    try:
        clients = {mode: FluxMusicClient(target) for mode, (_, target) in servers.items()}
        for c in clients.values():
            c.wait_ready(60)
        per_round = max(1, args.requests // args.rounds)
        for rnd in range(args.rounds):
            for c in levels:
                for mode in ("off", "on"):
                    r = run_loadtest(clients[mode], c, max(per_round, c), encoding="wav", **request)
                    reports[(mode, c)].append(r)
                    print(f"round {rnd} batching {mode:3s} c={c:<3d} {r.summary().splitlines()[1]}", file=sys.stderr)
            local += in_process_latency(*pipe_args, repeats=max(2, per_round // 2))
        for cl in clients.values():
            cl.close()
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    rows = []
    for (mode, c), rs in reports.items():
        merged = LoadReport(
            c, sum(r.requests for r in rs), sum(r.wall_s for r in rs),
            latencies_s=[x for r in rs for x in r.latencies_s], batch_sizes=[x for r in rs for x in r.batch_sizes],
            overheads_s=[x for r in rs for x in r.overheads_s],
            errors=dict(sum((Counter(r.errors) for r in rs), Counter())),
        )
        rows.append({"batching": mode, "max_batch": args.max_batch if mode == "on" else 1, **merged.to_dict()})
    repeats = len(local)
    grpc_c1 = next(r for r in rows if r["batching"] == "off" and r["concurrency"] == 1)
    local_p50 = statistics.median(local)

    print(f"\nModel: {label}. Request: {request or 'model defaults'}; WAV output; "
          f"{args.rounds} alternating rounds; batching on = --max-batch {args.max_batch} "
          f"--max-delay-ms {args.max_delay_ms:g}.\n")
    print("| batching | concurrency | ok / requests | errors | throughput (req/s) | p50 (s) | p95 (s) | p99 (s) "
          "| mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "0"
        print(f"| {r['batching']} | {r['concurrency']} | {r['ok']} / {r['requests']} | {errors} "
              f"| {r['throughput_rps']:.2f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['p99_s']:.3f} "
              f"| {r['mean_batch']:.2f} |")
    print("\n| concurrency | throughput on / off |\n|---|---|")
    for c in levels:
        on = next(r for r in rows if r["batching"] == "on" and r["concurrency"] == c)
        off = next(r for r in rows if r["batching"] == "off" and r["concurrency"] == c)
        print(f"| {c} | {on['throughput_rps'] / off['throughput_rps']:.2f}x |")
    overhead = grpc_c1["p50_s"] - local_p50
    print("\n| path | p50 latency (s) |\n|---|---|")
    print(f"| in-process pipeline (median of {repeats}) | {local_p50:.3f} |")
    print(f"| gRPC end-to-end, concurrency 1, batching off | {grpc_c1['p50_s']:.3f} |")
    print(f"| difference (unpaired, includes machine noise) | {1e3 * overhead:.1f} ms |")
    print(f"| per-request serving overhead, paired: client latency - server compute (median) "
          f"| {1e3 * grpc_c1['overhead_p50_s']:.1f} ms |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"model": label, "request": request, "rows": rows, "in_process_s": local}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
