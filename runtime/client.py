"""Python client of the ``fluxmusic.v1`` gRPC service.

>>> with FluxMusicClient("127.0.0.1:50051") as client:
...     out = client.generate("a calm piano melody", seed=0, duration=5.0)
...     out.audio[0].shape, out.sample_rate

Server-side validation errors (INVALID_ARGUMENT) raise :class:`FluxMusicError` with the server's message;
every other failure raises the ``grpc.RpcError`` (``.code()``, ``.details()``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from fluxmusic.runtime.audio_codec import decode_audio
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2 as pb2
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2_grpc as pb2_grpc
from google.protobuf.json_format import MessageToDict

from fluxmusic.errors import FluxMusicError

ENCODING_VALUE = {"wav": pb2.AUDIO_ENCODING_WAV, "flac": pb2.AUDIO_ENCODING_FLAC,
                  "pcm_f32le": pb2.AUDIO_ENCODING_PCM_F32LE}
ENCODING_NAME = {v: k for k, v in ENCODING_VALUE.items()}
#: Default receive limit; the server states its exact largest response in GetModelInfo.limits.
DEFAULT_MAX_RECEIVE = 256 * 2**20


@dataclass
class GeneratedAudio:
    """A decoded GenerateResponse."""

    audio: list[np.ndarray]  # float32 mono waveforms
    data: list[bytes]  # the encoded bytes as received
    sample_rate: int
    seeds: list[int]
    encoding: str
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0
    request_id: str = ""
    kept_snr_db: list[float] = field(default_factory=list)
    cfg_evaluations: float = 0.0  # transformer evaluations per waveform (cond-only ones count 0.5)

    @classmethod
    def from_response(cls, r) -> GeneratedAudio:
        encoding = ENCODING_NAME[r.encoding]
        return cls(
            audio=[decode_audio(w.data, encoding) for w in r.waveforms],
            data=[w.data for w in r.waveforms],
            sample_rate=r.sample_rate,
            seeds=[w.seed for w in r.waveforms],
            encoding=encoding,
            timings=MessageToDict(r.timings, preserving_proto_field_name=True),
            batch_size=r.batch_size,
            request_id=r.request_id,
            kept_snr_db=list(r.kept_snr_db),
            cfg_evaluations=r.cfg_evaluations,
        )


def build_request(
    prompt: str,
    negative_prompt: str | None = None,
    duration: float | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    solver: str | None = None,
    shift: float | None = None,
    seed: int | None = None,
    num_waveforms: int = 1,
    encoding: str = "wav",
    preset: str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    cache_threshold: float | None = None,
    guidance_schedule: str | None = None,
    conditioning: str | None = None,
    audio: bytes | str | Path | None = None,
    keep: str | None = None,
    regenerate: str | None = None,
    mode: str | None = None,
    blend: float | None = None,
    resample: int | None = None,
    splice: bool | None = None,
    overlap: float | None = None,
    crossfade: float | None = None,
    sections: list[str] | None = None,
    stream: bool = False,
    image: bytes | str | Path | None = None,
    story: str | None = None,
    image_weight: float | None = None,
    story_weight: float | None = None,
    bpm: float | None = None,
    register: str | None = None,
):
    """A ``GenerateRequest`` (``GenerateStreamRequest`` with ``stream``: the same fields); None leaves a field
    unset (the server's default). ``shift=1.0`` is no shift. ``audio`` is encoded audio bytes or a path to an
    audio file (sent as its bytes); ``sections`` are "START:END prompt" strings (docs/continuation.md); ``image``
    is encoded image bytes or a path (sent as its bytes), ``story`` a text (docs/image-story.md)."""
    if encoding not in ENCODING_VALUE:
        raise FluxMusicError(f"encoding {encoding!r} is not supported; allowed: {', '.join(ENCODING_VALUE)}")
    message = pb2.GenerateStreamRequest if stream else pb2.GenerateRequest
    req = message(prompt=prompt, negative_prompt=negative_prompt or "", solver=solver or "",
                  num_waveforms=num_waveforms, encoding=ENCODING_VALUE[encoding], preset=preset or "",
                  guidance_schedule=guidance_schedule or "", conditioning=conditioning or "",
                  register=register or "")
    lo, hi = guidance_interval if guidance_interval is not None else (None, None)
    for name, value in (("duration", duration), ("steps", steps), ("guidance", guidance), ("shift", shift),
                        ("seed", seed), ("guidance_interval_min", lo), ("guidance_interval_max", hi),
                        ("cache_threshold", cache_threshold), ("keep", keep), ("regenerate", regenerate),
                        ("mode", mode), ("blend", blend), ("resample", resample), ("splice", splice),
                        ("overlap", overlap), ("crossfade", crossfade), ("story", story),
                        ("image_weight", image_weight), ("story_weight", story_weight), ("bpm", bpm)):
        if value is not None:
            setattr(req, name, value)
    if audio is not None:
        req.audio = audio if isinstance(audio, bytes) else Path(audio).read_bytes()
    if sections:
        req.sections.extend(sections)
    if image is not None:
        req.image = image if isinstance(image, bytes) else Path(image).read_bytes()
    return req


class FluxMusicClient:
    """A channel to one server. ``tls_ca``: PEM bytes or path of the CA (or self-signed cert) to trust;
    ``tls=True`` with no CA uses the system roots. ``token`` is sent as ``authorization: Bearer``."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | bytes | None = None,
        server_name: str | None = None,
        max_receive_bytes: int = DEFAULT_MAX_RECEIVE,
    ) -> None:
        options = [("grpc.max_receive_message_length", max_receive_bytes)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or tls_ca is not None:
            ca = Path(tls_ca).read_bytes() if isinstance(tls_ca, (str, Path)) else tls_ca
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb2_grpc.FluxMusicServiceStub(self.channel)
        self.target = target

    # ------------------------------------------------------------------------------------ generation
    def generate(self, prompt: str, *, timeout: float | None = None, **options) -> GeneratedAudio:
        """Unary Generate; ``options`` are :func:`build_request`'s."""
        try:
            response = self.stub.Generate(build_request(prompt, **options), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _translate(e) from None
        return GeneratedAudio.from_response(response)

    def stream(self, prompt: str, *, timeout: float | None = None, **options) -> Iterator:
        """The raw GenerateStream call: iterate its events; ``.cancel()`` stops the server's work."""
        request = build_request(prompt, stream=True, **options)
        return self.stub.GenerateStream(request, timeout=timeout, metadata=self.metadata)

    def generate_stream(
        self,
        prompt: str,
        *,
        on_progress: Callable[[int, int, float], None] | None = None,
        on_window: Callable[[int, int, int, list[np.ndarray]], None] | None = None,
        timeout: float | None = None,
        **options,
    ) -> GeneratedAudio:
        """GenerateStream, calling ``on_progress(step, total, elapsed_ms)`` per step and, for long form,
        ``on_window(window, windows, start_sample, audio per waveform)`` per finished window; returns the result."""
        call = self.stream(prompt, timeout=timeout, **options)
        try:
            for event in call:
                if event.HasField("progress"):
                    if on_progress is not None:
                        on_progress(event.progress.step, event.progress.total, event.progress.elapsed_ms)
                elif event.HasField("window"):
                    if on_window is not None:
                        w = event.window
                        audio = [decode_audio(x.data, ENCODING_NAME[w.encoding]) for x in w.waveforms]
                        on_window(w.window, w.windows, w.start_sample, audio)
                else:
                    return GeneratedAudio.from_response(event.result)
        except grpc.RpcError as e:
            raise _translate(e) from None
        except BaseException:
            call.cancel()  # e.g. Ctrl-C in on_progress: tell the server to stop
            raise
        raise RuntimeError("the stream ended without a result")

    # ------------------------------------------------------------------------------------ introspection
    def model_info(self, timeout: float | None = 10.0):
        return self.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def stats(self, timeout: float | None = 10.0):
        return self.stub.GetStats(pb2.GetStatsRequest(), timeout=timeout, metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 10.0) -> str:
        """The standard health check's status name (SERVING, NOT_SERVING, ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        r = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (the server is up) or raise grpc.FutureTimeoutError."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> FluxMusicClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _translate(e: grpc.RpcError) -> Exception:
    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return FluxMusicError(e.details())
    return e
