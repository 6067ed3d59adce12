"""Issue 17, items 4, 9, 10, 11: undecodable requests, every address bound, ports and TLS files checked before
starting, and a metrics endpoint on loopback with the server's token and TLS."""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.error
import urllib.request
from contextlib import contextmanager

import grpc
import pytest

pytest.importorskip("grpc_health")
from fluxmusic.runtime.client import FluxMusicClient  # noqa: E402
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2 as pb2  # noqa: E402
from fluxmusic.runtime.server import FluxMusicServer, ServerConfig  # noqa: E402
from selfsigned import self_signed_cert  # tests/selfsigned.py

from fluxmusic.cli import main  # noqa: E402
from fluxmusic.errors import FluxMusicError  # noqa: E402
from fluxmusic.pipeline import FluxMusicPipeline  # noqa: E402

SERVICE = pb2.DESCRIPTOR.services_by_name["FluxMusicService"]
GENERATE = f"/{SERVICE.full_name}/{SERVICE.methods_by_name['Generate'].name}"
STREAM = f"/{SERVICE.full_name}/{SERVICE.methods_by_name['GenerateStream'].name}"
INFO = f"/{SERVICE.full_name}/{SERVICE.methods_by_name['GetModelInfo'].name}"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    import torch

    torch.set_num_threads(1)
    return FluxMusicPipeline.from_pretrained(tiny_model_dir)


@contextmanager
def running(pipe, **config):
    server = FluxMusicServer(pipe, ServerConfig(port=0, **config)).start()
    try:
        yield server
    finally:
        server.stop(grace=0)


def raw_call(channel: grpc.Channel, method: str, data: bytes, stream: bool = False, timeout: float = 30):
    """Send ``data`` as the request bytes, unparsed (what a broken or hostile client can do)."""
    if stream:
        return list(channel.unary_stream(method)(data, timeout=timeout))
    return channel.unary_unary(method)(data, timeout=timeout)


# --------------------------------------------------------------------------------------------------- item 4
BAD_BYTES = {
    "truncated varint": b"\x20\xff\xff",
    "length past the end": b"\x0a\x40abc",
    "invalid utf-8 prompt": b"\x0a\x04\xff\xfe\xfd\xfc",
    "invalid utf-8 negative prompt": b"\x0a\x05piano\x12\x02\xc3\x28",
    "invalid utf-8 solver": b"\x0a\x05piano\x32\x01\x80",
    "bad wire type": b"\x0f\x00",
    "field number 0": b"\x02\x01a",
    "overlong varint": b"\x20" + b"\xff" * 11,
}


@pytest.mark.parametrize("name", list(BAD_BYTES))
def test_undecodable_request_is_invalid_argument(pipe, name):
    with running(pipe) as s, grpc.insecure_channel(s.target) as ch:
        for method, stream in ((GENERATE, False), (STREAM, True)):
            with pytest.raises(grpc.RpcError) as e:
                raw_call(ch, method, BAD_BYTES[name], stream)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, e.value.details())
            assert "not a valid protobuf message" in e.value.details()
        try:  # GetModelInfoRequest has no fields: a string field's bad UTF-8 is an unknown field there
            raw_call(ch, INFO, BAD_BYTES[name])
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
        # still serving
        good = pb2.GenerateRequest(prompt="slow piano", steps=1, duration=0.2).SerializeToString()
        assert pb2.GenerateResponse.FromString(raw_call(ch, GENERATE, good)).waveforms
        with FluxMusicClient(s.target) as c:
            assert c.stats().requests["INVALID_ARGUMENT"] == 2  # Generate and GenerateStream are counted


def test_undecodable_with_token_is_unauthenticated_first(pipe):
    with running(pipe, token="t0k") as s, grpc.insecure_channel(s.target) as ch:
        with pytest.raises(grpc.RpcError) as e:
            raw_call(ch, GENERATE, BAD_BYTES["invalid utf-8 prompt"])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(GENERATE)(BAD_BYTES["invalid utf-8 prompt"], metadata=(("authorization", "Bearer t0k"),))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------------------------------- item 9
def _hold(family: int, addr: str, port: int = 0) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port))
    s.listen()
    return s


def _ipv6() -> bool:
    try:
        _hold(socket.AF_INET6, "::1").close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("held", ["127.0.0.1", "::1"])
def test_localhost_refuses_unless_every_address_binds(pipe, held):
    family = socket.AF_INET6 if ":" in held else socket.AF_INET
    with _hold(family, held) as other:
        port = other.getsockname()[1]
        with pytest.raises(FluxMusicError, match="cannot listen on localhost") as e:
            FluxMusicServer(pipe, ServerConfig(host="localhost", port=port)).start()
        assert held in str(e.value)
    # Once the other server is gone, localhost binds both loopbacks on one port.
    with running(pipe, host="localhost") as s:
        for addr in ("127.0.0.1", "::1"):
            with socket.create_connection((addr, s.port), timeout=5):
                pass


# --------------------------------------------------------------------------------------------------- item 10
def test_metrics_port_in_use_is_refused_before_grpc_starts(pipe):
    with _hold(socket.AF_INET, "127.0.0.1") as other:
        mport = other.getsockname()[1]
        grpc_port = _hold(socket.AF_INET, "127.0.0.1")
        port = grpc_port.getsockname()[1]
        grpc_port.close()
        with pytest.raises(FluxMusicError, match=f"metrics port 127.0.0.1:{mport}.*in use"):
            FluxMusicServer(pipe, ServerConfig(port=port, metrics_port=mport)).start()
        _hold(socket.AF_INET, "127.0.0.1", port).close()  # the gRPC port was never taken (or was released)


def test_cli_serve_checks_ports_and_tls_before_loading(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")  # never reached: the checks come first
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    cert, key = self_signed_cert(tmp_path)
    cases = [
        (["--tls-cert", str(cert), "--tls-key", str(garbage)], "TLS cert"),
        (["--tls-cert", str(cert), "--tls-key", str(tmp_path / "absent.pem")], "cannot read TLS key"),
        (["--tls-cert", str(garbage), "--tls-key", str(key)], "TLS cert"),
    ]
    other_key = self_signed_cert(tmp_path / "other")[1]
    cases.append((["--tls-cert", str(cert), "--tls-key", str(other_key)], "does not belong to the certificate"))
    with _hold(socket.AF_INET, "127.0.0.1") as other:
        cases.append((["--metrics-port", str(other.getsockname()[1])], "in use"))
        cases.append((["--port", str(other.getsockname()[1])], "in use"))
        for extra, phrase in cases:
            args = ["serve", "--model", missing_model, "--no-warmup", *(["--port", "0"] if "--port" not in extra
                                                                          else []), *extra]
            assert main(args) == 2, extra
            err = capsys.readouterr().err
            assert phrase in err and "Traceback" not in err and "does not exist" not in err, err


# --------------------------------------------------------------------------------------------------- item 11


def _get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def test_metrics_on_loopback_even_when_grpc_is_public(pipe):
    with running(pipe, host="0.0.0.0", metrics_port=0) as s:
        assert s._http.httpd.server_address[0] == "127.0.0.1"
        assert s.metrics_url == f"http://127.0.0.1:{s.metrics_port}/metrics"
        code, text = _get(s.metrics_url)
        assert code == 200 and "fluxmusic_requests" in text
        assert _get(s.metrics_url.replace("/metrics", "/other"))[0] == 404
    with running(pipe, metrics_port=0, metrics_host="0.0.0.0") as s:  # told otherwise
        assert s._http.httpd.server_address[0] == "0.0.0.0"


def test_metrics_with_token_and_tls(pipe, tmp_path):
    cert, key = self_signed_cert(tmp_path)
    with running(pipe, metrics_port=0, token="t0k", tls_cert=str(cert), tls_key=str(key)) as s:
        url = s.metrics_url
        assert url.startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=str(cert))
        assert _get(url, context=ctx)[0] == 401
        assert _get(url, "wrong", ctx)[0] == 401
        code, text = _get(url, "t0k", ctx)
        assert code == 200 and "fluxmusic_queue_depth" in text
        with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served
            _get(url.replace("https://", "http://"), "t0k")
        # a client that never finishes its handshake does not block scrapes
        with socket.create_connection(("127.0.0.1", s.metrics_port)):
            assert _get(url, "t0k", ctx)[0] == 200
