"""The gRPC runtime against a real server on a loopback port, with a tiny random model.

Every server here is the real FluxMusicServer (grpc, scheduler, health, reflection) in this process, on an
ephemeral 127.0.0.1 port; clients talk to it over TCP. Equality with the in-process pipeline is bit-exact
when the batch composition is the same (a request alone). Requests batched with others are compared within
1e-5: CPU GEMMs may pick different blockings for different batch sizes (differences ~1e-7 seen, 1e-14 typical).
"""

from __future__ import annotations

import filecmp
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import numpy as np
import pytest

pytest.importorskip("grpc_health")
from fluxmusic.runtime import codegen  # noqa: E402
from fluxmusic.runtime.client import FluxMusicClient, build_request  # noqa: E402
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2 as pb2  # noqa: E402
from fluxmusic.runtime.server import FluxMusicServer, ServerConfig  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from selfsigned import self_signed_cert  # tests/selfsigned.py

from fluxmusic.errors import FluxMusicError  # noqa: E402
from fluxmusic.pipeline import FluxMusicPipeline  # noqa: E402

DUR = 0.5  # short audio keeps every solve in milliseconds
TOL_BATCHED = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP spin-waits of oversubscribed threads make tiny
    solves erratic (seconds per step instead of milliseconds); server and references use the same setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from fluxmusic.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("serving") / "tiny")


@pytest.fixture(scope="session")
def pipe_server(tiny_dir):
    return FluxMusicPipeline.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def pipe_ref(tiny_dir):
    """A second instance for references, so its text cache never mixes with the server's."""
    return FluxMusicPipeline.from_pretrained(tiny_dir)


@contextmanager
def running(pipe, **config):
    server = FluxMusicServer(pipe, ServerConfig(port=0, **config)).start()
    try:
        yield server
    finally:
        server.stop(grace=0)


@pytest.fixture(scope="module")
def server(pipe_server):
    with running(pipe_server, max_batch=8, max_delay_ms=5, metrics_port=0) as s:
        yield s


@pytest.fixture
def client(server):
    with FluxMusicClient(server.target) as c:
        yield c


def reference(pipe, prompt, seed, negative="", duration=DUR, guidance=3.0, steps=2, n=1, solver=None, shift=None):
    req = pipe.request(prompt, negative_prompt=negative, duration=duration, guidance=guidance, seed=seed,
                       num_waveforms=n, steps=steps, solver=solver, shift=shift)
    return pipe.generate(req).audio


def wait_for(predicate, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def stats(client):
    return client.stats()


# ------------------------------------------------------------------------------------------ generated code
def test_generated_code_in_sync(tmp_path):
    for path in codegen.generate(tmp_path):
        committed = codegen.PROTO_ROOT / path.relative_to(tmp_path)
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run python -m {codegen.__name__}"


def _fields(message) -> list[tuple]:
    return [
        (f.name, f.number, f.type, f.is_repeated, f.has_presence, f.enum_type and f.enum_type.full_name)
        for f in message.DESCRIPTOR.fields
    ]


def test_stream_request_has_exactly_the_generate_request_fields():
    """GenerateStream has its own request type (buf lint: one request type per RPC) with the same fields, so
    one validation reads both; a field added to one must be added to the other."""
    assert _fields(pb2.GenerateStreamRequest) == _fields(pb2.GenerateRequest)
    assert type(build_request("x", stream=True)) is pb2.GenerateStreamRequest
    assert type(build_request("x")) is pb2.GenerateRequest


def test_rpc_types_follow_buf_standard_names():
    """What `buf lint` STANDARD asks of the service (the lint itself runs in .ci/run and below when buf is here)."""
    service = pb2.DESCRIPTOR.services_by_name["FluxMusicService"]
    for m in service.methods:
        assert m.input_type.name == f"{m.name}Request", m.name
        assert m.output_type.name == f"{m.name}Response", m.name


def _buf() -> str | None:
    import shutil
    from pathlib import Path

    local = Path(__file__).resolve().parents[1] / ".buf" / "node_modules" / ".bin" / "buf"
    return str(local) if local.is_file() else shutil.which("buf")


@pytest.mark.skipif(_buf() is None, reason="buf is not installed (.ci/run installs it from npm into .buf/)")
def test_buf_lint_and_no_breaking_change_against_the_committed_api():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for args in (["lint"], ["breaking", "--against", "runtime/proto/fluxmusic.v1.binpb"]):
        r = subprocess.run([_buf(), *args], cwd=root, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"buf {args[0]}: {r.stdout}{r.stderr}"


def test_max_response_fits_the_limit(server):
    lim = server.limits
    samples = int(round(lim.max_duration * lim.sample_rate))
    wave = pb2.Waveform(data=b"\0" * 4 * samples, seed=2**63 - 1, num_samples=samples)
    big = pb2.GenerateResponse(waveforms=[wave] * lim.max_waveforms, sample_rate=lim.sample_rate,
                               timings=pb2.Timings(total_ms=1e9), request_id="x" * 64)
    assert big.ByteSize() <= lim.max_response_bytes
    assert lim.max_response_bytes > 4 * 2**20  # above gRPC's 4 MiB default: the limit must be set explicitly


# ------------------------------------------------------------------------------------------ results
def test_unary_and_stream_equal_in_process(client, pipe_ref):
    kw = dict(negative="low quality", duration=DUR, guidance=2.5, steps=3, n=2)
    expected = reference(pipe_ref, "slow piano melody", 11, **kw)
    req = dict(negative_prompt="low quality", duration=DUR, guidance=2.5, steps=3, seed=11, num_waveforms=2)
    out = client.generate("slow piano melody", encoding="pcm_f32le", **req)
    assert out.seeds == [11, 12] and out.sample_rate == 16000 and out.batch_size == 2
    for got, exp in zip(out.audio, expected, strict=True):
        assert got.dtype == np.float32 and np.array_equal(got, exp)
    for key in ("queue_ms", "text_encode_ms", "sampling_ms", "decode_ms", "audio_encode_ms", "total_ms"):
        assert key in out.timings

    steps = []
    streamed = client.generate_stream(
        "slow piano melody", encoding="pcm_f32le", on_progress=lambda s, t, ms: steps.append((s, t, ms)), **req
    )
    assert [(s, t) for s, t, _ in steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(b[2] >= a[2] for a, b in zip(steps, steps[1:]))
    for got, exp in zip(streamed.audio, expected, strict=True):
        assert np.array_equal(got, exp)

    wav = client.generate("slow piano melody", encoding="wav", **req)  # 16-bit: within one quantization step
    flac = client.generate("slow piano melody", encoding="flac", **req)
    assert wav.data[0][:4] == b"RIFF" and flac.data[0][:4] == b"fLaC"
    for enc in (wav, flac):
        assert np.abs(enc.audio[0] - np.clip(expected[0], -1, 1)).max() <= 1.01 / 32768


def test_random_seed_is_returned_and_reproduces(client):
    first = client.generate("bright bell", steps=1, duration=DUR, encoding="pcm_f32le")  # seed unset = random
    again = client.generate("bright bell", steps=1, duration=DUR, encoding="pcm_f32le", seed=first.seeds[0])
    assert np.array_equal(first.audio[0], again.audio[0])
    minus_one = client.generate("bright bell", steps=1, duration=DUR, encoding="pcm_f32le", seed=-1)
    assert minus_one.seeds[0] >= 0


def test_sixteen_concurrent_clients(server, pipe_ref):
    prompts = ["fast drums", "calm organ", "sad guitar", "happy synth"]
    jobs = [(prompts[i % 4], 100 + i) for i in range(16)]
    expected = {seed: reference(pipe_ref, p, seed)[0] for p, seed in jobs}

    def one(job):
        with FluxMusicClient(server.target) as c:  # a channel per client, as separate processes would have
            return c.generate(job[0], seed=job[1], steps=2, guidance=3.0, duration=DUR, encoding="pcm_f32le")

    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(one, jobs))
    for (_, seed), out in zip(jobs, outs):
        assert out.seeds == [seed]
        np.testing.assert_allclose(out.audio[0], expected[seed], atol=TOL_BATCHED, rtol=0)
    assert max(o.batch_size for o in outs) > 1  # they were batched


def test_batched_equals_alone(pipe_server, pipe_ref):
    # 0.5 s and 0.55 s share a latent length; everything else differs per request.
    reqs = [
        dict(prompt="dark bass", seed=1, guidance=1.5, duration=0.5, negative_prompt="", num_waveforms=1),
        dict(prompt="soft piano", seed=2, guidance=4.0, duration=0.55, negative_prompt="loud", num_waveforms=2),
        dict(prompt="plucked string", seed=3, guidance=0.0, duration=0.5, negative_prompt="", num_waveforms=1),
    ]
    with running(pipe_server, max_batch=4, max_delay_ms=10_000) as s:  # fills at 4 waveforms, not by timeout

        def one(r):
            with FluxMusicClient(s.target) as c:
                return c.generate(steps=2, encoding="pcm_f32le", **r)

        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(one, reqs))
    assert [o.batch_size for o in outs] == [4, 4, 4]
    for r, out in zip(reqs, outs):
        alone = reference(pipe_ref, r["prompt"], r["seed"], r["negative_prompt"], r["duration"], r["guidance"],
                          2, r["num_waveforms"])
        assert len(out.audio) == r["num_waveforms"]
        for got, exp in zip(out.audio, alone, strict=True):
            assert got.shape == exp.shape == (int(round(r["duration"] * 16000)),)
            np.testing.assert_allclose(got, exp, atol=TOL_BATCHED, rtol=0)


# ------------------------------------------------------------------------------------------ robustness
def test_cancellation_stops_work_and_frees_the_worker(pipe_server):
    with running(pipe_server, max_batch=1) as s, FluxMusicClient(s.target) as c:
        call = c.stream("slow piano", steps=1000, duration=DUR)
        assert next(call).progress.step == 1
        call.cancel()
        wait_for(lambda: c.stats().requests.get("CANCELLED") == 1 and c.stats().in_flight == 0, what="cancel")
        out = c.generate("slow piano", steps=1, duration=DUR)  # the worker is free again
        assert out.batch_size == 1
        assert c.stats().solver_steps < 500  # stopped early (a step is milliseconds; 1000 would take seconds)


def test_cancelling_one_request_of_a_batch_keeps_the_others(pipe_server, pipe_ref):
    with running(pipe_server, max_batch=2, max_delay_ms=10_000) as s, FluxMusicClient(s.target) as c:
        doomed = c.stream("sad organ", steps=40, duration=DUR, seed=5)
        survivor = c.stub.Generate.future(build_request("happy organ", steps=40, duration=DUR, seed=6,
                                                         guidance=3.0, encoding="pcm_f32le"))
        assert next(doomed).progress.step == 1
        doomed.cancel()
        response = survivor.result(timeout=60)
        assert response.batch_size == 2  # solved in the same batch to the end
        expected = reference(pipe_ref, "happy organ", 6, steps=40)[0]
        got = np.frombuffer(response.waveforms[0].data, "<f4")
        np.testing.assert_allclose(got, expected, atol=TOL_BATCHED, rtol=0)
        wait_for(lambda: c.stats().requests.get("CANCELLED") == 1, what="cancel counted")


def test_deadline_exceeded(pipe_server):
    with running(pipe_server, max_batch=1) as s, FluxMusicClient(s.target) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("slow piano", steps=1000, duration=DUR, timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: c.stats().in_flight == 0 and c.stats().requests.get("DEADLINE_EXCEEDED") == 1,
                 what="deadline handled")
        assert c.stats().solver_steps < 500
        assert c.generate("slow piano", steps=1, duration=DUR).batch_size == 1


def test_overload_answers_resource_exhausted(pipe_server):
    with running(pipe_server, max_batch=1, max_queue=2) as s, FluxMusicClient(s.target) as c:
        running_call = c.stream("slow piano", steps=1000, duration=DUR)
        assert next(running_call).HasField("progress")  # occupies the worker
        queued = [c.stub.Generate.future(build_request("fast drums", steps=1, duration=DUR)) for _ in range(2)]
        wait_for(lambda: c.stats().queue_depth == 2, what="two queued")
        with pytest.raises(grpc.RpcError) as e:
            c.generate("fast drums", steps=1, duration=DUR)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in e.value.details()
        running_call.cancel()
        for f in queued:  # the queued ones still complete once the worker is free
            assert f.result(timeout=60).batch_size == 1
        assert c.stats().requests["RESOURCE_EXHAUSTED"] == 1


INVALID = [
    ("prompt", dict(prompt="  ")),
    ("prompt", dict(prompt="a" * 2001)),
    ("negative_prompt", dict(negative_prompt="a" * 2001)),
    ("duration", dict(duration=0.0)),
    ("duration", dict(duration=301.0)),
    ("duration", dict(duration=float("nan"))),
    ("steps", dict(steps=0)),
    ("steps", dict(steps=1001)),
    ("guidance", dict(guidance=-0.5)),
    ("guidance", dict(guidance=float("inf"))),
    ("solver", dict(solver="rk4")),
    ("shift", dict(shift=0.0)),
    ("shift", dict(shift=1e-300)),  # issue 17: once a ZeroDivisionError (INTERNAL) in flow.timesteps
    ("shift", dict(shift=1e9)),
    ("duration", dict(duration=1e-9)),  # issue 17: shorter than one latent frame
    ("solver", dict(solver="x" * 12_000)),  # issue 17: echoed whole it overflowed the 8 KB metadata
    ("preset", dict(preset="fastest")),
    ("guidance_interval", dict(guidance_interval_min=0.8, guidance_interval_max=0.2)),
    ("guidance_interval", dict(guidance_interval_min=-0.1)),
    ("cache_threshold", dict(cache_threshold=1.5)),
    ("cache_threshold", dict(cache_threshold=float("nan"))),
    ("seed", dict(seed=-2)),
    ("seed", dict(seed=2**63 - 1, num_waveforms=2)),
    ("num_waveforms", dict(num_waveforms=9)),
    ("encoding", dict(encoding=7)),
    ("bpm", dict(bpm=1000.0)),
]


@pytest.mark.parametrize("field,fields", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_field(client, field, fields):
    req = pb2.GenerateRequest(prompt="slow piano", steps=1, duration=DUR)
    for k, v in fields.items():
        setattr(req, k, v)
    for rpc in (client.stub.Generate, lambda r: next(client.stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as e:
            rpc(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + " ") and "allowed" in e.value.details()
        assert len(e.value.details()) < 400  # echoed values are truncated
    if field not in ("encoding", "guidance_interval"):  # the client maps INVALID_ARGUMENT to the user-mistake error
        with pytest.raises(FluxMusicError, match=field):
            client.generate(**{"prompt": "slow piano", "steps": 1, "duration": DUR, **fields})


def test_exception_in_one_request_fails_only_it(pipe_server):
    class Faulty:
        """The real pipeline, except that a solve containing the prompt "broken bell" raises."""

        def __init__(self, pipe):
            self._pipe = pipe

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def generate(self, request, *args, **kwargs):
            if any(it.prompt == "broken bell" for it in request.items):
                raise RuntimeError("injected fault")
            return self._pipe.generate(request, *args, **kwargs)

    with running(Faulty(pipe_server), max_batch=2, max_delay_ms=10_000) as s, FluxMusicClient(s.target) as c:
        good = c.stub.Generate.future(build_request("happy bell", steps=1, duration=DUR, seed=1))
        bad = c.stub.Generate.future(build_request("broken bell", steps=1, duration=DUR, seed=2))
        assert good.result(timeout=60).waveforms[0].seed == 1
        with pytest.raises(grpc.RpcError) as e:
            bad.result(timeout=60)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "injected fault" in e.value.details()
        assert len(c.generate("happy bell", steps=1, duration=DUR, num_waveforms=2).seeds) == 2  # still serving


def test_graceful_shutdown_finishes_in_flight(pipe_server):
    s = FluxMusicServer(pipe_server, ServerConfig(port=0, max_batch=1)).start()
    with FluxMusicClient(s.target) as c:
        call = c.stream("calm piano", steps=30, duration=DUR)
        assert next(call).progress.step == 1
        stopper = threading.Thread(target=s.stop, kwargs={"grace": 60})
        stopper.start()
        events = list(call)  # the rest of the progress, then the result
        assert events[-1].HasField("result") and len(events[-1].result.waveforms) == 1
        stopper.join(60)
        assert not stopper.is_alive()
        with pytest.raises(grpc.RpcError) as e:
            c.generate("calm piano", steps=1, duration=DUR, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------------------------------ security
def test_bearer_token(pipe_server, server):
    with FluxMusicClient(server.target) as open_client:  # auth off: no token needed
        assert open_client.generate("slow piano", steps=1, duration=DUR).seeds
    with running(pipe_server, token="s3cret") as s:
        for token in (None, "wrong"):
            with FluxMusicClient(s.target, token=token) as c:
                for call in (lambda c=c: c.generate("slow piano", steps=1, duration=DUR),
                             lambda c=c: c.generate_stream("slow piano", steps=1, duration=DUR),
                             lambda c=c: c.model_info(), lambda c=c: c.stats()):
                    with pytest.raises(grpc.RpcError) as e:
                        call()
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert c.health() == "SERVING"  # health checks stay open for probes
        with FluxMusicClient(s.target, token="s3cret") as c:
            assert c.generate_stream("slow piano", steps=1, duration=DUR).seeds
            assert c.model_info().name == "tiny-random"




def test_tls_with_token(pipe_server, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    with running(pipe_server, tls_cert=str(cert), tls_key=str(key), token="t0k") as s:
        with FluxMusicClient(s.target, token="t0k", tls_ca=cert) as c:
            assert c.generate("slow piano", steps=1, duration=DUR).seeds
        with FluxMusicClient(s.target, token="t0k") as plain:  # a plaintext client cannot talk to it
            with pytest.raises(grpc.RpcError) as e:
                plain.generate("slow piano", steps=1, duration=DUR, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------------------------------ stock tooling
def test_health_and_reflection(client, server):
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "fluxmusic.v1.FluxMusicService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(client.channel)
    assert {"fluxmusic.v1.FluxMusicService", "grpc.health.v1.Health"} <= set(db.get_services())
    service = DescriptorPool(db).FindServiceByName("fluxmusic.v1.FluxMusicService")
    assert {m.name for m in service.methods} == {"Generate", "GenerateStream", "GetModelInfo", "GetStats"}
    assert service.methods_by_name["GenerateStream"].server_streaming
    assert service.methods_by_name["GenerateStream"].input_type.full_name == "fluxmusic.v1.GenerateStreamRequest"
    assert service.methods_by_name["GetStats"].output_type.full_name == "fluxmusic.v1.GetStatsResponse"


def test_model_info(client, pipe_server):
    info = client.model_info()
    assert info.backend == "torch" and info.sample_rate == 16000 and info.defaults.steps == 4
    assert info.limits.max_duration == pytest.approx(10.24)
    assert list(info.limits.solvers) == ["euler", "heun", "ab2", "ab3"]
    assert info.batching.max_batch == 8 and info.versions["api"] == "fluxmusic.v1"
    # every option's limits, and what this model can take
    lim = info.limits
    assert list(lim.guidance_schedules) == ["constant", "linear", "cosine"] and lim.max_long_duration == 300.0
    assert lim.max_audio_bytes == 16 * 2**20 and lim.max_image_bytes == 8 * 2**20 and lim.max_story_chars > 0
    assert list(lim.conditionings) == ["auto", "trained", "replace"] and lim.min_shift > 0
    assert not lim.image_and_story and not lim.trained_conditioning  # the tiny model has neither


def test_stats_and_prometheus(client, server):
    client.generate("slow piano", steps=1, duration=DUR)
    st = client.stats()
    assert st.requests["OK"] >= 1 and st.batches >= 1 and st.in_flight == 0
    hist = {h.name: h for h in st.histograms}
    assert {"queue_seconds", "sampling_seconds", "request_seconds", "batch_size"} <= set(hist)
    assert hist["request_seconds"].count >= 1 and hist["request_seconds"].cumulative_counts[-1] == hist[
        "request_seconds"].count
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'fluxmusic_requests_total{code="OK",method="Generate"}' in text
    assert "fluxmusic_sampling_seconds_bucket" in text and "fluxmusic_queue_depth" in text


# ------------------------------------------------------------------------------------------ CLI
def test_cli_client_generate_and_loadtest(server, tmp_path, capsys):
    from fluxmusic.audio import read_audio
    from fluxmusic.cli import main

    out = tmp_path / "out.wav"
    rc = main(["client", "generate", "slow piano", "-o", str(out), "--server", server.target,
               "--steps", "2", "--duration", str(DUR), "--seed", "4", "--quiet"])
    assert rc == 0 and read_audio(out).shape == (int(DUR * 16000),)
    assert main(["client", "generate", "x", "-o", str(out), "--server", server.target, "--steps", "0"]) == 2
    rc = main(["loadtest", "--server", server.target, "--concurrency", "16", "--requests", "16", "--steps", "1",
               "--duration", str(DUR), "--json"])
    assert rc == 0 and '"ok": 16' in capsys.readouterr().out


@pytest.mark.slow
def test_serve_compile_warms_up_the_compiled_transformer_and_serves_it(tiny_dir):
    """``serve --compile``: the warm-up (a full-window request at the model's defaults, which builds the compiled
    transformer) runs before the server says it is serving, and a request of that shape gets the eager
    pipeline's audio up to fp32 rounding. (That compiling matches eager is tested in test_perf_ops.)"""
    import re
    import subprocess
    import sys

    from fluxmusic.pipeline import FluxMusicPipeline

    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxmusic.cli", "serve", "--model", str(tiny_dir), "--port", "0", "--compile",
         "--dtype", "float32", "--threads", "1", "--max-batch", "1", "--log-level", "INFO"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = []
        while not (lines and lines[-1].startswith("serving on")):
            line = proc.stderr.readline()
            assert line, "".join(lines)  # the server exited before serving
            lines.append(line)
        assert any("warm-up took" in line for line in lines)
        target = re.match(r"serving on (\S+?)(,|$)", lines[-1].strip()).group(1)
        with FluxMusicClient(target) as c:
            served = c.generate("slow piano", seed=5, encoding="pcm_f32le").audio[0]
        eager = FluxMusicPipeline.from_pretrained(tiny_dir, dtype="float32")("slow piano", seed=5).audio[0]
        assert served.shape == eager.shape
        assert np.abs(served - eager).max() <= 1e-3 * np.abs(eager).max()
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_serve_compile_is_refused_with_exported_backends(tmp_path, capsys):
    from fluxmusic.cli import main

    assert main(["serve", "--compile", "--onnx-dir", str(tmp_path)]) == 2
    assert "--compile applies to the torch backend" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_runs_and_stops_on_sigterm(tiny_dir):
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "fluxmusic.cli", "serve", "--model", str(tiny_dir), "--port", "0", "--no-warmup",
         "--threads", "1", "--log-level", "WARNING"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()
        target = re.match(r"serving on (\S+?)(,|$)", line.strip()).group(1)
        assert target.startswith("127.0.0.1:")  # loopback unless told otherwise
        with FluxMusicClient(target) as c:
            assert c.health() == "SERVING"
            assert c.generate("slow piano", steps=1, duration=DUR).sample_rate == 16000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
