"""Server metrics in a private prometheus-client registry: the one source for GetStats and /metrics."""

from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Latency buckets in seconds: generation takes from tens of milliseconds (tiny models) to minutes (CPU, full size).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, math.inf)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, math.inf)


class Metrics:
    """Counters, gauges and histograms of one server (a registry per server, so several can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.started = time.monotonic()
        self.requests = Counter(
            "fluxmusic_requests", "Generation requests by method and final status code", ["method", "code"], registry=r
        )
        self.batches = Counter("fluxmusic_batches", "Batched solves run", registry=r)
        self.waveforms = Counter("fluxmusic_waveforms", "Waveforms solved (including dropped rows)", registry=r)
        self.solver_steps = Counter("fluxmusic_solver_steps", "Solver steps run (one per batch per step)", registry=r)
        self.queue_depth = Gauge("fluxmusic_queue_depth", "Requests waiting for a batch", registry=r)
        self.in_flight = Gauge("fluxmusic_in_flight", "Requests admitted and not finished", registry=r)
        self.queue_seconds = Histogram(
            "fluxmusic_queue_seconds", "Admission to batch start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.sampling_seconds = Histogram(
            "fluxmusic_sampling_seconds", "Batched CFG solve", buckets=LATENCY_BUCKETS, registry=r
        )
        self.request_seconds = Histogram(
            "fluxmusic_request_seconds", "Request received to response ready", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "fluxmusic_batch_size", "Waveforms per batched solve", buckets=BATCH_BUCKETS, registry=r
        )

    def stats(self, pb2) -> object:
        """A ``fluxmusic.v1.GetStatsResponse`` message built from the registry's current samples."""
        out = pb2.GetStatsResponse(uptime_seconds=time.monotonic() - self.started)
        for family in self.registry.collect():
            samples = family.samples
            if family.name == "fluxmusic_requests":
                for s in samples:
                    if s.name.endswith("_total"):
                        out.requests[s.labels["code"]] = out.requests[s.labels["code"]] + int(s.value)
            elif family.type == "counter":
                total = sum(s.value for s in samples if s.name.endswith("_total"))
                field = family.name.removeprefix("fluxmusic_")
                setattr(out, field, int(total))
            elif family.type == "gauge":
                setattr(out, family.name.removeprefix("fluxmusic_"), int(samples[0].value))
            elif family.type == "histogram":
                h = out.histograms.add(name=family.name.removeprefix("fluxmusic_"))
                for s in samples:
                    if s.name.endswith("_bucket"):
                        h.upper_bounds.append(float(s.labels["le"]))
                        h.cumulative_counts.append(int(s.value))
                    elif s.name.endswith("_sum"):
                        h.sum = s.value
                    elif s.name.endswith("_count"):
                        h.count = int(s.value)
        return out


class MetricsHTTPServer:
    """``GET /metrics`` in the Prometheus text format, with the server's bearer token and TLS when it has them.

    Bound to loopback unless told otherwise (issue 17, item 11): the counters reveal load and request
    outcomes, so they get the same protection as the gRPC port. Bind errors surface in the constructor, so the
    caller can check the port before starting gRPC.
    """

    def __init__(self, registry, host: str, port: int, token: str | None = None,
                 tls: tuple[str, str] | None = None) -> None:
        import hmac
        import socket
        import ssl
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        expected = None if token is None else f"Bearer {token}".encode()
        context = None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls[0], tls[1])

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stalled client costs one thread for at most this long

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if urlsplit(self.path).path not in ("/metrics", "/"):
                    self._reply(404, b"not found\n", "text/plain")
                elif expected is not None and not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), expected
                ):
                    self._reply(401, b"missing or invalid bearer token\n", "text/plain",
                                [("WWW-Authenticate", 'Bearer realm="fluxmusic-metrics"')])
                else:
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)

            def _reply(self, code: int, body: bytes, ctype: str, extra=()) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args) -> None:  # scrapes are not worth a log line each
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def finish_request(self, request, client_address) -> None:
                if context is not None:
                    # The TLS handshake runs here, in the connection's own thread, not in the accept loop,
                    # so one slow client cannot stall the others.
                    request.settimeout(Handler.timeout)
                    request = context.wrap_socket(request, server_side=True)
                super().finish_request(request, client_address)

            def handle_error(self, request, client_address) -> None:  # failed handshakes, resets: not ours
                pass

        self.httpd = Server((host.strip("[]"), port), Handler)
        self.port: int = self.httpd.server_address[1]
        self.scheme = "https" if context is not None else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fluxmusic-metrics", daemon=True)

    def start(self) -> MetricsHTTPServer:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
