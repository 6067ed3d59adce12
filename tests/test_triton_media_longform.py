"""The Triton BLS model with image / story conditioning (issue 18) and long form (issue 15), on tiny real parts.

The repository is built from a tiny model directory with adapters (its image tower and adapters exported to
ONNX by the repository builder); the BLS logic runs with onnxruntime sessions of the repository's own model files
standing in for the Triton BLS calls and is compared with ``FluxMusicPipeline`` (PyTorch fp32) on the same model
directory and seed. Tolerances: conditioning max-abs <= 1e-4 and cosine >= 0.99999 (measured ~4e-7 / 1.0), audio
waveform SNR >= 40 dB (measured > 100 dB). Errors must be the pipeline's (and the gRPC server's) word for word.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from fluxmusic.export.spec import COMPONENT_NAMES, MEDIA_NAMES  # noqa: E402
from fluxmusic.export.triton_check import check_repository  # noqa: E402
from fluxmusic.export.triton_repo import RepoOptions, build_repository  # noqa: E402
from fluxmusic.runtime.triton_bls import FluxMusicBls, OnnxRuntimeInfer  # noqa: E402

from fluxmusic.errors import FluxMusicError  # noqa: E402

PROMPT = "a slow calm piano melody"
STORY = ("It rained all day. The piano played slowly. Nobody spoke! The melody stayed low; it was soft. "
         "Then the lights went out.")
#: conditioning parity (BLS over onnxruntime vs the PyTorch pipeline) and audio parity
MAX_ABS, MIN_COS, MIN_SNR_DB = 1e-4, 0.99999, 40.0


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


IMAGE = _png((np.random.default_rng(3).random((40, 48, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fluxmusic.export.onnx_export import export_onnx

    from fluxmusic.tiny import add_tiny_media, build_tiny_model_dir

    root = tmp_path_factory.mktemp("triton_media")
    model_dir = add_tiny_media(build_tiny_model_dir(root / "model"))
    export_onnx(model_dir, root / "onnx", progress=None)  # no --media: the repository builder exports them
    repo = build_repository(model_dir, root / "onnx", root / "repo")
    return {"root": root, "model": model_dir, "onnx": root / "onnx", "repo": repo}


def _infer(repo: Path) -> OnnxRuntimeInfer:
    names = [c for c in (*COMPONENT_NAMES, *MEDIA_NAMES) if (repo / c).is_dir()]
    return OnnxRuntimeInfer({c: repo / c / "1" / "model.onnx" for c in names})


@pytest.fixture(scope="module")
def bls(setup):
    return FluxMusicBls(setup["repo"] / "fluxmusic" / "1", _infer(setup["repo"]))


@pytest.fixture(scope="module")
def pipe(setup):
    from fluxmusic.pipeline import FluxMusicPipeline

    return FluxMusicPipeline.from_pretrained(setup["model"], dtype="fp32")


def _request(**kw) -> dict[str, np.ndarray]:
    """Request tensors as a Triton client sends them (BYTES as object arrays of bytes)."""
    types = {"duration": np.float32, "steps": np.int32, "guidance": np.float32, "seed": np.int64,
             "image_weight": np.float32, "story_weight": np.float32, "overlap": np.float32, "crossfade": np.float32,
             "guidance_interval_min": np.float32, "guidance_interval_max": np.float32}
    req = {}
    for k, v in kw.items():
        if isinstance(v, bytes):
            req[k] = np.array([v], dtype=object)
        elif isinstance(v, str):
            req[k] = np.array([v.encode()], dtype=object)
        elif isinstance(v, list):
            req[k] = np.array([s.encode() for s in v], dtype=object)
        else:
            req[k] = np.array([v], dtype=types[k])
    return req


def _snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return float(10 * np.log10(np.sum(ref**2) / max(np.sum((ref - out) ** 2), 1e-300)))


# ----------------------------------------------------------------------------------------- the repository
def test_repository_holds_the_image_and_story_models(setup):
    repo = setup["repo"]
    for name in MEDIA_NAMES:
        assert (repo / name / "config.pbtxt").is_file() and (repo / name / "1" / "model.onnx").is_file()
    assert not (repo / ".media-export").exists()
    checked = check_repository(repo)
    for name in MEDIA_NAMES:
        assert f"{name}: tensors agree with its graph" in checked
        assert f"{name}: accepts what the BLS model sends" in checked
    version = repo / "fluxmusic" / "1"
    assert (version / "adapters" / "config.json").is_file()
    assert not (version / "adapters" / "model.safetensors").exists()  # the weights live in the graphs
    assert (version / "image_processor" / "preprocessor_config.json").is_file()
    assert set(MEDIA_NAMES) <= set(json.loads((version / "components.json").read_text())["components"])
    text = (repo / "fluxmusic" / "config.pbtxt").read_text()
    for name in ("image", "story", "image_weight", "story_weight", "overlap", "crossfade", "sections"):
        assert f'name: "{name}"' in text
    cfg = (repo / "image_encoder" / "config.pbtxt").read_text()
    assert 'name: "pixel_values"' in cfg and "dims: [ 3, 32, 32 ]" in cfg


def test_repository_takes_exported_media_graphs_and_checks_them(setup, tmp_path):
    import shutil

    from fluxmusic.export.media_onnx import MEDIA_DIR, export_media

    onnx = tmp_path / "onnx"
    shutil.copytree(setup["onnx"], onnx)
    export_media(setup["model"], onnx)  # what `fluxmusic export onnx --media` writes
    repo = build_repository(setup["model"], onnx, tmp_path / "repo")
    assert (repo / "image_adapter" / "1" / "model.onnx").read_bytes() == (onnx / MEDIA_DIR / "image_adapter.onnx"
                                                                           ).read_bytes()
    with (onnx / MEDIA_DIR / "story_adapter.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(FluxMusicError, match="story_adapter.onnx does not match the hash"):
        build_repository(setup["model"], onnx, tmp_path / "repo2")
    assert not (tmp_path / "repo2").exists()
    # without: no image / story models, and a request with an image fails before any step, naming the fix
    plain = build_repository(setup["model"], setup["onnx"], tmp_path / "plain", options=RepoOptions(media=False))
    assert not any((plain / m).exists() for m in MEDIA_NAMES) and not (plain / "fluxmusic/1/adapters").exists()
    bls = FluxMusicBls(plain / "fluxmusic" / "1", _infer(plain))
    steps = []
    with pytest.raises(FluxMusicError, match="this Triton repository has no image / story models"):
        bls.execute(_request(prompt=PROMPT, image=IMAGE, steps=1, duration=0.5), lambda i, n: steps.append(i))
    assert steps == []
    assert bls.execute(_request(prompt=PROMPT, steps=1, duration=0.5))["audio"].shape == (8000,)


def test_media_flag_needs_adapters(tiny_model_dir, setup, tmp_path):
    with pytest.raises(FluxMusicError, match="has no image / story adapters"):
        build_repository(tiny_model_dir, setup["onnx"], tmp_path / "repo", options=RepoOptions(media=True))


# ----------------------------------------------------------------------------------------- image / story
def _conditioning_error(bls, pipe, **media) -> tuple[float, float]:
    """Max-abs and cosine of the BLS's mixed conditioning against the pipeline's (both streams)."""
    req = bls.prepare(_request(prompt=PROMPT, **media))
    got = bls.pipeline._conditioning([PROMPT], bls.pipeline.media_conditioning(req.media))
    ref_req = pipe.request(PROMPT, **{k: v for k, v in media.items()})
    want = pipe._conditioning([PROMPT], pipe.media_conditioning(ref_req.media))
    a = torch.cat([got.txt.flatten(), got.y.flatten()])
    b = torch.cat([want.txt.flatten(), want.y.flatten()])
    return float((a - b).abs().max()), float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("media", [
    {"image": IMAGE, "story": STORY, "image_weight": 0.7},
    {"image": IMAGE},
    {"story": STORY, "story_weight": 2.0},
])
def test_bls_image_story_conditioning_and_audio_match_the_pipeline(bls, pipe, media):
    max_abs, cos = _conditioning_error(bls, pipe, **media)
    assert max_abs <= MAX_ABS and cos >= MIN_COS, (max_abs, cos)
    before = dict(bls.backend.calls)
    out = bls.execute(_request(prompt=PROMPT, duration=1.5, steps=3, seed=7, **media))
    ref = pipe(PROMPT, duration=1.5, steps=3, seed=7, **media)
    assert out["audio"].shape == ref.audio[0].shape == (24000,)
    assert _snr_db(ref.audio[0], out["audio"]) >= MIN_SNR_DB
    assert out["cfg_evaluations"].tolist() == [ref.cfg_evaluations] == [3.0]
    calls = {k: bls.backend.calls.get(k, 0) - before.get(k, 0) for k in MEDIA_NAMES}
    assert calls == {"image_encoder": int("image" in media), "image_adapter": int("image" in media),
                     "story_adapter": int("story" in media)}


def test_bls_image_alone_with_an_empty_prompt(bls, pipe):
    out = bls.execute(_request(prompt="", image=IMAGE, duration=1.0, steps=2, seed=1))
    ref = pipe("", image=IMAGE, duration=1.0, steps=2, seed=1)
    assert _snr_db(ref.audio[0], out["audio"]) >= MIN_SNR_DB


def _huge_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (4097, 4097)).save(buf, format="PNG")  # tiny file, 16.8 M pixels in its header
    return buf.getvalue()


@pytest.mark.parametrize("media", [
    {"image": b"not an image at all"},
    {"image": b""},
    {"image": "huge"},
    {"story": "   \n "},
    {"story": "x. " * 7000},
    {"image": IMAGE, "image_weight": -1.0},
    {"story": STORY, "image_weight": 0.5},
])
def test_bls_media_errors_are_the_pipelines(bls, pipe, media):
    media = {k: (_huge_png() if v == "huge" else v) for k, v in media.items()}
    with pytest.raises(FluxMusicError) as bls_error:
        bls.execute(_request(prompt=PROMPT, steps=1, duration=0.5, **media))
    with pytest.raises(FluxMusicError) as pipe_error:
        pipe(PROMPT, steps=1, duration=0.5, **media)
    assert str(bls_error.value) == str(pipe_error.value)


def test_bls_media_tensor_errors(bls):
    with pytest.raises(FluxMusicError, match="input 'image' must be the file's bytes"):
        bls.execute({**_request(prompt=PROMPT), "image": np.array(["a.png"], dtype=object)})
    with pytest.raises(FluxMusicError, match="input 'image' must hold exactly one value"):
        bls.execute({**_request(prompt=PROMPT), "image": np.array([IMAGE, IMAGE], dtype=object)})
    with pytest.raises(FluxMusicError, match="input 'story' is not valid UTF-8"):
        bls.execute({**_request(prompt=PROMPT), "story": np.array([b"\xff\xfe"], dtype=object)})


# ----------------------------------------------------------------------------------------- long form
def test_bls_long_form_matches_the_pipeline_and_streams_its_windows(bls, pipe):
    windows: list[dict] = []
    out = bls.execute(_request(prompt=PROMPT, duration=15.0, steps=2, seed=4), on_window=windows.append)
    ref = pipe(PROMPT, duration=15.0, steps=2, seed=4)
    assert ref.windows == 2 and out["audio"].shape == ref.audio[0].shape == (15 * 16000,)
    assert _snr_db(ref.audio[0], out["audio"]) >= MIN_SNR_DB
    # cost: one batched cond+uncond evaluation per step and window, as the joined pipeline result reports
    assert out["cfg_evaluations"].tolist() == [ref.cfg_evaluations] == [4.0]
    assert [(int(w["window"][0]), int(w["windows"][0])) for w in windows] == [(0, 2), (1, 2)]
    assert [int(w["start_sample"][0]) for w in windows] == [0, len(windows[0]["audio"])]
    np.testing.assert_array_equal(np.concatenate([w["audio"] for w in windows]), out["audio"])
    assert all(w["sample_rate"].tolist() == [16000] for w in windows)


def test_bls_long_form_sections_overlap_crossfade(bls, pipe):
    sections = ["0:8 slow piano", "8: fast drums"]
    out = bls.execute(_request(prompt="", sections=sections, duration=14.0, overlap=2.56, crossfade=0.25, steps=1,
                               seed=3))
    from fluxmusic.continuation import parse_section_strings

    ref = pipe("", sections=parse_section_strings(sections), duration=14.0, overlap=2.56, crossfade=0.25, steps=1,
               seed=3)
    assert ref.windows == 2 and _snr_db(ref.audio[0], out["audio"]) >= MIN_SNR_DB


@pytest.mark.parametrize("bls_kw, pipe_kw", [
    ({"duration": 301.0}, {"duration": 301.0}),
    ({"duration": 20.0, "overlap": 20.0}, {"duration": 20.0, "overlap": 20.0}),
    ({"duration": 20.0, "crossfade": -1.0}, {"duration": 20.0, "crossfade": -1.0}),
    ({"duration": 20.0, "sections": ["0:10 a", "12: b"]}, {"duration": 20.0, "sections": [(0, 10, "a"),
                                                                                          (12, float("inf"), "b")]}),
])
def test_bls_long_form_errors_are_the_pipelines(bls, pipe, bls_kw, pipe_kw):
    prompt = "" if "sections" in bls_kw else PROMPT
    with pytest.raises(FluxMusicError) as bls_error:
        bls.execute(_request(prompt=prompt, steps=1, **bls_kw))
    with pytest.raises(FluxMusicError) as pipe_error:
        pipe(prompt, steps=1, **pipe_kw)
    assert str(bls_error.value) == str(pipe_error.value)


def test_bls_sections_errors_are_the_grpc_servers(bls):
    from fluxmusic.continuation import parse_section_strings

    with pytest.raises(FluxMusicError) as grpc_error:
        parse_section_strings(["drums"])  # what runtime.validation.parse_request calls for GenerateRequest.sections
    with pytest.raises(FluxMusicError) as bls_error:
        bls.execute(_request(prompt="", sections=["drums"], duration=14.0, steps=1))
    assert str(bls_error.value) == str(grpc_error.value) and "sections" in str(bls_error.value)
    with pytest.raises(FluxMusicError, match="give the prompt or prompt sections, not both"):
        bls.execute(_request(prompt=PROMPT, sections=["0: drums"], duration=14.0, steps=1))


# ----------------------------------------------------------------------------------------- model.py, decoupled
def test_model_py_streams_long_form_windows_in_decoupled_mode(setup, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_triton_repo import _FakePbUtils, _load_triton_model, _Request
    finally:
        sys.path.pop(0)
    repo = setup["repo"]
    pb = _FakePbUtils(_infer(repo))
    model = _load_triton_model(repo, pb, monkeypatch, decoupled=True)
    good = _Request(pb, _request(prompt="", story=STORY, duration=12.0, steps=2, seed=2))
    bad = _Request(pb, _request(prompt=PROMPT, image=b"garbage", steps=1))
    assert model.execute([good, bad]) is None
    kinds = []
    for response, flags in pb.sent:
        names = {t.name() for t in response.output_tensors()} if not response.has_error() else {"error"}
        kinds.append(("window" if "window" in names else "progress" if "step" in names else
                      "error" if "error" in names else "final", flags))
    # 2 windows x 2 steps: progress, progress, window 0, progress, progress, window 1, final; then the bad one
    assert kinds == [("progress", 0)] * 2 + [("window", 0)] + [("progress", 0)] * 2 + [("window", 0)] + [
        ("final", pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL), ("error", pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)]
    tensors = [{t.name(): t.as_numpy() for t in r.output_tensors()} for r, _ in pb.sent[:-1]]
    final = tensors[-1]
    assert final["audio"].shape == (12 * 16000,) and final["cfg_evaluations"].tolist() == [4.0]
    np.testing.assert_array_equal(np.concatenate([t["audio"] for t in tensors if "window" in t]), final["audio"])
    err = pb.sent[-1][0].error()
    assert "image bytes cannot be decoded" in err.message() and err.code == pb.TritonError.INVALID_ARG


def test_cli_media_flags(setup, tmp_path, capsys):
    import argparse

    from fluxmusic.export.triton_commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def run(*argv: str) -> int:
        args = parser.parse_args(["triton", "--model", str(setup["model"]), "--onnx", str(setup["onnx"]), *argv])
        return args.func(args)

    assert run("--out", str(tmp_path / "without"), "--no-media") == 0
    assert not any((tmp_path / "without" / m).exists() for m in MEDIA_NAMES)
    assert run("--out", str(tmp_path / "with"), "--media") == 0
    assert all((tmp_path / "with" / m / "config.pbtxt").is_file() for m in MEDIA_NAMES)
    assert "wrote Triton repository" in capsys.readouterr().out
