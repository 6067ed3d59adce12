"""TensorRT: build planning (profiles, precision policy, engine names) on CPU; engine builds and parity on a GPU."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from fluxmusic.export.spec import component_specs
from fluxmusic.export.tensorrt_plan import (
    EngineName,
    ExportDescription,
    OnnxGraph,
    RequestLimits,
    default_component_precision,
    describe_onnx_dir,
    engine_name,
    find_engine,
    make_plan,
    parse_component_precisions,
    parse_durations,
    parse_engine_filename,
    short_version,
    sm_of,
)

from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.latent import LatentGeometry
from fluxmusic.modeldir import ModelIndex

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU with TensorRT; none here")

GEO = LatentGeometry()  # the published geometry: 10.24 s = 256 latent frames = 1024 tokens
INDEX = ModelIndex(GEO, t5_max_length=256, clap_max_length=77)
CFG = FluxMusicConfig()  # small: head_dim 32


def description(graphs: dict | None = None) -> ExportDescription:
    specs = component_specs(CFG, GEO, CFG.context_in_dim, CFG.vec_in_dim, include_step=True)
    if graphs:  # as describe_onnx_dir: only the components the export holds
        specs = {c: s for c, s in specs.items() if c in graphs}
    return ExportDescription(specs, INDEX, graphs or {})


def plan(precision="fp16", limits=None, **kw):
    return make_plan(
        description(kw.pop("graphs", None)), precision, limits or RequestLimits(), "10.8.0.43", (8, 9), **kw
    )


def build_of(p, component):
    return next(b for b in p.builds if b.component == component)


def test_modules_import_without_tensorrt_or_gpu():
    for name in (
        "fluxmusic.export.tensorrt_plan",
        "fluxmusic.export.tensorrt_build",
        "fluxmusic.export.tensorrt_commands",
        "fluxmusic.runtime.tensorrt_engine",
        "fluxmusic.runtime.tensorrt_backend",
    ):
        importlib.import_module(name)


# ------------------------------------------------------------------------------------------- engine names
def test_engine_name_carries_version_precision_and_gpu():
    n = engine_name("transformer", "10.8.0.43", "fp16", (8, 9))
    assert n.filename == "transformer.trt10.8.fp16.sm89.plan"
    assert parse_engine_filename(n.filename) == n
    assert parse_engine_filename("vae_decoder.trt10.12.fp32.sm120.plan") == EngineName(
        "vae_decoder", "10.12", "fp32", 120
    )
    for bad in ("transformer.plan", "transformer.trt10.fp16.sm89.plan", "transformer.trt10.8.int4.sm89.plan"):
        assert parse_engine_filename(bad) is None
    assert sm_of("8.9") == sm_of("sm89") == sm_of(89) == sm_of((8, 9)) == 89
    assert sm_of((12, 0)) == 120
    assert short_version("10.8.0.43") == "10.8"
    with pytest.raises(FluxMusicError, match="compute capability"):
        sm_of("ampere")
    with pytest.raises(FluxMusicError, match="precision 'int8'"):
        engine_name("transformer", "10.8", "int8", 89)


def test_find_engine_refuses_stale_engines(tmp_path):
    assert find_engine(tmp_path, "transformer", "10.8.0", 89) is None
    (tmp_path / "transformer.trt10.7.fp16.sm89.plan").write_bytes(b"x")  # older TensorRT
    (tmp_path / "transformer.trt10.8.fp16.sm86.plan").write_bytes(b"x")  # another GPU
    with pytest.raises(FluxMusicError, match="stale") as e:
        find_engine(tmp_path, "transformer", "10.8.0", 89)
    assert "transformer.trt10.7.fp16.sm89.plan" in str(e.value) and "rebuild" in str(e.value)
    fresh = tmp_path / "transformer.trt10.8.fp16.sm89.plan"
    fresh.write_bytes(b"x")
    assert find_engine(tmp_path, "transformer", "10.8.0.43", (8, 9)) == fresh
    assert find_engine(tmp_path, "transformer", "10.8.0", "8.6") == tmp_path / "transformer.trt10.8.fp16.sm86.plan"
    # another component's engines are not this one's
    assert find_engine(tmp_path, "vocoder", "10.8.0", 89) is None
    # two precisions for this GPU: ambiguous unless one is asked for
    (tmp_path / "transformer.trt10.8.bf16.sm89.plan").write_bytes(b"x")
    with pytest.raises(FluxMusicError, match="several transformer engines"):
        find_engine(tmp_path, "transformer", "10.8.0", 89)
    assert find_engine(tmp_path, "transformer", "10.8.0", 89, precision="bf16").name.startswith(
        "transformer.trt10.8.bf16"
    )


# ------------------------------------------------------------------------------------------- profiles
def test_transformer_profile_doubles_batch_and_sizes_music_from_durations():
    limits = RequestLimits(max_batch=4, opt_batch=2, durations=parse_durations("5.12,10.24", GEO))
    p = build_of(plan("fp16", limits), "transformer")
    assert len(p.profiles) == 1
    prof = p.profiles[0]
    # 5.12 s -> 128 latent frames -> 64 x 8 = 512 tokens; 10.24 s -> 1024 tokens; CFG batch = 2 x requests
    assert prof["x"].min == (1, 512, 32) and prof["x"].opt == (4, 1024, 32) and prof["x"].max == (8, 1024, 32)
    assert prof["t"].max == (8,)
    assert prof["txt"].min == (1, 256, 4096) and prof["txt"].max == (8, 256, 4096)  # text length fixed
    assert prof["y"].max == (8, 768)
    assert [n for n, _ in prof.shapes] == ["x", "t", "txt", "y"]  # RoPE is derived inside the graph


def test_decoder_profiles_follow_durations_and_request_batch():
    limits = RequestLimits(max_batch=3, durations=parse_durations("2.56,10.24", GEO))
    p = plan("fp32", limits)
    vae = build_of(p, "vae_decoder").profiles[0]["latent"]
    assert vae.min == (1, 8, 64, 16) and vae.max == (3, 8, 256, 16)  # no CFG doubling
    voc = build_of(p, "vocoder").profiles[0]["mel"]
    assert voc.min == (1, 256, 64) and voc.max == (3, 1024, 64)  # mel frames = 4 x latent frames
    t5 = build_of(p, "t5").profiles[0]["input_ids"]
    assert t5.min == (1, 256) and t5.max == (3, 256)
    clap = build_of(p, "clap").profiles[0]
    assert clap["attention_mask"].max == (3, 77)


def test_duration_buckets_and_static_shapes():
    buckets = parse_durations("10.24,2.56,5.12", GEO)
    assert buckets == (2.56, 5.12, 10.24)
    p = plan("fp16", RequestLimits(max_batch=2, durations=buckets))
    tr = build_of(p, "transformer")
    assert [pr["x"].max[1] for pr in tr.profiles] == [256, 512, 1024]
    assert all(pr["x"].min[1] == pr["x"].max[1] for pr in tr.profiles)  # exact length per bucket
    assert len(build_of(p, "t5").profiles) == 1  # text encoders do not depend on durations
    static = plan("fp16", RequestLimits(max_batch=2, durations=buckets, static=True))
    for b in static.builds:
        for pr in b.profiles:
            assert all(r.min == r.opt == r.max for _, r in pr.shapes), b.component
    assert build_of(static, "transformer").profiles[0]["x"].min == (4, 256, 32)
    # a static range plans the longest length
    rng = plan("fp16", RequestLimits(durations=(5.0, 10.24), static=True))
    assert [pr["x"].min for pr in build_of(rng, "transformer").profiles] == [(2, 1024, 32)]
    # the opt point sits inside [min, max] everywhere
    for b in plan("fp16", RequestLimits(max_batch=8, opt_batch=3, durations=(3.0, 9.0))).builds:
        for pr in b.profiles:
            for _, r in pr.shapes:
                assert all(lo <= o <= hi for lo, o, hi in zip(r.min, r.opt, r.max))


def test_runtime_selects_the_planned_profile_and_pads_static_batches():
    from fluxmusic.runtime.tensorrt_engine import select_profile

    def ranges(build):  # what the engine reports per profile: (min, max) per input
        return [{n: (r.min, r.max) for n, r in p.shapes} for p in build.profiles]

    def call(batch, tokens):
        return {"x": (batch, tokens, 32), "t": (batch,), "txt": (batch, 256, 4096), "y": (batch, 768)}

    batch_inputs = ("x", "t", "txt", "y")
    buckets = build_of(plan("fp16", RequestLimits(max_batch=2, durations=(2.56, 5.12, 10.24))), "transformer")
    assert select_profile(ranges(buckets), call(4, 512), batch_inputs) == (1, call(4, 512))
    assert select_profile(ranges(buckets), call(2, 1024), batch_inputs)[0] == 2
    assert select_profile(ranges(buckets), call(6, 1024), batch_inputs) is None  # more than --max-batch
    assert select_profile(ranges(buckets), call(2, 700), batch_inputs) is None  # no bucket of that length
    static = build_of(plan("fp16", RequestLimits(max_batch=2, durations=(10.24,), static=True)), "transformer")
    profile, shapes = select_profile(ranges(static), call(2, 1024), batch_inputs)
    assert profile == 0 and shapes == call(4, 1024)  # zero-padded up to the static CFG batch


def test_bad_limits_name_the_value():
    with pytest.raises(FluxMusicError, match="outside the allowed range"):
        parse_durations("1,20", GEO)
    with pytest.raises(FluxMusicError, match="MIN > MAX"):
        parse_durations("10,5", GEO)
    with pytest.raises(FluxMusicError, match="comma-separated"):
        parse_durations("5,long", GEO)
    with pytest.raises(FluxMusicError, match="max batch 0"):
        RequestLimits(max_batch=0)
    with pytest.raises(FluxMusicError, match="opt batch 4"):
        RequestLimits(max_batch=2, opt_batch=4)
    with pytest.raises(FluxMusicError, match="optimisation level 9"):
        plan("fp16", opt_level=9)
    assert parse_durations(None, GEO) == (10.24,)
    assert parse_durations("5,5", GEO) == (5.0,)


# ------------------------------------------------------------------------------------------- precision
def test_precision_policy_keeps_vae_and_vocoder_fp32():
    for prec in ("fp16", "bf16", "fp8"):
        assert default_component_precision("vae_decoder", prec) == "fp32"
        assert default_component_precision("vocoder", prec) == "fp32"
        assert default_component_precision("transformer", prec) == prec
    assert default_component_precision("t5", "fp16") == "fp32"  # T5 overflows fp16
    assert default_component_precision("clap", "fp16") == "fp16"
    assert default_component_precision("t5", "fp8") == "bf16"
    p = plan("bf16", overrides=parse_component_precisions(["vae_decoder=bf16"]))
    assert build_of(p, "vae_decoder").precision == "bf16" and build_of(p, "vocoder").precision == "fp32"
    with pytest.raises(FluxMusicError, match="COMPONENT=PRECISION"):
        parse_component_precisions(["unet=fp16"])
    with pytest.raises(FluxMusicError, match="precision 'fp64'"):
        plan("fp64")


def test_strong_typing_where_the_graph_carries_the_precision(tmp_path):
    graphs = {
        "transformer": {
            "fp32": OnnxGraph(tmp_path / "transformer.onnx", "fp32"),
            "fp16": OnnxGraph(tmp_path / "transformer.fp16.onnx", "fp16"),
        },
        "vae_decoder": {"fp32": OnnxGraph(tmp_path / "vae_decoder.onnx", "fp32")},
        "clap": {"fp32": OnnxGraph(tmp_path / "clap.onnx", "fp32")},
    }
    p = plan("fp16", graphs=graphs)
    tr = build_of(p, "transformer")
    assert tr.strongly_typed and tr.onnx.name == "transformer.fp16.onnx" and tr.builder_flags == ()
    clap = build_of(p, "clap")  # fp32 graph, fp16 engine: the builder lowers it (weak typing + FP16 flag)
    assert not clap.strongly_typed and clap.builder_flags == ("FP16",)
    vae = build_of(p, "vae_decoder")
    assert vae.strongly_typed and vae.precision == "fp32" and vae.onnx.name == "vae_decoder.onnx"
    assert build_of(plan("bf16", graphs=graphs), "transformer").builder_flags == ("BF16",)
    # fp8 needs a Q/DQ graph; this export has none
    with pytest.raises(FluxMusicError, match="FP8-quantized"):
        plan("fp8", graphs=graphs)
    graphs["transformer"]["fp8"] = OnnxGraph(tmp_path / "transformer.fp8.onnx", "fp8", quantized=True)
    fp8 = build_of(plan("fp8", graphs=graphs), "transformer")
    assert fp8.strongly_typed and fp8.onnx.name == "transformer.fp8.onnx"


def test_precision_needs_a_capable_gpu():
    with pytest.raises(FluxMusicError, match="sm80"):
        make_plan(description(), "bf16", RequestLimits(), "10.8", (7, 5))
    with pytest.raises(FluxMusicError, match="sm89"):
        make_plan(description(), "fp8", RequestLimits(), "10.8", (8, 6))


def _write_graph(path, inputs, dtype=np.float32):
    """A small real ONNX graph with the given inputs (Identity to outputs): what describe_onnx_dir reads."""
    import onnx
    from onnx import TensorProto, helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    ins, outs, nodes = [], [], []
    for name, shape in inputs:
        ins.append(helper.make_tensor_value_info(name, elem, shape))
        outs.append(helper.make_tensor_value_info(name + "_out", elem, shape))
        nodes.append(helper.make_node("Identity", [name], [name + "_out"]))
    graph = helper.make_graph(nodes, "g", ins, outs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    _ = TensorProto


def test_describe_onnx_dir_reads_graphs_and_variants(tmp_path):
    import json

    (tmp_path / "manifest.json").write_text(
        json.dumps({"geometry": GEO.to_dict(), "text": {"t5_max_length": 16, "clap_max_length": 8}})
    )
    _write_graph(tmp_path / "vae_decoder.onnx", [("latent", ["batch", 8, "latent_frames", 16])])
    _write_graph(tmp_path / "vocoder.onnx", [("mel", ["batch", "mel_frames", 64])])
    _write_graph(tmp_path / "vocoder.fp16.onnx", [("mel", ["batch", "mel_frames", 64])], np.float16)
    desc = describe_onnx_dir(tmp_path)
    assert set(desc.specs) == {"vae_decoder", "vocoder"} and desc.index.t5_max_length == 16
    assert desc.specs["vae_decoder"].inputs[0].shape == ("batch", 8, "latent_frames", 16)
    assert set(desc.graphs["vocoder"]) == {"fp32", "fp16"}
    p = make_plan(desc, "fp16", RequestLimits(max_batch=2), "10.8", 89, {"vocoder": "fp16"})
    voc = build_of(p, "vocoder")
    assert voc.onnx.name == "vocoder.fp16.onnx" and voc.strongly_typed
    assert voc.profiles[0]["mel"].max == (2, 1024, 64)
    # a graph that breaks the contract is named
    _write_graph(tmp_path / "vae_decoder.onnx", [("z", ["batch", 8, "latent_frames", 16])])
    with pytest.raises(FluxMusicError, match="has no input 'latent'"):
        describe_onnx_dir(tmp_path)
    with pytest.raises(FluxMusicError, match="does not exist"):
        describe_onnx_dir(tmp_path / "nope")


# ------------------------------------------------------------------------------------------- CLI and GPU guard
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fluxmusic.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("trt") / "model")


def run_cli(argv: list[str]) -> int:
    from fluxmusic.cli import main

    return main(argv)


def test_export_tensorrt_is_reachable_from_the_cli():
    from fluxmusic.cli import build_parser

    args = build_parser().parse_args(["export", "tensorrt", "--dry-run", "--precision", "bf16"])
    assert args.precision == "bf16" and args.dry_run


def test_dry_run_prints_the_plan_without_a_gpu(tiny_model, capsys):
    rc = run_cli(
        ["export", "tensorrt", "--model", str(tiny_model), "--dry-run", "--precision", "fp16"]
        + ["--max-batch", "2", "--durations", "5.12,10.24", "--sm", "8.9", "--trt-version", "10.8.0"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "transformer.trt10.8.fp16.sm89.plan" in out and "vae_decoder.trt10.8.fp32.sm89.plan" in out
    assert "1x512x32 .. 2x1024x32 .. 4x1024x32" in out  # the CFG-doubled transformer profile
    assert "strongly typed" in out and "weakly typed, flags FP16" in out


def test_dry_run_json_and_bad_precision(tiny_model, capsys):
    import json

    base = ["export", "tensorrt", "--model", str(tiny_model), "--dry-run"]
    assert run_cli([*base, "--json", "--precision", "bf16"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["components"]["transformer"]["precision"] == "bf16"
    assert data["components"]["vocoder"]["precision"] == "fp32"
    assert run_cli([*base, "--precision", "int4"]) == 2
    assert "precision 'int4' is not supported" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU message; this machine has CUDA")
def test_build_without_gpu_fails_with_one_clear_message(tmp_path, capsys):
    from fluxmusic.export.tensorrt_build import require_tensorrt

    with pytest.raises(FluxMusicError, match="TensorRT needs a CUDA GPU"):
        require_tensorrt()
    rc = run_cli(["export", "tensorrt", "--onnx", str(tmp_path), "--out", str(tmp_path / "engines")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "TensorRT needs a CUDA GPU" in err[0]
    assert not (tmp_path / "engines").exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU message; this machine has CUDA")
def test_backend_without_cuda_fails_clearly(tiny_model):
    from fluxmusic.backend import make_backend
    from fluxmusic.modeldir import read_index

    with pytest.raises(FluxMusicError, match="tensorrt backend needs a CUDA GPU"):
        make_backend("tensorrt", tiny_model, read_index(tiny_model), "cuda", torch.float32, engine_dir=tiny_model)


# ------------------------------------------------------------------------------------------- GPU (skipped here)
@pytest.fixture(scope="module")
def tiny_engines(tiny_model, tmp_path_factory):
    """The tiny model exported to ONNX and built into fp32 engines (GPU only)."""
    from fluxmusic.export.onnx_export import export_onnx
    from fluxmusic.export.tensorrt_build import build_engines, gpu_target
    from fluxmusic.export.tensorrt_plan import describe_onnx_dir

    root = tmp_path_factory.mktemp("trt_engines")
    export_onnx(tiny_model, root / "onnx", progress=None)
    desc = describe_onnx_dir(root / "onnx")
    version, sm, _ = gpu_target()
    limits = RequestLimits(max_batch=2, durations=(2.56, 10.24))
    build_engines(make_plan(desc, "fp32", limits, version, sm), root / "engines", workspace_gb=2.0)
    return root / "onnx", root / "engines"


def _ort(onnx_path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.cpu().numpy() for k, v in feeds.items()})[0]


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.gpu
@needs_gpu
def test_engines_match_onnxruntime(tiny_model, tiny_engines):
    from fluxmusic.export.onnx_export import _load_context, example_inputs
    from fluxmusic.runtime.tensorrt_backend import TensorRTBackend

    from fluxmusic.modeldir import read_index

    onnx_dir, engine_dir = tiny_engines
    be = TensorRTBackend(tiny_model, read_index(tiny_model), "cuda", engine_dir=engine_dir)
    assert all(v.startswith("tensorrt:") for v in be.placement.values()), be.placement
    ctx = _load_context(tiny_model)
    feeds = {c: example_inputs(ctx, c) for c in ("transformer", "vae_decoder", "vocoder")}
    rope = be.rope(feeds["transformer"]["txt"].shape[1], feeds["transformer"]["x"].shape[1] // 8, 8)
    v = be.velocity(*(feeds["transformer"][k].cuda() for k in ("x", "t", "txt", "y")), rope).cpu().numpy()
    assert np.abs(v - _ort(onnx_dir / "transformer.onnx", feeds["transformer"])).max() <= 1e-4
    mel = be.vae_decode(feeds["vae_decoder"]["latent"].cuda()).cpu().numpy()
    assert _cos(mel, _ort(onnx_dir / "vae_decoder.onnx", feeds["vae_decoder"])) >= 0.9999
    wave = be.vocode(feeds["vocoder"]["mel"].cuda()).cpu().numpy()
    assert _cos(wave, _ort(onnx_dir / "vocoder.onnx", feeds["vocoder"])) >= 0.9999


@pytest.mark.gpu
@needs_gpu
def test_pipeline_on_engines_matches_torch_end_to_end(tiny_model, tiny_engines):
    from fluxmusic.pipeline import FluxMusicPipeline

    _onnx_dir, engine_dir = tiny_engines
    kw = dict(prompt="a calm piano melody", duration=10.24, seed=3)
    ref = FluxMusicPipeline.from_pretrained(tiny_model, device="cpu")(**kw).audio[0]
    for graphs in (False, True):
        trt = FluxMusicPipeline.from_pretrained(
            tiny_model, device="cuda", backend="tensorrt", engine_dir=engine_dir, cuda_graphs=graphs
        )(**kw).audio[0]
        snr = 10 * math.log10(float(np.sum(ref**2)) / max(float(np.sum((ref - trt) ** 2)), 1e-30))
        assert snr >= 40.0, (graphs, snr)
