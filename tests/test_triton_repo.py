"""Triton model repository: generation, validation with Triton's protobuf schema, and the BLS logic end to end.

The BLS model's logic runs with onnxruntime sessions of the repository's own model files standing in for the
Triton BLS calls, and must give the pipeline's audio for the same seed. Tolerance: torch (pipeline, eager fp32)
vs onnxruntime (fp32) waveform SNR >= 40 dB; measured here well above 100 dB on the tiny model.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
from fluxmusic.export.spec import COMPONENT_NAMES
from fluxmusic.export.triton_check import check_repository
from fluxmusic.export.triton_repo import RepoOptions, build_repository
from fluxmusic.runtime.triton_bls import FluxMusicBls, OnnxRuntimeInfer
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fluxmusic.errors import FluxMusicError

PROMPT = "a slow calm piano melody"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fluxmusic.export.onnx_export import export_onnx

    from fluxmusic.tiny import build_tiny_model_dir

    root = tmp_path_factory.mktemp("triton")
    model_dir = build_tiny_model_dir(root / "model")
    export_onnx(model_dir, root / "onnx", progress=None)  # the project's exporter: <component>.onnx + manifest
    repo = build_repository(model_dir, root / "onnx", root / "repo")
    return {"root": root, "model": model_dir, "onnx": root / "onnx", "repo": repo}


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _dims(entries) -> dict[str, tuple[str, list[int]]]:
    return {e.name: (model_config_pb2.DataType.Name(e.data_type), list(e.dims)) for e in entries}


# ----------------------------------------------------------------------------------------- generation
def test_repository_configs_parse_with_triton_schema(setup):
    repo = setup["repo"]
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    assert names == sorted((*COMPONENT_NAMES, "fluxmusic"))
    configs = {n: _parse(repo / n / "config.pbtxt") for n in names}
    for name in COMPONENT_NAMES:
        cfg = configs[name]
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx"
        assert (repo / name / "1" / "model.onnx").is_file()
        assert cfg.instance_group[0].count == 1
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    # Every component is batchable by Triton: the transformer derives RoPE in the graph (no shared batch-1 input).
    for name in COMPONENT_NAMES:
        assert configs[name].max_batch_size == 8 and configs[name].HasField("dynamic_batching"), name

    null_width = 48  # the tiny T5's d_model
    assert _dims(configs["t5"].input) == {"input_ids": ("TYPE_INT64", [-1])}
    assert _dims(configs["t5"].output) == {"last_hidden_state": ("TYPE_FP32", [-1, null_width])}
    assert _dims(configs["transformer"].input) == {
        "x": ("TYPE_FP32", [-1, 32]),
        "t": ("TYPE_FP32", []),
        "txt": ("TYPE_FP32", [-1, null_width]),
        "y": ("TYPE_FP32", [32]),
    }
    assert _dims(configs["vae_decoder"].input) == {"latent": ("TYPE_FP32", [8, -1, 16])}

    bls = configs["fluxmusic"]
    assert bls.backend == "python" and bls.max_batch_size == 0 and not bls.model_transaction_policy.decoupled
    inputs = {e.name: e for e in bls.input}
    assert list(inputs) == ["prompt", "negative_prompt", "duration", "steps", "guidance", "seed", "solver", "shift",
                            "preset", "guidance_interval_min", "guidance_interval_max", "cache_threshold",
                            "audio", "audio_sample_rate", "keep", "regenerate", "mode",
                            "guidance_schedule", "blend", "resample", "splice", "overlap", "crossfade", "sections",
                            "image", "story", "image_weight", "story_weight", "conditioning", "bpm", "register"]
    assert not inputs["prompt"].optional and all(inputs[n].optional for n in list(inputs)[1:])
    version = repo / "fluxmusic" / "1"
    for f in ("model.py", "model_index.json", "null_embeddings.safetensors", "transformer_config.json",
              "step_cache_probe.safetensors"):
        assert (version / f).is_file(), f
    assert (version / "tokenizer" / "tokenizer.json").is_file()
    assert (version / "clap_tokenizer" / "tokenizer.json").is_file()
    assert len(check_repository(repo)) == 6 + 2 * len(COMPONENT_NAMES)


MISMATCHES = [
    # (file, old text, new text, words the error must contain)
    (
        "transformer",
        '{ name: "x", data_type: TYPE_FP32, dims: [ -1, 32 ] }',  # batched by Triton: the batch dim is implicit
        '{ name: "x", data_type: TYPE_FP32, dims: [ -1, 31 ] }',
        ["transformer/config.pbtxt", "'x'", "[-1, 31]"],
    ),
    ("t5", "TYPE_INT64", "TYPE_INT32", ["t5/config.pbtxt", "'input_ids'", "TYPE_INT32"]),
    ("vocoder", '"waveform"', '"audio"', ["vocoder/config.pbtxt", "'waveform'"]),
    ("clap", "max_batch_size: 8", "max_batch_size: 0", ["clap/config.pbtxt", "'input_ids'"]),
    (
        "fluxmusic",
        '{ name: "seed", data_type: TYPE_INT64',
        '{ name: "seed", data_type: TYPE_FP32',
        ["fluxmusic/config.pbtxt", "'seed'", "TYPE_INT64"],
    ),
    ("vae_decoder", "max_batch_size:", "max_batch:", ["vae_decoder/config.pbtxt", "does not parse"]),
]


@pytest.mark.parametrize("model, old, new, words", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_check_catches_a_mismatched_config(setup, tmp_path, model, old, new, words):
    repo = shutil.copytree(setup["repo"], tmp_path / "repo")
    path = repo / model / "config.pbtxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(FluxMusicError) as e:
        check_repository(repo)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_cli_generate_check_and_errors(setup, tmp_path, capsys):
    from fluxmusic.export.triton_commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def run(*argv: str) -> int:
        args = parser.parse_args(["triton", *argv])
        return args.func(args)

    out = tmp_path / "repo"
    common = ["--model", str(setup["model"]), "--onnx", str(setup["onnx"])]
    assert run(*common, "--out", str(out), "--decoupled", "--bls-instances", "2", "--max-batch-size", "4") == 0
    bls = _parse(out / "fluxmusic" / "config.pbtxt")
    assert bls.model_transaction_policy.decoupled and bls.instance_group[0].count == 2
    assert _parse(out / "vocoder" / "config.pbtxt").max_batch_size == 4
    assert run("--check", str(out)) == 0
    assert "all checks passed" in capsys.readouterr().out

    with pytest.raises(FluxMusicError, match="already exists"):
        run(*common, "--out", str(out))
    with pytest.raises(FluxMusicError, match="max batch size 0"):
        run(*common, "--out", str(tmp_path / "r2"), "--max-batch-size", "0")
    partial = tmp_path / "onnx_partial"
    shutil.copytree(setup["onnx"], partial)
    (partial / "vocoder.onnx").unlink()
    with pytest.raises(FluxMusicError, match="vocoder.onnx"):
        run("--model", str(setup["model"]), "--onnx", str(partial), "--out", str(tmp_path / "r3"))
    other = shutil.copytree(setup["model"], tmp_path / "other_model")
    (other / "vocoder" / "config.json").write_text((other / "vocoder" / "config.json").read_text() + "\n")
    with pytest.raises(FluxMusicError, match="model/ONNX mismatch"):  # graphs exported from another model
        run("--model", str(other), "--onnx", str(setup["onnx"]), "--out", str(tmp_path / "r4"))
    assert not any((tmp_path / r).exists() for r in ("r2", "r3", "r4"))
    assert not list(tmp_path.glob(".r*"))  # no half-written temporary directories left


def test_external_data_travels_with_the_graph(setup, tmp_path):
    """Large graphs keep their weights in external-data files, which must sit next to model.onnx."""
    import onnx

    onnx_dir = shutil.copytree(setup["onnx"], tmp_path / "onnx")
    graph = onnx.load(str(onnx_dir / "t5.onnx"))
    onnx.save_model(
        graph, str(onnx_dir / "t5.onnx"), save_as_external_data=True, location="t5.weights", size_threshold=4096
    )
    repo = build_repository(setup["model"], onnx_dir, tmp_path / "repo")
    assert (repo / "t5" / "1" / "t5.weights").is_file()
    infer = OnnxRuntimeInfer({"t5": repo / "t5" / "1" / "model.onnx"})
    assert infer("t5", {"input_ids": np.ones((1, 16), np.int64)})["last_hidden_state"].shape == (1, 16, 48)
    (onnx_dir / "t5.weights").unlink()
    with pytest.raises(FluxMusicError, match="t5.weights"):
        build_repository(setup["model"], onnx_dir, tmp_path / "repo2")


def test_engines_give_tensorrt_plan_models(setup, tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    # Engine names as `fluxmusic export tensorrt` writes them, or plain <component>.plan.
    for c in COMPONENT_NAMES:
        name = f"{c}.trt10.8.fp16.sm89.plan" if c == "transformer" else f"{c}.plan"
        (engines / name).write_bytes(b"engine bytes of " + c.encode())
    repo = build_repository(setup["model"], setup["onnx"], tmp_path / "repo", engines)
    for c in COMPONENT_NAMES:
        cfg = _parse(repo / c / "config.pbtxt")
        assert cfg.platform == "tensorrt_plan"
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert (repo / c / "1" / "model.plan").read_bytes() == b"engine bytes of " + c.encode()
    check_repository(repo)  # against the ONNX I/O recorded at generation time

    # Config and recorded graph agree with each other but not with what the BLS model reads: still caught.
    bad = shutil.copytree(repo, tmp_path / "bad")
    for f in (bad / "vocoder" / "config.pbtxt", bad / "fluxmusic" / "1" / "components.json"):
        f.write_text(f.read_text().replace('"waveform"', '"wave"'))
    with pytest.raises(FluxMusicError) as e:
        check_repository(bad)
    assert "vocoder/config.pbtxt: the BLS model reads output 'waveform'" in str(e.value)
    assert "graph" not in str(e.value)

    (engines / "transformer.trt10.8.fp32.sm89.plan").write_bytes(b"x")
    with pytest.raises(FluxMusicError, match="several transformer engines"):
        build_repository(setup["model"], setup["onnx"], tmp_path / "repo2", engines)
    repo3 = build_repository(
        setup["model"], setup["onnx"], tmp_path / "repo3", engines, RepoOptions(), engine_precision="fp32"
    )
    assert (repo3 / "transformer" / "1" / "model.plan").read_bytes() == b"x"


# ----------------------------------------------------------------------------------------- BLS logic
@pytest.fixture(scope="module")
def bls(setup):
    repo = setup["repo"]
    infer = OnnxRuntimeInfer({c: repo / c / "1" / "model.onnx" for c in COMPONENT_NAMES})
    return FluxMusicBls(repo / "fluxmusic" / "1", infer)


@pytest.fixture(scope="module")
def pipeline(setup):
    from fluxmusic.pipeline import FluxMusicPipeline

    return FluxMusicPipeline.from_pretrained(setup["model"], dtype="fp32")


def _request(**kw) -> dict[str, np.ndarray]:
    types = {"duration": np.float32, "steps": np.int32, "guidance": np.float32, "seed": np.int64, "shift": np.float32,
             "guidance_interval_min": np.float32, "guidance_interval_max": np.float32, "cache_threshold": np.float32}
    req = {}
    for k, v in kw.items():
        req[k] = np.array([v.encode()], dtype=object) if isinstance(v, str) else np.array([v], dtype=types[k])
    return req


def _snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - out) ** 2.0), 1e-300)))


@pytest.mark.parametrize("negative", ["", "low quality"])
def test_bls_on_onnxruntime_equals_pipeline(bls, pipeline, negative):
    prompt = PROMPT + (" with drums" if negative else "")  # not in the BLS's prompt cache yet
    calls_before = dict(bls.backend.calls)
    seen = []
    req = _request(prompt=prompt, negative_prompt=negative, duration=1.5, steps=3, guidance=4.0, seed=11)
    out = bls.execute(req, progress=lambda i, n: seen.append((i, n)))
    ref = pipeline(prompt, negative_prompt=negative, duration=1.5, steps=3, guidance=4.0, seed=11)

    audio = out["audio"]
    assert audio.dtype == np.float32 and audio.shape == ref.audio[0].shape == (24000,)
    assert out["seed_used"].tolist() == [11] and out["sample_rate"].tolist() == [16000]
    assert np.abs(ref.audio[0]).max() > 0
    assert _snr_db(ref.audio[0], audio) >= 40.0
    assert seen == [(1, 3), (2, 3), (3, 3)]

    calls = {k: bls.backend.calls[k] - calls_before[k] for k in calls_before}
    # One transformer request per step carries cond and uncond together; "" runs no encoder (precomputed).
    assert calls["transformer"] == 3 and calls["vae_decoder"] == calls["vocoder"] == 1
    assert calls["t5"] == calls["clap"] == (2 if negative else 1)


def test_bls_seed_defaults_and_determinism(bls):
    a = bls.execute(_request(prompt=PROMPT, duration=0.5, steps=1))
    b = bls.execute(_request(prompt=PROMPT, duration=0.5, steps=1, seed=int(a["seed_used"][0])))
    assert a["audio"].shape == (8000,)
    np.testing.assert_array_equal(a["audio"], b["audio"])


@pytest.mark.parametrize(
    "request_kw, words",
    [
        ({"negative_prompt": "x"}, ["'prompt'", "required"]),
        ({"prompt": "   "}, ["prompt"]),
        ({"prompt": PROMPT, "steps": 0}, ["steps 0"]),
        ({"prompt": PROMPT, "duration": 301.0}, ["duration 301.0"]),
        ({"prompt": PROMPT, "seed": -3}, ["seed -3"]),
        ({"prompt": PROMPT, "guidance": float("nan")}, ["guidance nan"]),
    ],
)
def test_bls_errors_name_the_bad_input(bls, request_kw, words):
    with pytest.raises(FluxMusicError) as e:
        bls.execute(_request(**request_kw))
    for w in words:
        assert w in str(e.value)


def test_bls_rejects_malformed_tensors(bls):
    with pytest.raises(FluxMusicError, match="'seed' must hold exactly one value"):
        bls.execute({**_request(prompt=PROMPT), "seed": np.array([1, 2], dtype=np.int64)})
    with pytest.raises(FluxMusicError, match="'steps' must be an integer"):
        bls.execute({**_request(prompt=PROMPT), "steps": np.array([2.5], dtype=np.float32)})
    with pytest.raises(FluxMusicError, match="unknown input"):
        bls.execute({**_request(prompt=PROMPT), "temperature": np.array([1.0])})


def test_client_example_sends_what_the_bls_model_declares():
    import importlib.util

    from fluxmusic.runtime.triton_bls import BLS_INPUTS

    path = Path(__file__).resolve().parents[1] / "triton_models" / "client_example.py"
    spec = importlib.util.spec_from_file_location("client_example", path)
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    inputs = client.build_inputs(PROMPT, "", 2.0, 4, 3.0, 5, "ab2", 1.0, "official", (0.0, 0.75), 0.1,
                                 np.zeros(1000, np.float32), 8000, "0:1", None, "continue", "cosine", 0.1, 1, True,
                                 2.56, 0.25, ["0:8 a", "8: b"], b"\x89PNG", "A story.", 0.5, 2.0,
                                 "trained", 96.0, "high")
    inputs += client.build_inputs(PROMPT, regenerate="0.5:1")[1:]
    sent = {i.name(): (i.datatype(), [-1 if n in ("audio", "sections") else d for d in i.shape()]) for i, n in
            ((i, i.name()) for i in inputs)}
    declared = {
        t.name: (t.data_type.removeprefix("TYPE_").replace("STRING", "BYTES"), list(t.dims)) for t in BLS_INPUTS
    }
    assert sent == declared
    assert [i.name() for i in client.build_inputs(PROMPT)] == ["prompt"]  # the rest take the model's defaults


# ----------------------------------------------------------------------------------------- model.py glue
class _FakePbUtils:
    """The slice of Triton's ``triton_python_backend_utils`` that model.py uses (no server here); BLS calls run
    on onnxruntime sessions of the repository's component models."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def __init__(self, infer: OnnxRuntimeInfer) -> None:
        self.sent: list = []  # (response, flags) sent by decoupled response senders

        class Tensor:
            def __init__(self, name, array):
                self._name, self._array = name, np.asarray(array)

            def name(self):
                return self._name

            def as_numpy(self):
                return self._array

            def is_cpu(self):
                return True

        class TritonError:
            INVALID_ARG, INTERNAL = 3, 13

            def __init__(self, message, code=None):
                self._message, self.code = message, code

            def message(self):
                return self._message

        class InferenceResponse:
            def __init__(self, output_tensors=(), error=None):
                self._tensors, self._error = list(output_tensors), error

            def has_error(self):
                return self._error is not None

            def error(self):
                return self._error

            def output_tensors(self):
                return self._tensors

        class InferenceRequest:
            def __init__(self, model_name, requested_output_names, inputs):
                self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

            def exec(self):
                out = infer(self.model_name, {t.name(): t.as_numpy() for t in self.inputs})
                return InferenceResponse([Tensor(n, out[n]) for n in self.outputs])

        self.Tensor, self.TritonError = Tensor, TritonError
        self.InferenceResponse, self.InferenceRequest = InferenceResponse, InferenceRequest
        self.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
        self.using_decoupled_model_transaction_policy = lambda cfg: cfg["model_transaction_policy"]["decoupled"]


class _Request:
    def __init__(self, pb: _FakePbUtils, arrays: dict[str, np.ndarray]) -> None:
        self.tensors = {k: pb.Tensor(k, v) for k, v in arrays.items()}
        self.pb = pb

    def get_response_sender(self):
        pb = self.pb

        class Sender:
            def send(self, response, flags=0):
                pb.sent.append((response, flags))

        return Sender()


def _load_triton_model(repo: Path, pb: _FakePbUtils, monkeypatch, decoupled: bool):
    """The repository's ``fluxmusic/1/model.py`` imported against the fake ``pb_utils`` and initialised as Triton
    would (its config's transaction policy decoupled or not)."""
    import importlib.util
    import json
    import sys

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("fluxmusic_triton_model", repo / "fluxmusic" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = {"name": "fluxmusic", "model_transaction_policy": {"decoupled": decoupled}}
    model.initialize(
        {"model_config": json.dumps(config), "model_repository": str(repo / "fluxmusic"), "model_version": "1"}
    )
    return model


@pytest.mark.parametrize("decoupled", [False, True])
def test_model_py_maps_requests_responses_and_errors(setup, monkeypatch, decoupled):
    repo = setup["repo"]
    pb = _FakePbUtils(OnnxRuntimeInfer({c: repo / c / "1" / "model.onnx" for c in COMPONENT_NAMES}))
    model = _load_triton_model(repo, pb, monkeypatch, decoupled)

    good = _Request(pb, _request(prompt=PROMPT, duration=0.5, steps=2, seed=3))
    bad = _Request(pb, _request(prompt=PROMPT, steps=0))
    responses = model.execute([good, bad])
    if decoupled:
        assert responses is None
        progress = [r for r, flags in pb.sent if flags == 0]
        assert [int(r.output_tensors()[0].as_numpy()[0]) for r in progress] == [1, 2]
        responses = [r for r, flags in pb.sent if flags == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL]
    ok, err = responses
    assert not ok.has_error()
    out = {t.name(): t.as_numpy() for t in ok.output_tensors()}
    assert out["audio"].dtype == np.float32 and out["audio"].shape == (8000,) and out["seed_used"].tolist() == [3]
    assert err.has_error() and "steps 0" in err.error().message() and err.error().code == pb.TritonError.INVALID_ARG
