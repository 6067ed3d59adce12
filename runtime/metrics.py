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
