"""ONNX export of the tiny model directory, parity validation, the onnxruntime backend, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from fluxmusic.export.onnx_export import (  # noqa: E402
    MANIFEST,
    _load_context,
    example_inputs,
    export_onnx,
    graph_float64,
    op_counts,
    read_manifest,
)
from fluxmusic.export.spec import COMPONENT_NAMES, STEP_NAME  # noqa: E402
from fluxmusic.export.validate import reference_euler_step, validate  # noqa: E402

from fluxmusic.cli import main  # noqa: E402
from fluxmusic.errors import FluxMusicError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from fluxmusic.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def onnx_dir(tiny_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(tiny_dir, out, step_graph=True, int8=True, progress=None)
    return out


@pytest.fixture(scope="module")
def report(tiny_dir, onnx_dir):
    from fluxmusic.backend import make_backend
    from fluxmusic.modeldir import read_index

    index = read_index(tiny_dir)
    cands = {
        "onnx fp32": make_backend("onnx", tiny_dir, index, "cpu", torch.float32, onnx_dir=onnx_dir),
        "onnx int8": make_backend("onnx", tiny_dir, index, "cpu", torch.float32, onnx_dir=onnx_dir, variant="int8"),
    }
    return validate(tiny_dir, cands, {"onnx int8": "int8"}, steps=3, duration=2.56)


def _row(report, variant, component, inputs):
    (row,) = [r for r in report.rows if (r.variant, r.component, r.inputs) == (variant, component, inputs)]
    return row


# ------------------------------------------------------------------------------------------ the files
def test_export_writes_every_component_with_manifest_and_metadata(tiny_dir, onnx_dir):
    manifest = read_manifest(onnx_dir)
    assert set(manifest["components"]) == {*COMPONENT_NAMES, STEP_NAME}
    assert set(manifest["components"]["transformer"]["variants"]) == {"fp32", "int8"}
    for comp, entry in manifest["components"].items():
        for variant, f in entry["variants"].items():
            path = onnx_dir / f["file"]
            assert path.is_file()
            onnx.checker.check_model(str(path), full_check=True)
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            assert meta["fluxmusic.component"] == comp
            assert meta["fluxmusic.variant"] == variant
            assert meta["fluxmusic.config_sha256"] == entry["config_sha256"]
            assert meta["fluxmusic.source_sha256"] == entry["source_sha256"]
            assert "torch.onnx" in meta["fluxmusic.exporter"] and meta["fluxmusic.opset"] == "18"
            assert json.loads(meta["fluxmusic.config"]) == entry["config"]
    # no temporary leftovers
    assert not [p for p in onnx_dir.iterdir() if p.name.startswith(".")]


def test_no_float64_and_no_data_dependent_shapes(onnx_dir):
    for path in onnx_dir.glob("*.onnx"):
        proto = onnx.load(str(path), load_external_data=False)
        assert graph_float64(proto.graph) == [], path.name
    ops = op_counts(onnx_dir / "transformer.onnx")
    # data-dependent shapes come from these; the transformer has none
    assert not {"NonZero", "Unique", "Where", "Loop", "If", "Compress", "SplitToSequence"} & set(ops)
    assert ops["Softmax"] >= 2 and ops["MatMul"] > 0  # SDPA decomposed at opset 18: MatMul-Softmax-MatMul


def test_dynamic_axes_follow_the_spec(tiny_dir, onnx_dir):
    ctx = _load_context(tiny_dir)
    for comp in (*COMPONENT_NAMES, STEP_NAME):
        proto = onnx.load(str(onnx_dir / f"{comp}.onnx"), load_external_data=False)
        spec = ctx.specs[comp]
        by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
        for vi in (*proto.graph.input, *proto.graph.output):
            got = tuple(d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim)
            assert got == by_name[vi.name].shape, (comp, vi.name)


def test_transformer_runs_at_other_lengths(tiny_dir, onnx_dir):
    """Any consistent dims run: the graph derives RoPE from the lengths (music token i at row i // 8, col i % 8
    of the 8-wide patch grid), matching torch's float64-derived table."""
    from fluxmusic.transformer_io import load_transformer

    model = load_transformer(tiny_dir / "transformer")
    sess = ort.InferenceSession(str(onnx_dir / "transformer.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x", "t", "txt", "y"]
    for b, lt, gh in ((1, 5, 8), (3, 16, 40), (1, 1, 1), (2, 256, 300)):
        x, t = torch.randn(b, gh * 8, 32), torch.rand(b)
        txt, y = torch.randn(b, lt, 48), torch.randn(b, 32)
        out = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "txt": txt.numpy(), "y": y.numpy()})
        with torch.no_grad():
            ref = model(x, t, txt, y, model.rope_for(lt, gh, 8))
        assert np.abs(out[0] - ref.numpy()).max() <= 1e-4, (b, lt, gh)


# ------------------------------------------------------------------------------------------ stock tools
def _polygraphy() -> str | None:
    import shutil
    import sys

    here = Path(sys.executable).parent / "polygraphy"
    return str(here) if here.is_file() else shutil.which("polygraphy")


@pytest.mark.skipif(_polygraphy() is None, reason="polygraphy is not installed (it is in the dev extra)")
def test_polygraphy_runs_every_exported_graph(onnx_dir):
    """NVIDIA's polygraphy fills every dynamic dim with 1 and runs the graph on onnxruntime: no hidden rule
    between dims (such as a RoPE table's length = text + music) may make a graph fail in a stock tool."""
    import os
    import subprocess

    graphs = sorted(onnx_dir.glob("*.onnx"))
    assert {p.name for p in graphs} >= {"t5.onnx", "transformer.onnx", "euler_step.onnx", "transformer.int8.onnx"}
    env = {**os.environ, "POLYGRAPHY_AUTOINSTALL_DEPS": "0"}
    for path in graphs:
        r = subprocess.run(
            [_polygraphy(), "run", str(path), "--onnxrt"], capture_output=True, text=True, timeout=600, env=env
        )
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "PASSED" in out, f"polygraphy run {path.name} --onnxrt:\n{out[-3000:]}"


# ------------------------------------------------------------------------------------------ parity
def test_validate_meets_the_acceptance_limits(report):
    for inputs in ("random", "real"):
        assert _row(report, "onnx fp32", "transformer", inputs).max_abs <= 1e-4
        assert _row(report, "onnx fp32", "vae_decoder", inputs).cosine >= 0.9999
        assert _row(report, "onnx fp32", "vocoder", inputs).cosine >= 0.9999
        assert _row(report, "onnx fp32", "euler_step", inputs).max_abs <= 1e-4
    assert _row(report, "onnx fp32", "end-to-end", "seed 0").snr_db >= 40
    # int8 is reported like any other variant
    assert _row(report, "onnx int8", "transformer", "real").cosine > 0.99
    assert _row(report, "onnx int8", "end-to-end", "seed 0").snr_db is not None
    assert report.ok, report.table()
    data = json.loads(report.to_json())
    assert data["ok"] and len(data["rows"]) == len(report.rows)


def test_step_graph_equals_one_euler_cfg_step_of_torch(tiny_dir, onnx_dir):
    from fluxmusic.backend import StepBackend, TorchBackend, fused_step, make_backend
    from fluxmusic.modeldir import read_index

    index = read_index(tiny_dir)
    be = make_backend("onnx", tiny_dir, index, "cpu", torch.float32, onnx_dir=onnx_dir)
    assert isinstance(be, StepBackend) and fused_step(be) is be
    ref = TorchBackend(tiny_dir, index)
    inp = example_inputs(_load_context(tiny_dir), STEP_NAME, batch=3, seed=5)
    inp["rope"] = ref.rope(inp["txt"].shape[1], inp["x"].shape[1] // 8, 8)
    out = be.euler_step(**inp)
    expected = reference_euler_step(ref, **inp)
    assert (out - expected).abs().max() <= 1e-5
    # ... and the one sampler loop with the step graph as its step function equals the torch Euler CFG solve
    from fluxmusic.flow import Conditioning, cfg_velocity, sample

    x = inp["x"]
    vel = cfg_velocity(
        ref.velocity,
        Conditioning(inp["txt"], inp["y"]),
        Conditioning(inp["null_txt"], inp["null_y"]),
        inp["guidance"],
        inp["rope"],
    )
    want = sample(vel, x, 4)
    cond = (inp["txt"], inp["y"], inp["null_txt"], inp["null_y"], inp["guidance"], inp["rope"])
    got = sample(None, x, 4, step_fn=lambda xx, tt, dt: be.euler_step(xx, tt, dt, *cond))
    assert (got - want).abs().max() <= 1e-4


def test_validate_fails_when_a_weight_is_perturbed(tiny_dir, onnx_dir, tmp_path):
    """Perturb one transformer weight inside the exported graph: the parity check must catch it."""
    from onnx import numpy_helper

    bad = tmp_path / "bad"
    shutil.copytree(onnx_dir, bad)
    proto = onnx.load(str(bad / "transformer.onnx"))
    init = max(proto.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(bad / "transformer.onnx"))
    _rehash(bad, "transformer.onnx")  # a wrong export, not a corrupted one: the checksums agree, parity must not
    code = main(
        [
            "export",
            "validate",
            "--model",
            str(tiny_dir),
            "--onnx",
            str(bad),
            "--variants",
            "fp32",
            "--steps",
            "2",
            "--duration",
            "1.28",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 1
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert any(r["component"] == "transformer" and not r["ok"] for r in rows)


def test_validate_fails_when_the_model_weight_is_perturbed(tiny_dir, onnx_dir, tmp_path):
    """The other way round: a changed torch weight is a model/ONNX mismatch; forced past the hash check,
    the numbers fail."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    w = model / "transformer" / "model.safetensors"
    state = load_file(str(w))
    # one element (a constant added to a whole row would be removed by the LayerNorms)
    state["img_in.weight"][0, 0] += 0.5
    save_file(state, str(w), metadata={"format": "pt"})
    args = [
        "export",
        "validate",
        "--model",
        str(model),
        "--onnx",
        str(onnx_dir),
        "--variants",
        "fp32",
        "--steps",
        "2",
        "--duration",
        "1.28",
    ]
    with pytest.raises(FluxMusicError, match="model/ONNX mismatch.*transformer.*files"):
        _run(args)
    assert main([*args, "--allow-mismatch"]) == 1


def _run(argv):
    from fluxmusic.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------------------------------ the backend
def test_pipeline_on_the_onnx_backend_from_the_cli(tiny_dir, onnx_dir, tmp_path, caplog):
    out = tmp_path / "a.wav"
    code = main(
        [
            "generate",
            "a slow piano melody",
            "-o",
            str(out),
            "--model",
            str(tiny_dir),
            "--backend",
            "onnx",
            "--onnx-dir",
            str(onnx_dir),
            "--seed",
            "1",
            "--duration",
            "1.28",
            "--quiet",
        ]
    )
    assert code == 0
    import soundfile as sf

    wave, sr = sf.read(str(out))
    assert sr == 16000 and len(wave) == int(1.28 * 16000) and np.isfinite(wave).all()


def test_pipeline_uses_the_fused_step_graph_for_euler(tiny_dir, onnx_dir):
    """With a step graph, each Euler CFG step is one ORT call (no per-step velocity call) and the audio equals
    the torch pipeline's; other solvers still go through velocity."""
    from fluxmusic.pipeline import FluxMusicPipeline

    torch_pipe = FluxMusicPipeline.from_pretrained(tiny_dir, dtype="fp32")
    onnx_pipe = FluxMusicPipeline.from_pretrained(tiny_dir, backend="onnx", onnx_dir=onnx_dir)
    assert onnx_pipe.backend.has_step_graph
    calls = []
    real_velocity = onnx_pipe.backend.velocity
    onnx_pipe.backend.velocity = lambda *a: calls.append(1) or real_velocity(*a)
    kw = dict(duration=1.0, steps=3, guidance=3.0, seed=4)
    fused = onnx_pipe("calm pad", solver="euler", **kw).audio[0]
    assert calls == []
    ref = torch_pipe("calm pad", solver="euler", **kw).audio[0]
    snr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((fused - ref).astype(np.float64) ** 2))
    assert snr >= 40
    onnx_pipe("calm pad", solver="heun", **kw)
    assert len(calls) == 2 * 3 - 1


def test_missing_component_falls_back_to_torch_with_a_log_line(tiny_dir, onnx_dir, tmp_path, caplog):
    import logging

    from fluxmusic.pipeline import FluxMusicPipeline

    part = tmp_path / "part"
    shutil.copytree(onnx_dir, part)
    (part / "vocoder.onnx").unlink()
    with caplog.at_level(logging.WARNING, logger="fluxmusic.onnx"):
        pipe = FluxMusicPipeline.from_pretrained(tiny_dir, backend="onnx", onnx_dir=part)
    assert "vocoder" in caplog.text and "torch" in caplog.text
    assert "vocoder" in pipe.backend.fallback and "transformer" in pipe.backend.graphs
    ref = FluxMusicPipeline.from_pretrained(tiny_dir, dtype="fp32")
    a = pipe("a calm guitar", seed=2, duration=1.28).audio[0]
    b = ref("a calm guitar", seed=2, duration=1.28).audio[0]
    from fluxmusic.export.validate import snr_db

    assert snr_db(a, b) >= 40


def test_provider_order_and_override(tiny_dir, onnx_dir):
    from fluxmusic.runtime.onnx_backend import PROVIDER_ORDER, OnnxBackend, default_providers

    from fluxmusic.modeldir import read_index

    provs = default_providers()
    assert provs[-1] == "CPUExecutionProvider"
    assert provs == [p for p in PROVIDER_ORDER if p in ort.get_available_providers()]
    be = OnnxBackend(
        tiny_dir,
        read_index(tiny_dir),
        onnx_dir=onnx_dir,
        providers=["CPUExecutionProvider"],
        graph_optimization_level="basic",
        intra_op_threads=1,
        inter_op_threads=1,
    )
    assert be.providers == ["CPUExecutionProvider"]
    with pytest.raises(FluxMusicError, match="graph optimisation level 'max'"):
        OnnxBackend(tiny_dir, read_index(tiny_dir), onnx_dir=onnx_dir, graph_optimization_level="max")


# ------------------------------------------------------------------------------------------ bad inputs
def test_missing_onnx_dir_and_missing_manifest(tiny_dir, tmp_path):
    from fluxmusic.pipeline import FluxMusicPipeline

    with pytest.raises(FluxMusicError, match="needs an exported ONNX directory"):
        FluxMusicPipeline.from_pretrained(tiny_dir, backend="onnx")
    with pytest.raises(FluxMusicError, match="does not exist"):
        FluxMusicPipeline.from_pretrained(tiny_dir, backend="onnx", onnx_dir=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FluxMusicError, match="has no manifest.json"):
        FluxMusicPipeline.from_pretrained(tiny_dir, backend="onnx", onnx_dir=tmp_path / "empty")


def test_corrupt_onnx_file_gives_a_clear_error(tiny_dir, onnx_dir, tmp_path, capsys):
    bad = tmp_path / "corrupt"
    shutil.copytree(onnx_dir, bad)
    data = (bad / "vae_decoder.onnx").read_bytes()
    (bad / "vae_decoder.onnx").write_bytes(data[: len(data) // 3])
    code = main(
        args := [
            "generate",
            "a song",
            "-o",
            str(tmp_path / "x.wav"),
            "--model",
            str(tiny_dir),
            "--backend",
            "onnx",
            "--onnx-dir",
            str(bad),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "vae_decoder.onnx fails its checksum" in err and "Traceback" not in err  # caught before onnxruntime
    _rehash(bad, "vae_decoder.onnx")  # the manifest agrees with the broken file: onnxruntime's turn
    assert main(args) == 2
    assert "vae_decoder.onnx cannot be loaded by onnxruntime" in capsys.readouterr().err


def _rehash(onnx_dir: Path, fname: str) -> None:
    """Record ``fname``'s current checksums in the manifest, as if the export had written it so."""
    from fluxmusic.export.onnx_export import MANIFEST, sha256_file

    manifest = json.loads((onnx_dir / MANIFEST).read_text())
    for comp in manifest["components"].values():
        for entry in comp.get("variants", {}).values():
            if entry.get("file") == fname:
                entry["sha256"] = sha256_file(onnx_dir / fname)
                if entry.get("external_data"):
                    entry["external_data_sha256"] = sha256_file(onnx_dir / entry["external_data"])
    (onnx_dir / MANIFEST).write_text(json.dumps(manifest))


def test_model_onnx_mismatch_config_hash(tiny_dir, onnx_dir, tmp_path, capsys):
    """Another model directory (different transformer config) with this export: refused at load."""
    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    cfg_path = other / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["theta"] = 9999
    cfg_path.write_text(json.dumps(cfg))
    code = main(
        [
            "generate",
            "a song",
            "-o",
            str(tmp_path / "x.wav"),
            "--model",
            str(other),
            "--backend",
            "onnx",
            "--onnx-dir",
            str(onnx_dir),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "model/ONNX mismatch" in err and "transformer (config" in err


def test_export_cli_bad_values(tiny_dir, tmp_path, capsys):
    assert main(["export", "onnx", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--opset", "9"]) == 2
    assert "opset 9 is not supported" in capsys.readouterr().err
    assert main(["export", "onnx", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--components", "unet"]) == 2
    assert "unknown component 'unet'" in capsys.readouterr().err
    assert main(["export", "validate", "--model", str(tiny_dir)]) == 2
    assert "nothing to validate" in capsys.readouterr().err


def test_export_cli_one_component_with_progress(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["export", "onnx", "--model", str(tiny_dir), "--out", str(out), "--components", "vocoder"]) == 0
    cap = capsys.readouterr()
    assert "[1/1] vocoder (fp32): wrote vocoder.onnx" in cap.err
    assert set(read_manifest(out)["components"]) == {"vocoder"} and (out / MANIFEST).is_file()


def test_int8_backend_runs_the_int8_transformer_not_the_fp32_step_graph(tiny_dir, onnx_dir):
    """The export has an fp32 step graph only: an int8 backend must loop over the int8 transformer, else its
    end-to-end check would measure fp32."""
    from fluxmusic.backend import fused_step, make_backend
    from fluxmusic.modeldir import read_index

    index = read_index(tiny_dir)
    fp32 = make_backend("onnx", tiny_dir, index, "cpu", torch.float32, onnx_dir=onnx_dir)
    int8 = make_backend("onnx", tiny_dir, index, "cpu", torch.float32, onnx_dir=onnx_dir, variant="int8")
    assert fused_step(fp32) is not None
    assert fused_step(int8) is None
    assert "transformer.int8.onnx" in str(int8.graphs["transformer"].path)
