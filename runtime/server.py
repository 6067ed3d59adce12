"""Assemble and run the gRPC server: FluxMusic service, health, reflection, limits, TLS, auth, metrics."""

from __future__ import annotations

import errno
import json
import logging
import signal
import socket
import ssl
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from fluxmusic.runtime.guard import DecodeGuardInterceptor
from fluxmusic.runtime.metrics import Metrics, MetricsHTTPServer
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
    metrics_host: str = "127.0.0.1"

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
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise FluxMusicError(f"metrics port {self.metrics_port} must be in [0, 65535]")
        if not self.host.strip() or not self.metrics_host.strip():
            raise FluxMusicError("host and metrics host must be non-empty (127.0.0.1, ::1, 0.0.0.0, a name)")

    def preflight(self) -> None:
        """What can be checked before the (slow) model load and before anything listens: the TLS files parse
        and match, every address of ``host`` and the metrics port are free (issue 17, items 9 and 10)."""
        self.check()
        if self.tls_cert:
            check_tls_files(self.tls_cert, self.tls_key)
        for family, addr in bind_addresses(self.host):
            if self.port:
                _try_bind(family, addr, self.port, f"cannot listen on {self.host}:{self.port}")
        if self.metrics_port:
            for family, addr in bind_addresses(self.metrics_host):
                _try_bind(family, addr, self.metrics_port, f"metrics port {self.metrics_host}:{self.metrics_port}")


def bind_addresses(host: str) -> list[tuple[int, str]]:
    """Every (family, address) ``host`` stands for when a server binds it. gRPC binds "localhost" as both
    127.0.0.1 and ::1 (whatever /etc/hosts says), so we do the same; other names go through getaddrinfo."""
    name = host.strip("[]")
    if name == "localhost":
        out = [(socket.AF_INET, "127.0.0.1")]
        if socket.has_ipv6 and _ipv6_loopback_usable():
            out.append((socket.AF_INET6, "::1"))
        return out
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FluxMusicError(f"host {host!r} does not resolve to an address: {e.strerror}") from None
    seen: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0]) not in seen:
            seen.append((family, sockaddr[0]))
    return seen


def _ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _format(family: int, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"


def _try_bind(family: int, addr: str, port: int, what: str) -> None:
    """Bind and close a socket as the real server will (SO_REUSEADDR, no SO_REUSEPORT): a clear error now
    beats a half-started server later."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            reason = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise FluxMusicError(f"{what}: address {_format(family, addr, port)} {reason}") from None


def check_tls_files(cert: str, key: str | None) -> None:
    """Parse the certificate chain and the private key and check they belong together, with Python's ssl
    (gRPC would only say "Failed to bind" about a garbage key)."""
    _read(cert, "TLS cert")
    _read(key or "", "TLS key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        reason = {"KEY_VALUES_MISMATCH": "the key does not belong to the certificate"}.get(
            e.reason or "", f"not a PEM certificate chain and unencrypted PEM private key ({e.reason or e})"
        )
        raise FluxMusicError(f"TLS cert {cert!r} / key {key!r} cannot be used: {reason}") from None


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

    @property
    def metrics_url(self) -> str | None:
        if self._http is None:
            return None
        host = self.config.metrics_host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{self._http.scheme}://{host}:{self.metrics_port}/metrics"

    def start(self) -> FluxMusicServer:
        c = self.config
        c.preflight()
        # Every waiting request holds a handler thread; beyond the pool gRPC itself answers RESOURCE_EXHAUSTED.
        workers = c.max_queue + c.max_batch + 8
        # Token first: an unauthenticated caller learns nothing, not even whether its bytes decode.
        interceptors = [BearerTokenInterceptor(c.token)] if c.token else []
        interceptors.append(DecodeGuardInterceptor(self._count_undecodable))
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fluxmusic-rpc"),
            interceptors=interceptors,
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
        try:
            self.port = self._bind_all()
            if c.metrics_port is not None:
                # Bound before gRPC starts: a taken port is a clear error, not a traceback after "serving".
                try:
                    self._http = MetricsHTTPServer(
                        self.metrics.registry, c.metrics_host, c.metrics_port, c.token,
                        (c.tls_cert, c.tls_key) if c.tls_cert else None,
                    )
                except OSError as e:
                    raise FluxMusicError(
                        f"metrics port {c.metrics_host}:{c.metrics_port} cannot be bound: {e.strerror or e}"
                    ) from None
                self.metrics_port = self._http.port
        except BaseException:
            self._grpc.stop(None)  # releases whatever was bound; nothing was started
            self._grpc = None
            raise
        self.scheduler.start()
        self._grpc.start()
        if self._http is not None:
            self._http.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(json.dumps({
            "event": "serving", "target": self.target, "tls": bool(c.tls_cert), "auth": bool(c.token),
            "backend": model_info.backend, "model": model_info.name, "max_batch": c.max_batch,
            "max_delay_ms": c.max_delay_ms, "max_queue": c.max_queue, "metrics_port": self.metrics_port,
            "metrics_host": c.metrics_host if self._http is not None else None,
        }))
        return self

    def _bind_all(self) -> int:
        """Bind every address ``host`` stands for, on one port, or fail. gRPC's own "localhost:P" succeeds when
        any one of 127.0.0.1 and ::1 binds (issue 17, item 9: another server held 127.0.0.1:P, we served on
        [::1] only), so each address is bound and checked on its own."""
        c = self.config
        creds = None
        if c.tls_cert:
            creds = grpc.ssl_server_credentials([(_read(c.tls_key, "TLS key"), _read(c.tls_cert, "TLS cert"))])
        port = c.port
        for family, addr in bind_addresses(c.host):
            address = _format(family, addr, port)
            try:
                got = self._grpc.add_secure_port(address, creds) if creds else self._grpc.add_insecure_port(address)
            except RuntimeError as e:
                got, reason = 0, str(e)
            else:
                reason = "in use, or not a local address"
            if not got:
                raise FluxMusicError(f"cannot listen on {c.host}:{c.port}: address {address} failed ({reason})")
            port = got  # port 0: the first address picks, the others must take the same one
        return port

    def _count_undecodable(self, method: str) -> None:
        name = method.rsplit("/", 1)[-1]
        if method.startswith(f"/{SERVICE_NAME}/") and name.startswith("Generate"):
            self.metrics.requests.labels(name, grpc.StatusCode.INVALID_ARGUMENT.name).inc()

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
            self._http.close()
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
