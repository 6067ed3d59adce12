"""``fluxmusic serve``, ``fluxmusic client ...`` and ``fluxmusic loadtest``.

gRPC is imported only when a command runs, so the rest of the CLI works without the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from fluxmusic.errors import FluxMusicError
from fluxmusic.tempfiles import publish
from fluxmusic.threads import add_threads_argument

TOKEN_ENV = "FLUXMUSIC_TOKEN"


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of the server (default 127.0.0.1:50051)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--tls-ca", help="PEM file of the CA (or self-signed cert) to trust; implies --tls")
    p.add_argument("--timeout", type=float, help="deadline per request, seconds")


def _request_args(p: argparse.ArgumentParser) -> None:
    from fluxmusic.commands_generate import add_audio_arguments, add_media_arguments, add_sampling_arguments

    p.add_argument("--duration", type=float, help="seconds (default: the model's window; up to 300: long form)")
    add_sampling_arguments(p)
    add_audio_arguments(p)
    add_media_arguments(p)


def _wire_options(args: argparse.Namespace) -> dict:
    """Sampling options for ``client.build_request`` (the server resolves and validates them)."""
    from fluxmusic.commands_generate import audio_kwargs, media_kwargs, sampling_kwargs
    from fluxmusic.sampling import invalid

    kw = {**sampling_kwargs(args), **audio_kwargs(args), **media_kwargs(args)}  # files are sent as their bytes
    if isinstance(kw["shift"], str):
        if kw["shift"].lower() != "none":
            raise invalid("shift", kw["shift"], "a number, or 'none' (= 1: no shift)")
        kw["shift"] = 1.0  # on the wire, "no shift" is shift 1
    return {"duration": args.duration, **kw}


def register(sub: argparse._SubParsersAction) -> None:
    from fluxmusic.backend import BACKENDS, DTYPE_CHOICES

    s = sub.add_parser("serve", help="serve the model over gRPC with dynamic batching")
    s.add_argument("--model", help="model directory (default: the bundled default model)")
    s.add_argument("--backend", default="torch", choices=sorted(BACKENDS))
    s.add_argument("--onnx-dir", help="exported ONNX directory (onnx backend)")
    s.add_argument("--engine-dir", help="TensorRT engine directory (tensorrt backend)")
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    s.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="transformer and encoder dtype (auto: bf16 where the device has it natively, else float32)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback; 0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=50051, help="port (0 picks a free one)")
    s.add_argument("--max-batch", type=int, default=8, help="waveforms per batched solve (1 = no batching)")
    s.add_argument("--max-delay-ms", type=float, default=10.0, help="longest wait for a batch to fill")
    s.add_argument("--max-queue", type=int, default=64, help="queued requests beyond this get RESOURCE_EXHAUSTED")
    s.add_argument("--max-steps", type=int, default=1000, help="largest steps a request may ask for")
    s.add_argument("--max-waveforms", type=int, default=8, help="largest num_waveforms of one request")
    s.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get at shutdown")
    s.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key: serve TLS only)")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"require 'authorization: Bearer TOKEN' (default: ${TOKEN_ENV}; prefer it over argv)")
    s.add_argument("--metrics-port", type=int,
                   help="serve Prometheus text on http(s)://METRICS_HOST:PORT/metrics (with the token and TLS "
                        "of the gRPC port, when set)")
    s.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the metrics endpoint (default loopback, whatever --host is)")
    s.add_argument("--allow-external-links", dest="serve_allow_external_links", action="store_true",
                   help="load a model directory whose symlinks point outside it (refused by default)")
    add_threads_argument(s)
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (torch backend): faster per step once built; the warm-up "
                        "builds it for one full-window request at the model's defaults, other batch sizes and "
                        "durations build on first use (tens of seconds each)")
    s.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation at start")
    s.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    s.set_defaults(func=_serve)

    c = sub.add_parser("client", help="talk to a fluxmusic server")
    csub = c.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    g = csub.add_parser("generate", help="generate music on the server and write it to a file")
    g.add_argument("prompt", nargs="?", default="", help="the text prompt (may be empty with --image / --story)")
    g.add_argument("-o", "--output", required=True, help="output .wav/.flac/.ogg; several waveforms get _00, ...")
    _connection_args(g)
    _request_args(g)
    g.add_argument("--seed", type=int, help="seed (default: random, chosen by the server and printed)")
    g.add_argument("--num-waveforms", type=int, default=1)
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_client_generate)
    for name, helptext in (("info", "print the model info"), ("stats", "print the server's statistics"),
                           ("health", "print the health status")):
        a = csub.add_parser(name, help=helptext)
        _connection_args(a)
        a.set_defaults(func=_client_info, client_command=name)

    lt = sub.add_parser("loadtest", help="load-test a server: throughput, latency percentiles, errors")
    _connection_args(lt)
    _request_args(lt)
    lt.add_argument("--concurrency", type=int, default=4, help="client threads")
    lt.add_argument("--requests", type=int, default=32, help="requests in total")
    lt.add_argument("--encoding", default="wav", choices=("wav", "flac", "pcm_f32le"))
    lt.add_argument("--json", action="store_true", help="print the report as JSON")
    lt.set_defaults(func=_loadtest)


# ---------------------------------------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    import torch
    from fluxmusic.runtime.server import FluxMusicServer, ServerConfig, serve_forever

    from fluxmusic.pipeline import FluxMusicPipeline

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = ServerConfig(
        host=args.host, port=args.port, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
        max_queue=args.max_queue, max_steps=args.max_steps, max_waveforms=args.max_waveforms, grace_s=args.grace,
        tls_cert=args.tls_cert, tls_key=args.tls_key, token=args.token, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    config.preflight()  # TLS files, free ports: before the (slow) model load
    if args.serve_allow_external_links:
        from fluxmusic.modelcheck import ALLOW_LINKS_ENV

        os.environ[ALLOW_LINKS_ENV] = "1"
    options = {k: v for k, v in (("onnx_dir", args.onnx_dir), ("engine_dir", args.engine_dir)) if v}
    if args.compile:
        if args.backend != "torch" or options:
            raise FluxMusicError("--compile applies to the torch backend; it cannot combine with --backend "
                                 f"{args.backend}, --onnx-dir or --engine-dir")
        options["compile"] = True
    # One OpenMP team in the process: the scheduler thread runs every solve, so this thread loads and warms up
    # with one torch thread and never makes a team of its own. libgomp counts the workers of every thread's team,
    # and once they outnumber the cores it cuts its spin-wait to ~1000 iterations: every parallel region then
    # sleeps and wakes its workers (a generation of the bundled default served in 0.44 s instead of 0.31 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = FluxMusicPipeline.from_pretrained(args.model, args.device, args.dtype, args.backend, **options)
    if not args.no_warmup:
        # The first call pays one-off costs (allocator, kernel selection); keep them off the first request. A
        # compiled transformer builds per input shape: warm up on the most common request, one full window at
        # the model's defaults.
        t0 = time.perf_counter()
        if args.compile:
            pipe("music", seed=0)
        else:
            pipe("music", steps=1, duration=min(1.0, pipe.geometry.max_duration), seed=0)
        logging.getLogger("fluxmusic.serve").info("warm-up took %.1f s", time.perf_counter() - t0)
    torch.set_num_threads(threads)  # what the scheduler thread's team takes when it first runs an op
    server = FluxMusicServer(pipe, config).start()
    metrics = f", metrics on {server.metrics_url}" if server.metrics_port else ""
    print(f"serving on {server.target}{metrics}", file=sys.stderr, flush=True)
    serve_forever(server)
    return 0


# ---------------------------------------------------------------------------------------------------- client
def _client(args: argparse.Namespace):
    from fluxmusic.runtime.client import FluxMusicClient

    return FluxMusicClient(args.server, token=args.token, tls=args.tls, tls_ca=args.tls_ca)


def _rpc_failure(e) -> int:
    print(f"fluxmusic: server error {e.code().name}: {e.details()}", file=sys.stderr)
    return 1


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over, so no half-written file is left."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _client_generate(args: argparse.Namespace) -> int:
    import grpc

    from fluxmusic.audio import write_audio
    from fluxmusic.commands_generate import output_paths

    paths = output_paths(args.output, max(args.num_waveforms, 1))
    suffix = paths[0].suffix.lower()
    encoding = {".wav": "wav", ".flac": "flac"}.get(suffix, "pcm_f32le")  # others: encode here from float32
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="step", file=sys.stderr, desc="sampling")

    def progress(step: int, total: int, elapsed_ms: float) -> None:
        if bar is not None:
            bar.total = total
            bar.update(step - bar.n)

    request = dict(_wire_options(args), seed=args.seed, num_waveforms=args.num_waveforms, encoding=encoding)
    try:
        with _client(args) as client:
            out = client.generate_stream(args.prompt, on_progress=progress, timeout=args.timeout, **request)
    except grpc.RpcError as e:
        return _rpc_failure(e)
    finally:
        if bar is not None:
            bar.close()
    for path, data, wave, seed in zip(paths, out.data, out.audio, out.seeds):
        if encoding == "pcm_f32le":
            write_audio(path, wave, out.sample_rate)
        else:
            write_bytes_atomic(path, data)
        print(f"wrote {path} ({len(wave) / out.sample_rate:.2f} s, {out.sample_rate} Hz, seed {seed}): {args.prompt}")
    t = out.timings
    print(f"server: queue {t.get('queue_ms', 0):.0f} ms, sampling {t.get('sampling_ms', 0):.0f} ms, "
          f"decode {t.get('decode_ms', 0):.0f} ms, total {t.get('total_ms', 0):.0f} ms, batch {out.batch_size}",
          file=sys.stderr)
    return 0


def _client_info(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    try:
        with _client(args) as client:
            if args.client_command == "health":
                print(client.health(timeout=args.timeout or 10.0))
                return 0
            msg = client.model_info() if args.client_command == "info" else client.stats()
    except grpc.RpcError as e:
        return _rpc_failure(e)
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2))
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from fluxmusic.runtime.loadtest import run_loadtest

    request = dict(_wire_options(args), encoding=args.encoding)
    with _client(args) as client:
        try:
            client.wait_ready(timeout=args.timeout or 30.0)
        except Exception as e:
            raise FluxMusicError(f"server {args.server} is not reachable: {type(e).__name__}") from None
        report = run_loadtest(client, args.concurrency, args.requests, timeout=args.timeout, **request)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0 if not report.errors else 1
