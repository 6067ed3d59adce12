"""Closed-loop load test: C client threads send N requests in total; throughput, latency percentiles, errors."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
from fluxmusic.runtime.client import FluxMusicClient

from fluxmusic.errors import FluxMusicError

DEFAULT_PROMPTS = (
    "a slow calm piano melody",
    "fast happy drums and bass",
    "a dark synth pad with a low rhythm",
    "a bright plucked string melody",
)


@dataclass
class LoadReport:
    concurrency: int
    requests: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)  # of successful requests
    batch_sizes: list[int] = field(default_factory=list)
    #: per request: client latency minus the server's compute for it (text encode + sampling + decode), i.e.
    #: queueing, scheduling, gRPC, audio encoding and client decoding; paired, so machine noise mostly cancels
    overheads_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # status code name -> count

    @property
    def ok(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput(self) -> float:
        """Successful requests per second of wall time."""
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")

    def to_dict(self) -> dict:
        return {
            "concurrency": self.concurrency, "requests": self.requests, "ok": self.ok,
            "errors": dict(self.errors), "wall_s": self.wall_s, "throughput_rps": self.throughput,
            "p50_s": self.percentile(50), "p95_s": self.percentile(95), "p99_s": self.percentile(99),
            "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else 0.0,
            "overhead_p50_s": float(np.median(self.overheads_s)) if self.overheads_s else float("nan"),
        }

    def summary(self) -> str:
        d = self.to_dict()
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"{d['requests']} requests at concurrency {d['concurrency']}: {d['ok']} ok, errors: {errors}\n"
            f"throughput {d['throughput_rps']:.2f} req/s over {d['wall_s']:.2f} s; latency p50 {d['p50_s']:.3f} s, "
            f"p95 {d['p95_s']:.3f} s, p99 {d['p99_s']:.3f} s; mean batch {d['mean_batch']:.2f}"
        )


def run_loadtest(
    client: FluxMusicClient,
    concurrency: int,
    requests: int,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    timeout: float | None = None,
    **request_options,
) -> LoadReport:
    """Send ``requests`` Generate calls from ``concurrency`` threads over one channel (gRPC multiplexes).
    Request i uses prompt i mod len(prompts) and seed i, so runs are reproducible."""
    if concurrency < 1 or requests < 1:
        raise FluxMusicError(f"concurrency {concurrency} and requests {requests} must be >= 1")
    lock = threading.Lock()
    latencies, batches, overheads, errors = [], [], [], Counter()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            out = client.generate(prompts[i % len(prompts)], seed=i, timeout=timeout, **request_options)
        except grpc.RpcError as e:
            with lock:
                errors[e.code().name] += 1
            return
        except FluxMusicError:
            with lock:
                errors["INVALID_ARGUMENT"] += 1
            return
        dt = time.perf_counter() - t0
        compute = sum(out.timings.get(k, 0.0) for k in ("text_encode_ms", "sampling_ms", "decode_ms")) / 1e3
        with lock:
            latencies.append(dt)
            batches.append(out.batch_size)
            overheads.append(dt - compute)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="loadtest") as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return LoadReport(concurrency, requests, wall, latencies_s=latencies, batch_sizes=batches,
                      overheads_s=overheads, errors=dict(errors))
