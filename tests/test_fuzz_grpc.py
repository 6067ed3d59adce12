"""Fuzzing the gRPC service on loopback (issue 17): random values for every request field and random bytes as
whole requests. Every answer must be OK or INVALID_ARGUMENT (never INTERNAL, never an oversized error), an
OK answer must carry real audio, and the server must keep serving afterwards.

The fields come from the service's descriptor, so a field added to the request is fuzzed without editing
this file. Counts are bounded (and so is the wall time: a case budget per test), and the RNG is seeded,
so a failure names a reproducible case.

Known failures until the request-validation rewrite (issue 17 items 1-3, branch issue-16 / wt16) merges:
``duration`` below one latent frame (1e-9 -> INTERNAL, 1e-6 -> OK with 0 samples), ``shift`` of 1e-300
(ZeroDivisionError -> INTERNAL) and a 12 KB ``solver`` echoed whole (RESOURCE_EXHAUSTED). They are kept in
the cases below on purpose, marked in :data:`PENDING_ITEMS_1_3`, so the failure report says which they are.
"""

from __future__ import annotations

import math
import random
import time
import zlib

import grpc
import pytest

pytest.importorskip("grpc_health")
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2 as pb2  # noqa: E402
from fluxmusic.runtime.server import FluxMusicServer, ServerConfig  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor as FD  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from fluxmusic.pipeline import FluxMusicPipeline  # noqa: E402

SERVICE = pb2.DESCRIPTOR.services_by_name["FluxMusicService"]
METHODS = {m.name: f"/{SERVICE.full_name}/{m.name}" for m in SERVICE.methods}
REQUEST = SERVICE.methods_by_name["Generate"].input_type
RESPONSE = SERVICE.methods_by_name["Generate"].output_type
REQUEST_CLS = getattr(pb2, REQUEST.name)
RESPONSE_CLS = getattr(pb2, RESPONSE.name)
ALLOWED = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
SEED = 17
CASES_VALUES = 160
CASES_BYTES = 400
BUDGET_S = 240.0  # per random test; the case counts above normally finish far sooner
#: The cheapest valid request; one field at a time is replaced by a fuzzed value.
BASE = {"prompt": "slow piano", "steps": 1, "duration": 0.2}


def PENDING_ITEMS_1_3(field: str, value) -> bool:  # noqa: N802 (reads as a constant set)
    """Cases issue 17 items 1-3 cover (fixed by the other branch): named in failure reports, never skipped."""
    if field == "duration" and isinstance(value, float):
        return 0 < value < 0.04  # below one latent frame (hop 160 x 4 / 16 kHz)
    if field == "shift" and isinstance(value, float):
        return 0 < value < 1e-12
    return field == "solver" and isinstance(value, str) and len(value) > 100  # echoed whole (item 3)


# ------------------------------------------------------------------------------------------------ values
STRINGS = ["", " ", "euler", "heun", "EULER", "euler ", "rk4", "\x00", "a\x00b", "\u202etxet", "🎹" * 50,
           "x" * 2000, "x" * 2001, "é" * 2001, "s" * 12_000, "\n" * 100, "%s%n{0}"]
DOUBLES = [0.0, -0.0, 5e-324, 1e-300, 1e-9, 1e-6, 0.01, 0.04, 0.2, 1.0, 7.0, 10.24, 10.240001, 100.0, 1e9,
           1e308, -1.0, -1e-300, math.inf, -math.inf, math.nan]
UINT32 = [0, 1, 2, 3, 8, 9, 1000, 2**31 - 1, 2**31, 2**32 - 1]
INT64 = [-(2**63), -2, -1, 0, 1, 7, 2**31, 2**63 - 2, 2**63 - 1]
INT32 = [-(2**31), -1, 0, 1, 2, 3, 4, 7, 2**31 - 1]
UINT64 = [0, 1, 2**32, 2**64 - 1]


def edge_values(field: FD) -> list:
    if field.type == FD.TYPE_STRING:
        return STRINGS
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return DOUBLES
    if field.type in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return UINT32
    if field.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return INT64
    if field.type in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return UINT64
    if field.type in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32, FD.TYPE_ENUM):
        return INT32  # proto3 enums are open: unknown numbers arrive as they are
    if field.type == FD.TYPE_BOOL:
        return [False, True]
    if field.type == FD.TYPE_BYTES:
        return [b"", b"\xff" * 10, bytes(range(256))]
    if field.type == FD.TYPE_MESSAGE:
        return []  # covered by random_value (recursively) and by the random-bytes test
    raise AssertionError(f"field {field.full_name}: type {field.type} has no fuzz values; add them here")


def random_string(rng: random.Random) -> str:
    n = rng.choice([0, 1, 3, 10, 100, 1999, 2000, 2001, 5000])
    pools = [(0x20, 0x7E), (0, 0x1F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x10FFFF)]
    lo, hi = rng.choice(pools)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def random_value(field: FD, rng: random.Random):
    if field.type == FD.TYPE_MESSAGE:
        return {f.name: random_value(f, rng) for f in field.message_type.fields if rng.random() < 0.5}
    if rng.random() < 0.6:
        values = edge_values(field)
        return rng.choice(values) if values else None
    if field.type == FD.TYPE_STRING:
        return random_string(rng)
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return rng.choice([rng.uniform(-20, 20), math.copysign(10 ** rng.uniform(-320, 308), rng.random() - 0.3)])
    lo = -(2 ** 63) if field.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64) else 0
    hi = {FD.TYPE_UINT32: 2**32 - 1, FD.TYPE_UINT64: 2**64 - 1}.get(field.type, 2**31 - 1)
    if field.type in (FD.TYPE_INT32, FD.TYPE_ENUM, FD.TYPE_SINT32):
        lo = -(2**31)
    if field.type == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == FD.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 64))
    return rng.choice([rng.randint(lo, hi), rng.randint(max(lo, -10), 10)])


def set_field(msg, field: FD, value) -> None:
    if value is None:
        return
    if field.is_repeated:
        getattr(msg, field.name).extend(value if isinstance(value, list) else [value])
    elif field.type == FD.TYPE_MESSAGE:
        sub = getattr(msg, field.name)
        sub.SetInParent()
        for name, v in value.items():
            set_field(sub, field.message_type.fields_by_name[name], v)
    else:
        setattr(msg, field.name, value)


def build(**fields) -> bytes:
    msg = REQUEST_CLS()
    for name, value in {**BASE, **fields}.items():
        set_field(msg, REQUEST.fields_by_name[name], value)
    return msg.SerializeToString()


# ------------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = FluxMusicPipeline.from_pretrained(tiny_model_dir)
    # Small limits keep every valid fuzzed request cheap (steps <= 8, <= 2 waveforms).
    s = FluxMusicServer(pipe, ServerConfig(port=0, max_steps=8, max_waveforms=2, max_batch=4,
                                           max_delay_ms=1)).start()
    yield s
    s.stop(grace=0)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def call(channel, data: bytes, stream: bool) -> tuple[grpc.StatusCode, str, object]:
    """One request as raw bytes; (code, details, response or None)."""
    try:
        if stream:
            events = list(channel.unary_stream(METHODS["GenerateStream"])(data, timeout=120))
            last = getattr(pb2, SERVICE.methods_by_name["GenerateStream"].output_type.name).FromString(events[-1])
            return grpc.StatusCode.OK, "", last.result
        return grpc.StatusCode.OK, "", RESPONSE_CLS.FromString(channel.unary_unary(METHODS["Generate"])(data,
                                                                                                       timeout=120))
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


def problem(code, details, response, data: bytes) -> str | None:
    """Why an answer is not acceptable, or None."""
    if code not in ALLOWED:
        return f"{code.name}: {details[:160]!r}"
    if code == grpc.StatusCode.OK:
        req = REQUEST_CLS.FromString(data)
        want = max(getattr(req, "num_waveforms", 1), 1)
        waves = list(response.waveforms)
        if len(waves) != want or any(w.num_samples < 1 or not w.data for w in waves):
            return f"OK but {len(waves)} waveform(s) with {[w.num_samples for w in waves]} samples (wanted {want})"
    elif len(details.encode()) > 2000:
        return f"INVALID_ARGUMENT with a {len(details.encode())}-byte message (echoes the value whole?)"
    return None


def short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else f"{r[:30]}...({len(r)} chars)"


# ------------------------------------------------------------------------------------------------ tests
FIELD_CASES = [(f.name, v) for f in REQUEST.fields for v in edge_values(f)]


@pytest.mark.parametrize("name,value", FIELD_CASES,
                         ids=[f"{n}={short(v)}" + (" [items 1-3]" if PENDING_ITEMS_1_3(n, v) else "")
                              for n, v in FIELD_CASES])
def test_every_field_edge_values(channel, name, value):
    data = build(**{name: value})
    stream = zlib.crc32(f"{name}={short(value)}".encode()) % 2 == 1  # both methods, reproducibly
    why = problem(*call(channel, data, stream), data)
    tag = " (issue 17 items 1-3: fixed on the request-validation branch)" if PENDING_ITEMS_1_3(name, value) else ""
    assert why is None, f"{name}={short(value)}: {why}{tag}"


def test_random_values_for_every_field(channel):
    rng = random.Random(SEED)
    fields = list(REQUEST.fields)
    failures, start, done = [], time.monotonic(), 0
    for i in range(CASES_VALUES):
        if time.monotonic() - start > BUDGET_S:
            break
        chosen = rng.sample(fields, rng.randint(1, len(fields)))
        values = {f.name: random_value(f, rng) for f in chosen}
        data = build(**values)
        why = problem(*call(channel, data, stream=i % 3 == 0), data)
        done += 1
        if why:
            pending = any(PENDING_ITEMS_1_3(k, v) for k, v in values.items())
            failures.append(f"case {i} {({k: short(v) for k, v in values.items()})}: {why}"
                            + (" (items 1-3)" if pending else ""))
    assert done >= min(CASES_VALUES, 40), f"only {done} cases in {BUDGET_S} s"
    assert not failures, f"{len(failures)} of {done} cases failed:\n" + "\n".join(failures[:20])


def mutations(rng: random.Random):
    """Random bytes, and valid requests broken in the ways a parser meets: flips, cuts, bad wire types,
    overlong varints, lengths past the end, invalid UTF-8 in each string field."""
    valid = [build(), build(negative_prompt="low quality", seed=3, num_waveforms=2, solver="heun", shift=1.0)]
    strings = [f.number for f in REQUEST.fields if f.type == FD.TYPE_STRING]
    while True:
        kind = rng.randrange(7)
        v = bytearray(rng.choice(valid))
        if kind == 0:
            yield rng.randbytes(rng.randint(0, 300))
        elif kind == 1:
            for _ in range(rng.randint(1, 8)):
                v[rng.randrange(len(v))] ^= 1 << rng.randrange(8)
            yield bytes(v)
        elif kind == 2:
            yield bytes(v[: rng.randrange(len(v))])
        elif kind == 3:  # every field number with every wire type, random payload
            number, wire = rng.randint(1, 20), rng.randrange(8)
            yield bytes(v) + bytes([(number << 3 | wire) & 0x7F]) + rng.randbytes(rng.randint(0, 12))
        elif kind == 4:
            yield bytes(v) + bytes([rng.randint(1, 15) << 3]) + b"\xff" * rng.randint(9, 12)
        elif kind == 5:
            yield bytes(v) + _varint(rng.choice(strings) << 3 | 2) + bytes([0x7F]) + b"ab"
        else:
            bad = rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
            yield bytes(v) + _varint(rng.choice(strings) << 3 | 2) + bytes([len(bad)]) + bad


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint (field tags above 15 take two bytes)."""
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pending(data: bytes) -> bool:
    try:
        msg = REQUEST_CLS.FromString(data)
    except Exception:
        return False
    return any(PENDING_ITEMS_1_3(f.name, v) for f, v in msg.ListFields())


def test_random_bytes(channel):
    rng = random.Random(SEED + 1)
    failures, start, done = [], time.monotonic(), 0
    for i, data in zip(range(CASES_BYTES), mutations(rng)):
        if time.monotonic() - start > BUDGET_S:
            break
        code, details, response = call(channel, data, stream=i % 2 == 1)
        done += 1
        why = problem(code, details, response, data)
        if why:
            failures.append(f"case {i} {data[:40]!r}...: {why}" + (" (items 1-3)" if _pending(data) else ""))
    assert done >= min(CASES_BYTES, 100), f"only {done} cases in {BUDGET_S} s"
    assert not failures, f"{len(failures)} of {done} cases failed:\n" + "\n".join(failures[:20])


def test_still_serving_after_fuzzing(server, channel):
    """Runs last in this module: the server answers a valid request and reports healthy."""
    data = build(seed=5)
    code, details, response = call(channel, data, stream=False)
    assert code == grpc.StatusCode.OK, details
    assert response.waveforms[0].num_samples == round(0.2 * 16000)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert server.scheduler.queue_depth == 0
