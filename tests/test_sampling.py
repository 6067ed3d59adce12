"""One sampling path (issue 16) and the training-free sampling options (issue 14 item 1).

- resolution: fallbacks < the model's defaults < preset < explicit values, "no shift" distinct from "default";
- one validation: the same bad request gets the same message from Python, the CLI, gRPC and the Triton BLS logic;
- one path: the same request through the CLI, Python, gRPC (loopback server) and the BLS logic gives identical
  audio (bit-identical floats; the CLI's 16-bit file equals the Python audio written the same way);
- ``--official`` equals a hand-written official sampler (50 uniform Euler steps, two separate forwards);
- ab2, the guidance interval and step caching do what they claim.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fluxmusic.cli import main
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning, GuidedVelocity, StepCache, adams_bashforth_weights, guidance_weight, sample
from fluxmusic.latent import LatentGeometry
from fluxmusic.pipeline import FluxMusicPipeline
from fluxmusic.sampling import (
    ECHO_CHARS,
    OFFICIAL,
    build_request,
    resolve_seeds,
    resolve_settings,
)

PROMPT = "a slow piano melody"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def odd_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with defaults far from the official ones (shift, Heun, a negative prompt, caching)."""
    d = tmp_path_factory.mktemp("odd") / "model"
    shutil.copytree(tiny_model_dir, d)
    index = json.loads((d / "model_index.json").read_text())
    index["defaults"] = {"steps": 6, "guidance": 2.0, "solver": "heun", "shift": 3.0,
                         "negative_prompt": "noise", "guidance_interval": [0.1, 0.9], "cache_threshold": 0.5}
    (d / "model_index.json").write_text(json.dumps(index))
    return d


@pytest.fixture(scope="module")
def odd_pipe(odd_model_dir):
    return FluxMusicPipeline.from_pretrained(odd_model_dir, dtype="fp32")


# ----------------------------------------------------------------------------------------------- resolution
def test_precedence_defaults_preset_explicit():
    model = {"steps": 6, "guidance": 2.0, "solver": "heun", "shift": 3.0, "negative_prompt": "noise",
             "cache_threshold": 0.5, "future_option": 1}
    st = resolve_settings(model)
    assert (st.steps, st.solver, st.shift, st.negative_prompt, st.cache_threshold) == (6, "heun", 3.0, "noise", 0.5)
    official = resolve_settings(model, "official")  # the preset replaces every field, the shift included
    assert dataclasses.asdict(official) == {**OFFICIAL, "preset": "official"}
    mixed = resolve_settings(model, "official", steps=20, negative_prompt="")
    assert (mixed.steps, mixed.negative_prompt, mixed.solver, mixed.shift) == (20, "", "euler", None)
    # "no shift" (1 or "none") is not "the model's default" (None)
    assert resolve_settings(model, shift=1.0).shift is None
    assert resolve_settings(model, shift="none").shift is None
    assert resolve_settings(model, shift=None).shift == 3.0
    assert resolve_settings({}).to_dict() == {**OFFICIAL, "negative_prompt": "", "guidance_interval": [0.0, 1.0],
                                              "preset": None}


def test_model_negative_prompt_is_read(odd_pipe):
    req = odd_pipe.request(PROMPT, duration=0.5)
    assert req.settings.negative_prompt == "noise" and req.items[0].negative_prompt == "noise"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"steps": 0}, "steps 0 is invalid; allowed: an integer in [1, 1000]"),
        ({"steps": 2.5}, "steps 2.5 is invalid"),
        ({"guidance": -3.0}, "guidance -3.0 is invalid; allowed: a number in [0, 100]"),
        ({"solver": "rk4"}, "solver 'rk4' is invalid; allowed: euler, heun, ab2, ab3"),
        ({"shift": 1e-300}, "shift 1e-300 is invalid; allowed: a number in [0.01, 100]"),
        ({"shift": float("inf")}, "shift inf is invalid"),
        ({"duration": 1e-9}, "duration 1e-09 is invalid; allowed: seconds in [0.04, 300]"),
        ({"duration": 301}, "duration 301 is invalid"),
        ({"seed": -2}, "seed -2 is invalid; allowed: -1 (random) or an integer in [0, "),
        ({"seed": 2**63 - 1, "num_waveforms": 2}, "seed 9223372036854775807 is invalid"),
        ({"num_waveforms": 9}, "num_waveforms 9 is invalid; allowed: an integer in [1, 8]"),
        ({"negative_prompt": "n" * 2001}, "at most 2000 characters (got 2001)"),
        ({"preset": "fastest"}, "preset 'fastest' is invalid; allowed: official (or none)"),
        ({"guidance_interval": (0.7, 0.2)}, "guidance_interval (0.7, 0.2) is invalid; allowed: two times"),
        ({"guidance_interval": (0.0, 1.5)}, "guidance_interval (0.0, 1.5) is invalid"),
        ({"cache_threshold": 2.0}, "cache_threshold 2.0 is invalid; allowed: a number in [0, 1]"),
        ({"guidance_schedule": "exp"}, "guidance_schedule 'exp' is invalid; allowed: constant, linear, cosine"),
    ],
)
def test_one_validation_clear_messages(kw, message):
    geo = LatentGeometry(vae_downsample=4)
    with pytest.raises(FluxMusicError) as e:
        build_request({}, geo, PROMPT, **kw)
    assert message in str(e.value)


def test_echoed_values_are_truncated_and_model_defaults_checked():
    geo = LatentGeometry()
    with pytest.raises(FluxMusicError) as e:
        build_request({}, geo, PROMPT, solver="x" * 12_000)
    assert len(str(e.value)) < ECHO_CHARS + 100
    with pytest.raises(FluxMusicError, match="the model's default shift 0.0 is invalid"):
        build_request({"shift": 0.0}, geo, PROMPT)
    with pytest.raises(FluxMusicError, match="prompt 'x"):
        build_request({}, geo, "x" * 5000)


def test_seed_rules():
    assert resolve_seeds(5, 3) == [5, 6, 7]
    a, b = resolve_seeds(-1, 2), resolve_seeds(None, 2)
    assert a[1] == a[0] + 1 and b[1] == b[0] + 1 and 0 <= a[0] <= 2**63 - 2
    assert resolve_seeds([3, 9], 2) == [3, 9]
    with pytest.raises(FluxMusicError, match="one seed per waveform"):
        resolve_seeds([3], 2)
    with pytest.raises(FluxMusicError, match="seed True is invalid"):
        resolve_seeds(True, 1)


# ----------------------------------------------------------------------------------------------- four front ends
def _version_dir(model_dir: Path, out: Path) -> Path:
    """A Triton BLS version directory for ``model_dir`` (what ``fluxmusic export triton`` writes beside model.py)."""
    from fluxmusic.runtime.triton_bls import (
        CLAP_TOKENIZER_DIR,
        PROBE_WEIGHTS,
        TOKENIZER_DIR,
        TRANSFORMER_CONFIG,
    )

    from fluxmusic.step_cache import write_probe_weights

    out.mkdir(parents=True)
    for name in ("model_index.json", "null_embeddings.safetensors"):
        shutil.copy2(model_dir / name, out / name)
    shutil.copy2(model_dir / "transformer" / "config.json", out / TRANSFORMER_CONFIG)
    shutil.copytree(model_dir / "tokenizer", out / TOKENIZER_DIR)
    shutil.copytree(model_dir / "clap_tokenizer", out / CLAP_TOKENIZER_DIR)
    write_probe_weights(model_dir / "transformer", out / PROBE_WEIGHTS)
    return out


def _rope_for(backend, a):
    """The RoPE table the exported transformer graph derives from the lengths, for its torch twin."""
    downsample = 2 ** (len(backend.vae.config.block_out_channels) - 1)
    grid_w = backend.vocoder.config.model_in_dim // downsample // 2
    return backend.rope(a["txt"].shape[1], a["x"].shape[1] // grid_w, grid_w)


def _torch_infer(backend, specs):
    """The BLS model's component calls answered by a torch backend (Triton's role), float32 through numpy."""
    calls = {
        "t5": lambda a: backend.t5_encode(a["input_ids"]),
        "clap": lambda a: backend.clap_encode(a["input_ids"], a["attention_mask"]),
        # The transformer graph derives RoPE from the lengths; its torch twin is given the same table.
        "transformer": lambda a: backend.velocity(a["x"], a["t"], a["txt"], a["y"], _rope_for(backend, a)),
        "vae_decoder": lambda a: backend.vae_decode(a["latent"]),
        "vocoder": lambda a: backend.vocode(a["mel"]),
    }

    def infer(name, arrays):
        out = calls[name]({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
        return {specs[name].outputs[0].name: out.detach().numpy()}

    return infer


@pytest.fixture(scope="module")
def front_ends(odd_model_dir, tmp_path_factory):
    pytest.importorskip("grpc_health")
    from fluxmusic.runtime.client import FluxMusicClient
    from fluxmusic.runtime.server import FluxMusicServer, ServerConfig
    from fluxmusic.runtime.triton_bls import FluxMusicBls

    # One thread count everywhere: the front ends must agree bit for bit, and a GEMM's float sums depend on how
    # many threads split it. A gRPC handler thread takes torch's count when it first runs a torch op, so a later
    # change in the main thread (the CLI's --threads) would not reach it; the CLI calls below pass --threads 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    python = FluxMusicPipeline.from_pretrained(odd_model_dir)
    served = FluxMusicPipeline.from_pretrained(odd_model_dir)  # its own caches, as a separate server process
    bls = FluxMusicBls(_version_dir(odd_model_dir, tmp_path_factory.mktemp("bls") / "1"), lambda *a: None)
    bls.backend.infer = _torch_infer(FluxMusicPipeline.from_pretrained(odd_model_dir).backend, bls.backend.specs)
    server = FluxMusicServer(served, ServerConfig(port=0, max_batch=1)).start()
    client = FluxMusicClient(server.target)
    yield {"python": python, "bls": bls, "client": client, "model": odd_model_dir,
           "tmp": tmp_path_factory.mktemp("cli")}
    client.close()
    server.stop(grace=0)
    torch.set_num_threads(before)


#: (Python keywords, CLI arguments): a custom request, the official preset, and one with step caching.
REQUESTS = {
    "custom": ({"negative_prompt": "low quality", "duration": 1.0, "steps": 3, "guidance": 4.5, "solver": "ab2",
                "shift": 2.0, "seed": 7, "guidance_interval": (0.0, 0.75), "cache_threshold": 0.0,
                "guidance_schedule": "linear"},
               ["--negative-prompt", "low quality", "--duration", "1.0", "--steps", "3", "--guidance", "4.5",
                "--solver", "ab2", "--shift", "2", "--seed", "7", "--guidance-interval", "0", "0.75",
                "--cache-threshold", "0", "--guidance-schedule", "linear"]),
    "official": ({"preset": "official", "duration": 0.5, "seed": 3},
                 ["--official", "--duration", "0.5", "--seed", "3"]),
    "model_defaults_with_cache": ({"duration": 0.5, "seed": 11}, ["--duration", "0.5", "--seed", "11"]),
}


def _bls_inputs(kw: dict) -> dict:
    arrays = {"prompt": np.array([PROMPT.encode()], dtype=object)}
    for k, v in kw.items():
        if k == "guidance_interval":
            arrays["guidance_interval_min"] = np.array([v[0]], np.float32)
            arrays["guidance_interval_max"] = np.array([v[1]], np.float32)
        elif isinstance(v, str):
            arrays[k] = np.array([v.encode()], dtype=object)
        else:
            dtype = {"steps": np.int32, "seed": np.int64}.get(k, np.float32)
            arrays[k] = np.array([v], dtype)
    return arrays


def _grpc_kw(kw: dict) -> dict:
    return dict(kw, encoding="pcm_f32le")


@pytest.mark.parametrize("name", list(REQUESTS))
def test_same_request_same_audio_on_every_front_end(front_ends, name):
    kw, argv = REQUESTS[name]
    ref = front_ends["python"](PROMPT, **kw)
    audio = ref.audio[0]
    assert np.abs(audio).max() > 0
    if name == "model_defaults_with_cache":
        assert ref.settings.cache_threshold == 0.5 and ref.cache_skipped > 0  # the model's default caching ran

    grpc_out = front_ends["client"].generate(PROMPT, **_grpc_kw(kw))
    assert grpc_out.seeds == ref.seeds and np.array_equal(grpc_out.audio[0], audio)

    bls_out = front_ends["bls"].execute(_bls_inputs(kw))
    assert bls_out["seed_used"].tolist() == ref.seeds and np.array_equal(bls_out["audio"], audio)

    tmp = front_ends["tmp"]
    cli_path, py_path = tmp / f"{name}_cli.wav", tmp / f"{name}_py.wav"
    assert main(["generate", PROMPT, "-o", str(cli_path), "--model", str(front_ends["model"]), "--quiet",
                 "--threads", "1", *argv]) == 0
    from fluxmusic.audio import write_audio

    write_audio(py_path, audio, ref.sample_rate)
    assert np.array_equal(sf.read(cli_path, dtype="int16")[0], sf.read(py_path, dtype="int16")[0])


BAD = [
    ({"steps": 0}, ["--steps", "0"]),
    ({"guidance": -3.0}, ["--guidance", "-3"]),
    ({"solver": "x" * 12_000}, None),
    ({"shift": 1e-300}, ["--shift", "1e-300"]),
    ({"duration": 1e-9}, ["--duration", "1e-9"]),
    ({"seed": -2}, ["--seed", "-2"]),
    ({"preset": "fast"}, None),
    ({"guidance_interval": (0.5, 0.25)}, ["--guidance-interval", "0.5", "0.25"]),
    ({"cache_threshold": 1.5}, ["--cache-threshold", "1.5"]),
    ({"guidance_schedule": "exp"}, ["--guidance-schedule", "exp"]),
]


@pytest.mark.parametrize("kw, argv", BAD, ids=[next(iter(k)) for k, _ in BAD])
def test_same_bad_request_same_error_on_every_front_end(front_ends, capsys, kw, argv):
    import grpc

    with pytest.raises(FluxMusicError) as e:
        front_ends["python"](PROMPT, **kw)
    message = str(e.value)
    assert len(message) < 250
    req_kw = {k: v for k, v in kw.items()}
    with pytest.raises(grpc.RpcError) as g:
        front_ends["client"].stub.Generate(__import__("fluxmusic.runtime.client", fromlist=["x"]).build_request(
            PROMPT, **req_kw))
    assert g.value.code() == grpc.StatusCode.INVALID_ARGUMENT and g.value.details() == message
    with pytest.raises(FluxMusicError) as b:
        front_ends["bls"].execute(_bls_inputs(kw))
    if "shift" not in kw and "duration" not in kw:  # float32 inputs echo their float32 value
        assert str(b.value) == message
    else:
        assert str(b.value).split(" is invalid")[1] == message.split(" is invalid")[1]
    if argv is not None:
        out = front_ends["tmp"] / "bad.wav"
        assert main(["generate", PROMPT, "-o", str(out), "--model", str(front_ends["model"]), "--quiet",
                     *argv]) == 2
        err = capsys.readouterr().err
        assert message.split(" is invalid")[1] in err and not out.exists()


def test_seed_minus_one_is_random_everywhere(front_ends, capsys):
    a = front_ends["python"](PROMPT, seed=-1, duration=0.5, steps=1)
    g = front_ends["client"].generate(PROMPT, seed=-1, duration=0.5, steps=1)
    b = front_ends["bls"].execute(_bls_inputs({"seed": -1, "duration": 0.5, "steps": 1}))
    assert a.seeds[0] >= 0 and g.seeds[0] >= 0 and int(b["seed_used"][0]) >= 0
    out = front_ends["tmp"] / "r.wav"
    assert main(["generate", PROMPT, "-o", str(out), "--model", str(front_ends["model"]), "--quiet",
                 "--seed", "-1", "--duration", "0.5", "--steps", "1"]) == 0
    assert "seed " in capsys.readouterr().out


def test_cli_validates_before_loading_the_model(odd_model_dir, tmp_path, monkeypatch, capsys):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(FluxMusicPipeline, "from_pretrained", no_load)
    for argv in (["--steps", "0"], ["--duration", "301"], ["-o", str(tmp_path / "missing" / "x.wav")]):
        full = ["generate", PROMPT, "-o", str(tmp_path / "x.wav"), "--model", str(odd_model_dir), *argv]
        assert main(full) == 2
        err = capsys.readouterr().err
        assert err.startswith("fluxmusic generate: error:") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------- official
@torch.no_grad()
def test_official_preset_is_the_official_sampler(odd_pipe):
    """On a model whose defaults are Heun 6 / shift 3 / guidance 2 / caching, ``preset="official"`` equals a
    hand-written official loop: 50 uniform Euler steps, guidance 7, "low quality, gentle", and two separate
    forwards (cond, then uncond) per step."""
    from fluxmusic.latent import patchify, unpatchify
    from fluxmusic.pipeline import noise_for

    pipe, seed, duration = odd_pipe, 5, 0.5
    out = pipe(PROMPT, preset="official", seed=seed, duration=duration)
    assert out.evaluations == 50 and out.settings.shift is None

    geo = pipe.geometry
    frames = geo.latent_frames(duration)
    gh, gw = geo.grid(frames)
    cond = pipe.encode_text([PROMPT])
    neg = pipe.encode_text(["low quality, gentle"])
    x = patchify(noise_for(seed, (geo.latent_channels, frames, geo.latent_width))[None])
    model = pipe.backend.transformer
    rope = model.rope_for(cond.txt.shape[1], gh, gw)
    for i in range(50, 0, -1):
        t = torch.full((1,), i / 50)
        v_c = model(x, t, cond.txt, cond.y, rope)
        v_u = model(x, t, neg.txt, neg.y, rope)
        x = x - (1 / 50) * (v_u + 7.0 * (v_c - v_u))
    wave = pipe.decode(unpatchify(x, gh, gw))[0, : geo.num_samples(duration)].numpy()
    got = out.audio[0]
    # batched B=2 vs two B=1 forwards: float rounding only
    assert np.abs(got - wave).max() <= 1e-4 * np.abs(wave).max()
    shifted = pipe(PROMPT, preset="official", shift=3.0, seed=seed, duration=duration).audio[0]
    assert np.abs(shifted - wave).max() > 1e-2 * np.abs(wave).max()  # the shift would have shown


# ----------------------------------------------------------------------------------------------- options
def test_ab2_beats_euler_at_equal_evaluations():
    """A smooth nonlinear flow: dx/dt = -x sin(3t) + t^2. Reference: Heun with 2,000 steps (error ~1e-7)."""
    def v(x, t):
        return -x * torch.sin(3 * t).view(-1, 1, 1) + (t**2).view(-1, 1, 1)

    x1 = torch.tensor([[[1.0], [-0.5]]], dtype=torch.float64)
    exact = sample(v, x1.clone(), 2000, solver="heun")
    errors = {}
    for steps, shift, factor in ((8, None, 4), (16, None, 4), (32, None, 4), (24, 3.0, 2)):
        calls: list[int] = []
        ab2 = sample(lambda x, t, c=calls: c.append(1) or v(x, t), x1.clone(), steps, solver="ab2", shift=shift)
        assert len(calls) == steps  # one evaluation per step
        euler = sample(v, x1.clone(), steps, shift=shift)
        err_ab2, err_euler = (ab2 - exact).abs().max().item(), (euler - exact).abs().max().item()
        assert err_ab2 < err_euler / factor, (steps, shift, err_ab2, err_euler)
        errors[steps, shift] = err_ab2
    # second order: twice the steps, about a quarter of the error (Euler: half)
    assert errors[16, None] / errors[32, None] > 3.5 and errors[8, None] / errors[16, None] > 3.0


def test_adams_bashforth_weights_integrate_polynomials_exactly():
    """The weights are the classical AB coefficients on equal steps, and integrate any polynomial of the
    solver's degree exactly over unequal steps (what makes the variable-step update the right one)."""
    assert adams_bashforth_weights(1.0, [1.0, 1.0]) == pytest.approx([23 / 12, -16 / 12, 5 / 12])
    assert adams_bashforth_weights(0.1, [0.2]) == pytest.approx([0.1 * 1.25, -0.1 * 0.25])  # AB2, r = 1/2
    h, past = 0.07, [0.13, 0.05]
    nodes = [0.0, -0.13, -0.18]
    for poly in ([1.0, 0, 0], [0, 1.0, 0], [0.3, -2.0, 5.0]):  # c0 + c1 s + c2 s^2
        values = [poly[0] + poly[1] * s + poly[2] * s * s for s in nodes]
        exact = poly[0] * h + poly[1] * h**2 / 2 + poly[2] * h**3 / 3
        got = sum(w * f for w, f in zip(adams_bashforth_weights(h, past), values))
        assert got == pytest.approx(exact, rel=1e-12)


def test_ab3_beats_ab2_on_the_shifted_schedule():
    """Same flow as above: on the shifted schedule (small first steps, so the Euler/AB2 start-up costs little)
    AB3 is several times more accurate than AB2 at one evaluation per step."""
    def v(x, t):
        return -x * torch.sin(3 * t).view(-1, 1, 1) + (t**2).view(-1, 1, 1)

    x1 = torch.tensor([[[1.0], [-0.5]]], dtype=torch.float64)
    exact = sample(v, x1.clone(), 2000, solver="heun")
    for steps in (8, 12, 16, 32):
        calls: list[int] = []
        ab3 = sample(lambda x, t, c=calls: c.append(1) or v(x, t), x1.clone(), steps, solver="ab3", shift=3.0)
        assert len(calls) == steps
        ab2 = sample(v, x1.clone(), steps, solver="ab2", shift=3.0)
        err_ab3, err_ab2 = (ab3 - exact).abs().max().item(), (ab2 - exact).abs().max().item()
        assert err_ab3 < err_ab2 / 2.5, (steps, err_ab3, err_ab2)


def test_guidance_interval_halves_the_batch_outside_it(tiny_pipe):
    sizes = []
    real = tiny_pipe.backend.velocity

    def spy(x, *a):
        sizes.append(x.shape[0])
        return real(x, *a)

    tiny_pipe.backend.velocity = spy
    try:
        kw = dict(duration=0.5, steps=10, seed=1, num_waveforms_per_prompt=2)
        inside = tiny_pipe(PROMPT, guidance_interval=(0.25, 0.65), **kw)
        assert sizes == [2, 2, 2, 2, 4, 4, 4, 4, 2, 2]  # t = 1.0 ... 0.1; CFG for t in [0.25, 0.65]
        sizes.clear()
        tiny_pipe(PROMPT, guidance_interval=(0.3, 0.7), **kw)  # boundaries on the grid are inside (fp32 times)
        assert sizes == [2, 2, 2, 4, 4, 4, 4, 4, 2, 2]
        sizes.clear()
        full = tiny_pipe(PROMPT, guidance_interval=(0.0, 1.0), **kw)
        default = tiny_pipe(PROMPT, **kw)
        assert sizes == [4] * 20
        assert all(np.array_equal(a, b) for a, b in zip(full.audio, default.audio))
        assert np.abs(inside.audio[0] - full.audio[0]).max() > 1e-3 * np.abs(full.audio[0]).max()
    finally:
        tiny_pipe.backend.velocity = real


def test_step_cache_skips_evaluations_and_reports_them(tiny_pipe):
    kw = dict(duration=0.5, steps=12, seed=4, solver="euler")
    off = tiny_pipe(PROMPT, cache_threshold=0.0, **kw)
    assert (off.evaluations, off.cache_skipped) == (12, 0)
    low = tiny_pipe(PROMPT, cache_threshold=0.05, **kw)
    high = tiny_pipe(PROMPT, cache_threshold=0.5, **kw)
    assert low.evaluations + low.cache_skipped == 12 == high.evaluations + high.cache_skipped
    assert high.cache_skipped > 0 and low.cache_skipped <= high.cache_skipped
    err = lambda r: np.abs(r.audio[0] - off.audio[0]).max()  # noqa: E731
    assert err(low) <= err(high) + 1e-7
    # per-sample decisions: a waveform gives the same audio alone or in a batch
    batch = tiny_pipe([PROMPT, "fast drums"], cache_threshold=0.2, seed=[4, 9], duration=0.5, steps=12)
    alone = tiny_pipe("fast drums", cache_threshold=0.2, seed=9, duration=0.5, steps=12)
    assert np.abs(batch.audio[1] - alone.audio[0]).max() <= 1e-5 * np.abs(alone.audio[0]).max()


def test_step_cache_with_rows_matches_the_probe_decision():
    """StepCache evaluates only the rows whose accumulated probe change reached the threshold."""
    calls = []

    def vel(x, t, rows=None):
        calls.append(None if rows is None else rows.tolist())
        return x * 0 + t.view(-1, 1, 1)

    probe_values = iter([torch.tensor([[1.0], [1.0]]), torch.tensor([[1.01], [2.0]]), torch.tensor([[1.02], [2.0]])])
    cache = StepCache(vel, lambda x, t: next(probe_values), threshold=0.1)
    x = torch.zeros(2, 3, 1)
    cache(x, torch.full((2,), 1.0))
    v = cache(x, torch.full((2,), 0.5))
    cache(x, torch.full((2,), 0.25))
    assert calls == [None, [1]]  # row 0 changed 1%, row 1 doubled; then neither changed enough
    assert v[0, 0, 0].item() == 1.0 and v[1, 0, 0].item() == 0.5
    assert (cache.evaluated, cache.skipped) == (3, 3)


def test_guided_velocity_rows_equal_the_full_batch(tiny_pipe):
    be = tiny_pipe.backend
    cond = tiny_pipe.conditioning([PROMPT, "fast drums"])
    null = tiny_pipe.conditioning(["", ""])
    g = torch.tensor([3.0, 5.0])
    gv = GuidedVelocity(be.velocity, cond, null, g, be.rope(cond.txt.shape[1], 2, 8))
    x = torch.randn(2, 16, 32)
    t = torch.full((2,), 0.6)
    full = gv(x, t)
    one = gv(x[1:], t[1:], rows=torch.tensor([1]))
    assert torch.allclose(full[1:], one, atol=1e-5)


def test_guidance_schedule_scales_the_guidance_per_step():
    """g(t) = g w(t): one recorded CFG combine per step, with the scale the schedule gives at that step's t."""
    seen = []

    def model(x, t, txt, y, rope):  # cond rows return 1, uncond rows 0: v = g(t) exactly
        return (txt[:, :1, :1] * 0 + (y[:, :1, None] > 0).float()).expand_as(x) + 0 * t.view(-1, 1, 1)

    cond = Conditioning(torch.zeros(1, 1, 1), torch.ones(1, 1))
    null = Conditioning(torch.zeros(1, 1, 1), -torch.ones(1, 1))
    x = torch.zeros(1, 2, 3)
    for schedule, w in (("constant", lambda t: 1.0), ("linear", lambda t: 2 * (1 - t)),
                        ("cosine", lambda t: 1 + math.cos(math.pi * t))):
        gv = GuidedVelocity(model, cond, null, torch.tensor([3.0]), torch.zeros(1), schedule=schedule)
        seen.clear()

        def velocity(xx, tt, gv=gv):
            v = gv(xx, tt)
            seen.append((float(tt[0]), v[0, 0, 0].item()))
            return v

        sample(velocity, x, 4)
        assert [v for _, v in seen] == pytest.approx([3.0 * w(t) for t, _ in seen], abs=1e-6), schedule
        assert gv.plain == (schedule == "constant")
    # the ramps average the constant scale over t in [0, 1]
    for schedule in ("linear", "cosine"):
        ts = np.linspace(0, 1, 100_001)
        assert np.mean([guidance_weight(schedule, t) for t in ts[::100]]) == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(FluxMusicError, match="unknown guidance schedule 'exp'"):
        GuidedVelocity(model, cond, null, torch.tensor([3.0]), torch.zeros(1), schedule="exp")


def test_guidance_schedule_reaches_the_pipeline_and_is_reported(tiny_pipe):
    kw = dict(duration=0.5, steps=6, seed=2, solver="euler", shift=1)
    constant = tiny_pipe(PROMPT, **kw)
    linear = tiny_pipe(PROMPT, guidance_schedule="linear", **kw)
    assert linear.settings.guidance_schedule == "linear" and "linear guidance schedule" in linear.settings.describe()
    assert constant.settings.guidance_schedule == "constant"
    assert np.abs(linear.audio[0] - constant.audio[0]).max() > 1e-3 * np.abs(constant.audio[0]).max()
    assert linear.settings.batch_key != constant.settings.batch_key  # not batched together
    again = tiny_pipe(PROMPT, guidance_schedule="linear", **kw)
    assert np.array_equal(again.audio[0], linear.audio[0])
    assert tiny_pipe(PROMPT, preset="official", duration=0.5, steps=2).settings.guidance_schedule == "constant"
