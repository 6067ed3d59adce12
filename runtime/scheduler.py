"""Dynamic batching: one worker thread groups queued requests into batched CFG solves.

Requests whose resolved settings share a batch key (steps, solver, shift, guidance interval, step cache,
latent length) can run in one ``pipeline.generate`` call; their
prompts, negative prompts, guidance, seeds and durations may all differ. The oldest queued request decides
the next batch: it starts when its compatible requests fill ``max_batch`` waveforms or when it has waited
``max_delay`` seconds, whichever comes first (so no request waits longer than ``max_delay`` for company).

Cancellation and deadlines. A queued request that is cancelled or expires leaves the queue at once. A
running one is finished (CANCELLED / DEADLINE_EXCEEDED) at the next solver step and its caller released,
but its row keeps being solved with the rest of the batch and is dropped at the end: the other requests
then stay bit-identical to an undisturbed run, and re-planning would throw away the steps they have done.
Only when every request of a batch is gone does the solve stop, at the next step, freeing the worker.

Failures. An exception in a batched solve is isolated by solving each of its requests alone, so one bad
request fails only itself (its survivors then equal a solo run, which is within float noise of the batch).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from fluxmusic.runtime.metrics import Metrics
from fluxmusic.runtime.validation import RequestSpec

from fluxmusic.errors import FluxMusicError

log = logging.getLogger("fluxmusic.serve")

#: (step, total steps, monotonic time of the step)
ProgressHook = Callable[[int, int, float], None]


class QueueFull(Exception):
    """The bounded queue is full (answered RESOURCE_EXHAUSTED)."""


class ShuttingDown(Exception):
    """The scheduler no longer takes work (answered UNAVAILABLE)."""


class _Abandoned(Exception):
    """Raised inside the progress callback when every request of the batch is gone: stops the solve."""


@dataclass(eq=False)  # identity semantics: jobs are removed from the queue by identity, never by value
class Job:
    """One request moving through the scheduler. ``code`` is a gRPC status code name once ``done`` is set."""

    spec: RequestSpec
    deadline: float | None = None  # time.monotonic() seconds
    on_progress: ProgressHook | None = None
    on_done: Callable[[], None] | None = None
    request_id: str = ""
    received: float = field(default_factory=time.monotonic)
    enqueued: float = 0.0
    admitted: bool = False  # counted in in_flight
    done: threading.Event = field(default_factory=threading.Event)
    code: str | None = None
    message: str = ""
    audio: list[np.ndarray] = field(default_factory=list)
    sample_rate: int = 0
    batch_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    kept_snr_db: list[float] = field(default_factory=list)
    cfg_evaluations: float = 0.0  # per waveform (GenerationResult.cfg_evaluations)
    #: long form: called with each finished window (a :class:`fluxmusic.pipeline.StreamChunk`), in order
    on_chunk: Callable[[object], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int:
        return len(self.spec.items)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def finish(self, code: str, message: str = "", audio: list[np.ndarray] | None = None) -> bool:
        """Set the outcome once; later calls (a cancel racing a result) are ignored. True if this call won."""
        with self._lock:
            if self.done.is_set():
                return False
            self.code, self.message, self.audio = code, message, audio or []
            self.done.set()
        if self.on_done is not None:
            self.on_done()
        return True


class BatchScheduler:
    """A bounded FIFO of :class:`Job` and the worker thread that batches and solves them."""

    def __init__(self, pipe, max_batch: int = 8, max_delay: float = 0.01, max_queue: int = 64,
                 metrics: Metrics | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay < 0:
            raise FluxMusicError(
                f"need max_batch >= 1, max_queue >= 1, max_delay >= 0; got {max_batch}, {max_queue}, {max_delay}"
            )
        self.pipe = pipe
        self.max_batch, self.max_delay, self.max_queue = max_batch, max_delay, max_queue
        self.metrics = metrics or Metrics()
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fluxmusic-scheduler", daemon=True)

    # ------------------------------------------------------------------------------------ public
    def start(self) -> BatchScheduler:
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull / ShuttingDown without queueing it."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
            job.enqueued, job.admitted = time.monotonic(), True
            self._pending.append(job)
            self.metrics.in_flight.inc()
            self._set_depth()
            self._cond.notify()

    def cancel(self, job: Job, code: str = "CANCELLED", message: str = "cancelled by the client") -> None:
        """Finish a job early. Queued: it leaves the queue now. Running: its row is dropped (see module doc)."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self._set_depth()
        self._finish(job, code, message)

    def stop(self, timeout: float | None = None) -> None:
        """Take no new jobs, finish the queued ones, and join the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------------------------ worker
    def _set_depth(self) -> None:
        self.metrics.queue_depth.set(len(self._pending))

    def _finish(self, job: Job, code: str, message: str = "", audio: list[np.ndarray] | None = None) -> None:
        if job.finish(code, message, audio) and job.admitted:
            self.metrics.in_flight.dec()

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as e:  # a bug here must not kill the worker and hang every later request
                log.exception("scheduler error")
                for job in batch:
                    self._finish(job, "INTERNAL", f"scheduler error: {type(e).__name__}: {e}")

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                for job in [j for j in self._pending if j.done.is_set() or j.expired(now)]:
                    self._pending.remove(job)
                    self._finish(job, "DEADLINE_EXCEEDED", "the deadline passed while queued")
                if not self._pending:
                    self._set_depth()
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                head = self._pending[0]
                same = [j for j in self._pending if j.spec.batch_key == head.spec.batch_key]
                wait = head.enqueued + self.max_delay - now
                if sum(j.size for j in same) >= self.max_batch or wait <= 0 or self._stopping:
                    break
                self._cond.wait(wait)
            # FIFO within the key; the head always goes (a request larger than max_batch runs alone).
            chosen, total = [], 0
            for job in same:
                if chosen and total + job.size > self.max_batch:
                    continue
                chosen.append(job)
                total += job.size
            for job in chosen:
                self._pending.remove(job)
            self._set_depth()
            return chosen

    def _run(self, jobs: list[Job]) -> None:
        start = time.monotonic()
        live = []
        for job in jobs:
            if job.done.is_set():
                continue
            if job.expired(start):
                self._finish(job, "DEADLINE_EXCEEDED", "the deadline passed while queued")
                continue
            job.timings["queue_ms"] = 1e3 * (start - job.enqueued)
            self.metrics.queue_seconds.observe(start - job.enqueued)
            live.append(job)
        if live:
            self._solve(live)

    def _solve(self, jobs: list[Job]) -> None:
        request = jobs[0].spec.request.merged([job.spec.request for job in jobs[1:]])
        size = len(request.items)

        def progress(step: int, total: int) -> None:
            now = time.monotonic()
            self.metrics.solver_steps.inc()
            alive = False
            for job in jobs:
                if not job.done.is_set() and job.expired(now):
                    self._finish(job, "DEADLINE_EXCEEDED", f"the deadline passed at step {step}/{total}")
                if job.done.is_set():
                    continue
                alive = True
                if job.on_progress is not None:
                    job.on_progress(step, total, now)
            if not alive:
                raise _Abandoned

        self.metrics.batches.inc()
        self.metrics.batch_size.observe(size)
        self.metrics.waveforms.inc(size)
        try:
            if request.long_form is not None:  # never batched (its own batch key): one job, window by window
                result = self._solve_windows(jobs[0], request, progress)
            else:
                result = self.pipe.generate(request, progress)
        except _Abandoned:
            log.info(json.dumps({"event": "batch_abandoned", "requests": [j.request_id for j in jobs]}))
            return None
        except Exception as e:
            return self._isolate(jobs, e)
        self.metrics.sampling_seconds.observe(result.timings["sampling"])
        timings = {f"{k}_ms": 1e3 * v for k, v in result.timings.items()}
        offset = 0
        for job in jobs:
            audio = result.audio[offset : offset + job.size]
            offset += job.size
            job.sample_rate, job.batch_size = result.sample_rate, size
            job.timings.update(timings)
            job.kept_snr_db = list(result.kept_snr_db or [])  # requests with given audio are never batched
            job.cfg_evaluations = result.cfg_evaluations
            self._finish(job, "OK", audio=audio)
        return None

    def _solve_windows(self, job: Job, request, progress):
        """A long-form request through the pipeline's window stream, handing each window to the job's
        ``on_chunk`` as it is finished; returns the joined result (the pipeline joins it, so its counts, e.g.
        ``cfg_evaluations``, are the non-streaming path's)."""

        def on_chunk(chunk) -> None:
            if job.on_chunk is not None and not job.done.is_set():
                job.on_chunk(chunk)

        return self.pipe.generate(request, progress, on_chunk=on_chunk)

    def _isolate(self, jobs: list[Job], error: Exception) -> None:
        live = [j for j in jobs if not j.done.is_set()]
        if len(live) > 1:
            log.warning(json.dumps({"event": "batch_failed", "error": f"{type(error).__name__}: {error}",
                                    "requests": [j.request_id for j in live], "action": "retrying each alone"}))
            for job in live:
                self._solve([job])
        elif live:
            job = live[0]
            if isinstance(error, FluxMusicError):
                self._finish(job, "INVALID_ARGUMENT", str(error))
            else:
                log.error(f"request {job.request_id} failed", exc_info=error)
                self._finish(job, "INTERNAL", f"generation failed: {type(error).__name__}: {error}")
