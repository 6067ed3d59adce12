"""The ``fluxmusic.v1.FluxMusicService`` servicer: validation, admission, streaming, responses, and request logs."""

from __future__ import annotations

import hmac
import json
import logging
import math
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
from fluxmusic.runtime.audio_codec import encode_audio
from fluxmusic.runtime.metrics import Metrics
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2 as pb2
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2_grpc as pb2_grpc
from fluxmusic.runtime.scheduler import BatchScheduler, Job, QueueFull, ShuttingDown
from fluxmusic.runtime.validation import Limits, parse_request

from fluxmusic.errors import FluxMusicError
from fluxmusic.sampling import MAX_SEED

log = logging.getLogger("fluxmusic.serve")
ENCODING_VALUE = {"wav": pb2.AUDIO_ENCODING_WAV, "flac": pb2.AUDIO_ENCODING_FLAC,
                  "pcm_f32le": pb2.AUDIO_ENCODING_PCM_F32LE}


class _Reject(Exception):
    """Ends an RPC with a status (turned into context.abort after the request is logged)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Call:
    """Book-keeping of one RPC for its log line."""

    method: str
    request_id: str
    peer: str
    received: float
    ended: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class FluxMusicService(pb2_grpc.FluxMusicServiceServicer):
    def __init__(self, pipe, scheduler: BatchScheduler, limits: Limits, metrics: Metrics, model_info) -> None:
        self.pipe, self.scheduler, self.limits, self.metrics = pipe, scheduler, limits, metrics
        self.model_info = model_info

    # ------------------------------------------------------------------------------------ RPCs
    def Generate(self, request, context):
        call = self._begin("Generate", context)
        job = None
        try:
            job = self._admit(request, context, call)
            job.done.wait()
            response = self._respond(job, call)
        except _Reject as r:
            self._end(call, r.code, str(r), job, request)
            context.set_trailing_metadata((("x-request-id", call.request_id),))
            context.abort(r.code, str(r))
        self._end(call, grpc.StatusCode.OK, "", job, request)
        return response

    def GenerateStream(self, request, context):
        call = self._begin("GenerateStream", context)
        events: queue.SimpleQueue = queue.SimpleQueue()
        job = None
        try:
            job = self._admit(
                request, context, call,
                on_progress=lambda step, total, now: events.put((step, total, now)),
                on_done=lambda: events.put(None),
                on_chunk=events.put,
            )
            while (event := events.get()) is not None:
                if not isinstance(event, tuple):  # a finished long-form window: its audio, now
                    yield pb2.GenerateStreamResponse(window=self._window(event, job, call))
                    continue
                step, total, now = event
                yield pb2.GenerateStreamResponse(
                    progress=pb2.Progress(step=step, total=total, elapsed_ms=1e3 * (now - call.received))
                )
            response = self._respond(job, call)
        except _Reject as r:
            self._end(call, r.code, str(r), job, request)
            context.set_trailing_metadata((("x-request-id", call.request_id),))
            context.abort(r.code, str(r))
        self._end(call, grpc.StatusCode.OK, "", job, request)
        yield pb2.GenerateStreamResponse(result=response)

    def GetModelInfo(self, request, context):
        return self.model_info

    def GetStats(self, request, context):
        return self.metrics.stats(pb2)

    # ------------------------------------------------------------------------------------ steps
    def _begin(self, method: str, context) -> _Call:
        metadata = dict(context.invocation_metadata())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:16])[:64]
        return _Call(method, request_id, context.peer(), time.monotonic())

    def _window(self, chunk, job: Job, call: _Call):
        """One finished window of a long-form generation as a GenerateResponse (its audio only)."""
        try:
            data = [encode_audio(w, self.pipe.sample_rate, job.spec.encoding) for w in chunk.audio]
        except Exception as e:
            raise _Reject(grpc.StatusCode.INTERNAL, f"audio encoding failed: {e}") from None
        return pb2.GenerateResponse(
            waveforms=[pb2.Waveform(data=d, seed=it.seed, num_samples=len(w))
                       for d, it, w in zip(data, job.spec.items, chunk.audio)],
            sample_rate=self.pipe.sample_rate, encoding=ENCODING_VALUE[job.spec.encoding],
            request_id=call.request_id, window=chunk.window, windows=chunk.windows, start_sample=chunk.start,
            cfg_evaluations=chunk.cfg_evaluations,
        )

    def _admit(self, request, context, call: _Call, on_progress=None, on_done=None, on_chunk=None) -> Job:
        try:
            spec = parse_request(request, self.limits, self.pipe)
        except FluxMusicError as e:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        remaining = context.time_remaining()
        deadline = None if remaining is None else call.received + remaining
        job = Job(spec, deadline, on_progress, on_done, call.request_id, call.received, on_chunk=on_chunk)

        def on_rpc_end() -> None:
            # Runs when the RPC ends for any reason; after a normal end the job and the log line are done and
            # this is a no-op. A cancelled stream's generator may never run again, so account for it here.
            if deadline is not None and time.monotonic() >= deadline - 1e-3:
                code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed"
            else:
                code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
            self.scheduler.cancel(job, code.name, message)
            self._end(call, code, message, job, request)

        if not context.add_callback(on_rpc_end):
            raise _Reject(grpc.StatusCode.CANCELLED, "the call ended before it was queued")
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except ShuttingDown as e:
            raise _Reject(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        return job

    def _respond(self, job: Job, call: _Call):
        if job.code != "OK":
            raise _Reject(grpc.StatusCode[job.code], job.message)
        t0 = time.monotonic()
        try:
            data = [encode_audio(w, job.sample_rate, job.spec.encoding) for w in job.audio]
        except Exception as e:  # e.g. a non-finite waveform: fails this request only
            raise _Reject(grpc.StatusCode.INTERNAL, f"audio encoding failed: {e}") from None
        now = time.monotonic()
        timings = pb2.Timings(audio_encode_ms=1e3 * (now - t0), total_ms=1e3 * (now - call.received), **job.timings)
        return pb2.GenerateResponse(
            waveforms=[
                pb2.Waveform(data=d, seed=it.seed, num_samples=len(w))
                for d, it, w in zip(data, job.spec.items, job.audio)
            ],
            sample_rate=job.sample_rate,
            encoding=ENCODING_VALUE[job.spec.encoding],
            timings=timings,
            batch_size=job.batch_size,
            request_id=call.request_id,
            kept_snr_db=[v if math.isfinite(v) else 999.0 for v in job.kept_snr_db],
            cfg_evaluations=job.cfg_evaluations,
        )

    def _end(self, call: _Call, code: grpc.StatusCode, message: str, job: Job | None, request) -> None:
        """Count the request and write its structured log line (once per call, whoever gets here first)."""
        with call.lock:
            if call.ended:
                return
            call.ended = True
        total = time.monotonic() - call.received
        self.metrics.requests.labels(call.method, code.name).inc()
        if code == grpc.StatusCode.OK:  # latency of served requests; rejections would only skew it
            self.metrics.request_seconds.observe(total)
        line = {
            "event": "request", "request_id": call.request_id, "method": call.method, "peer": call.peer,
            "code": code.name, "total_ms": round(1e3 * total, 3), "prompt_chars": len(request.prompt),
        }
        if job is not None:
            st = job.spec.settings
            line.update(steps=st.steps, solver=st.solver, shift=st.shift, preset=st.preset, waveforms=job.size,
                        seeds=[it.seed for it in job.spec.items], batch_size=job.batch_size,
                        **{k: round(v, 3) for k, v in job.timings.items()})
        if message:
            line["message"] = message
        log.log(logging.INFO if code == grpc.StatusCode.OK else logging.WARNING, json.dumps(line))


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call except health checks (load balancers and
    Kubernetes probes rarely carry credentials); answers UNAUTHENTICATED otherwise."""

    EXEMPT = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(self.EXEMPT):
            return handler
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(str(got).encode(), self._expected):
            return handler

        def deny(request, context):
            log.warning(json.dumps({"event": "unauthenticated", "method": details.method, "peer": context.peer()}))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        # The replacement must have the method's own cardinality, or gRPC cannot drive it.
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        return kind[(handler.request_streaming, handler.response_streaming)](
            deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def build_model_info(pipe, limits: Limits, max_batch: int, max_delay_ms: float, max_queue: int):
    """The GetModelInfo answer (fixed for the server's lifetime)."""
    import importlib.metadata as md

    import google.protobuf
    import numpy
    import torch

    from fluxmusic.adapters import has_media
    from fluxmusic.sampling import CONDITIONING

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "unknown"

    cfg = pipe.backend.transformer_config
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    from fluxmusic.sampling import resolve_settings

    d = resolve_settings(pipe.defaults, limits=limits.sampling)  # what a request with no options gets
    defaults = pb2.Defaults(steps=d.steps, guidance=d.guidance, solver=d.solver)
    if d.shift is not None:
        defaults.shift = d.shift
    return pb2.GetModelInfoResponse(
        name=pipe.index.name,
        backend=pipe.backend.name,
        device=str(pipe.backend.device),
        sample_rate=pipe.sample_rate,
        defaults=defaults,
        limits=pb2.Limits(
            max_duration=limits.max_duration, max_steps=limits.max_steps, min_guidance=limits.min_guidance,
            max_guidance=limits.max_guidance, max_shift=limits.max_shift,
            max_seed=MAX_SEED, max_waveforms=limits.max_waveforms, max_prompt_chars=limits.max_prompt_chars,
            solvers=list(limits.solvers), max_response_bytes=limits.max_response_bytes,
            min_shift=limits.min_shift, max_cache_threshold=limits.max_cache_threshold,
            guidance_schedules=list(limits.guidance_schedules), max_long_duration=limits.max_long_duration,
            max_audio_seconds=limits.max_audio_seconds, max_resample=limits.max_resample,
            max_audio_bytes=limits.max_audio_bytes, max_image_bytes=limits.max_image_bytes,
            max_image_pixels=limits.max_image_pixels, max_story_chars=limits.max_story_chars,
            max_media_weight=limits.max_media_weight, conditionings=list(CONDITIONING),
            image_and_story=pipe.model_dir is not None and has_media(pipe.model_dir),
            trained_conditioning=pipe.takes_context, beat_grid=pipe.beat_channels > 0,
            register_hint=pipe.control_channels[1] > 0,
        ),
        batching=pb2.Batching(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue),
        transformer_config_json=json.dumps(cfg_dict, sort_keys=True, default=str),
        versions={
            "fluxmusic": version("fluxmusic"), "torch": torch.__version__, "grpcio": grpc.__version__,
            "protobuf": google.protobuf.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0],
            "api": "fluxmusic.v1",
        },
    )
