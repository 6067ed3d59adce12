"""Assemble and run the gRPC server: FluxMusic service, health, reflection, limits, TLS, auth, metrics."""

from __future__ import annotations

import json
import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from fluxmusic.runtime.metrics import Metrics
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2 as pb2
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2_grpc as pb2_grpc
from fluxmusic.runtime.scheduler import BatchScheduler
from fluxmusic.runtime.service import BearerTokenInterceptor, FluxMusicService, build_model_info
from fluxmusic.runtime.validation import Limits
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fluxmusic.errors import FluxMusicError

log = logging.getLogger("fluxmusic.serve")
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["FluxMusicService"].full_name


@dataclass
class ServerConfig:
    """Options of ``fluxmusic serve``. Binds loopback unless ``host`` says otherwise; port 0 picks a free one."""

    host: str = "127.0.0.1"
    port: int = 50051
    max_batch: int = 8
    max_delay_ms: float = 10.0
    max_queue: int = 64
    max_steps: int = 1000
    max_waveforms: int = 8
    grace_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None
    metrics_port: int | None = None

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_steps", "max_waveforms"):
            if getattr(self, name) < 1:
                raise FluxMusicError(f"{name} {getattr(self, name)} must be >= 1")
        if self.max_delay_ms < 0 or self.grace_s < 0:
            raise FluxMusicError(f"max_delay_ms {self.max_delay_ms} and grace {self.grace_s} must be >= 0")
        if not 0 <= self.port <= 65535:
            raise FluxMusicError(f"port {self.port} must be in [0, 65535]")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise FluxMusicError("TLS needs both --tls-cert and --tls-key")
        if self.token is not None and not self.token.strip():
            raise FluxMusicError("token must be a non-empty string")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FluxMusicError(f"cannot read {what} {path!r}: {e.strerror}") from e


class FluxMusicServer:
    """A running server around one pipeline.

    >>> with FluxMusicServer(pipe, ServerConfig(port=0)).start() as server:
    ...     print(server.target)
    """

    def __init__(self, pipe, config: ServerConfig | None = None) -> None:
        self.pipe = pipe
        self.config = config = config or ServerConfig()
        config.check()
        self.limits = Limits(
            max_duration=pipe.geometry.max_duration, sample_rate=pipe.sample_rate,
            max_steps=config.max_steps, max_waveforms=config.max_waveforms,
        )
        self.metrics = Metrics()
        self.scheduler = BatchScheduler(
            pipe, config.max_batch, config.max_delay_ms / 1e3, config.max_queue, self.metrics
        )
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.Server | None = None
        self._http = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    def start(self) -> FluxMusicServer:
        c = self.config
        # Every waiting request holds a handler thread; beyond the pool gRPC itself answers RESOURCE_EXHAUSTED.
        workers = c.max_queue + c.max_batch + 8
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fluxmusic-rpc"),
            interceptors=[BearerTokenInterceptor(c.token)] if c.token else [],
            options=[
                ("grpc.max_send_message_length", self.limits.max_response_bytes),
                ("grpc.max_receive_message_length", self.limits.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=workers,
        )
        model_info = build_model_info(self.pipe, self.limits, c.max_batch, c.max_delay_ms, c.max_queue)
        pb2_grpc.add_FluxMusicServiceServicer_to_server(
            FluxMusicService(self.pipe, self.scheduler, self.limits, self.metrics, model_info), self._grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        address = f"{c.host}:{c.port}"
        try:
            if c.tls_cert:
                creds = grpc.ssl_server_credentials([(_read(c.tls_key, "TLS key"), _read(c.tls_cert, "TLS cert"))])
                self.port = self._grpc.add_secure_port(address, creds)
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:
            raise FluxMusicError(f"cannot listen on {address}: {e}") from e
        if not self.port:
            raise FluxMusicError(f"cannot listen on {address} (in use, or not a local address?)")
        self.scheduler.start()
        self._grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if c.metrics_port is not None:
            from prometheus_client import start_http_server

            self._http, _ = start_http_server(c.metrics_port, addr=c.host, registry=self.metrics.registry)
            self.metrics_port = self._http.server_port
        log.info(json.dumps({
            "event": "serving", "target": self.target, "tls": bool(c.tls_cert), "auth": bool(c.token),
            "backend": model_info.backend, "model": model_info.name, "max_batch": c.max_batch,
            "max_delay_ms": c.max_delay_ms, "max_queue": c.max_queue, "metrics_port": self.metrics_port,
        }))
        return self

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: report NOT_SERVING, refuse new calls, let in-flight ones finish for ``grace``
        seconds (then cancel them), drain the scheduler, and close the metrics endpoint. Idempotent."""
        if self._stopping.is_set() or self._grpc is None:
            return
        self._stopping.set()
        grace = self.config.grace_s if grace is None else grace
        log.info(json.dumps({"event": "shutdown", "grace_s": grace, "queued": self.scheduler.queue_depth}))
        self.health.enter_graceful_shutdown()
        self._grpc.stop(grace).wait()
        self.scheduler.stop(timeout=grace + 5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        log.info(json.dumps({"event": "stopped"}))
        self._stopped.set()

    def wait(self) -> None:
        """Block until :meth:`stop` (e.g. from a signal handler) has finished."""
        while not self._stopped.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass

    def __enter__(self) -> FluxMusicServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


def serve_forever(server: FluxMusicServer) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (a second signal does not cut the grace short;
    the process manager's kill does)."""
    done = threading.Event()

    def on_signal(signum, frame) -> None:
        if not done.is_set():
            done.set()
            threading.Thread(target=server.stop, name="fluxmusic-shutdown").start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while not done.wait(0.5):
        pass
    server.wait()
