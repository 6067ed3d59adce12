"""Trained masked conditioning beyond torch: the transformer / step graphs' ``context`` input, the onnx backend's
trained route (equal to torch), the TensorRT plan's specs, and the Triton BLS model (equal to the pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

SR = 16000


@pytest.fixture(scope="module")
def context_onnx(context_model_dir, tmp_path_factory):
    from fluxmusic.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "ctx"
    export_onnx(context_model_dir, out, step_graph=True, encoder=True, progress=None)
    return out


def _wave(seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 330 * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def test_specs_add_the_context_input_only_to_context_models(tiny_model_dir, context_model_dir):
    from fluxmusic.export.spec import CONTEXT_INPUT
    from fluxmusic.export.tensorrt_plan import RequestLimits, component_profiles, specs_from_model_dir

    plain, _ = specs_from_model_dir(tiny_model_dir)
    specs, index = specs_from_model_dir(context_model_dir)
    assert [t.name for t in plain["transformer"].inputs] == ["x", "t", "txt", "y"]
    assert CONTEXT_INPUT not in [t.name for t in plain["euler_step"].inputs]
    cc = 2 * specs["transformer"].inputs[0].shape[2]
    for comp in ("transformer", "euler_step"):
        last = specs[comp].inputs[-1]
        assert (last.name, last.dtype, last.shape) == (CONTEXT_INPUT, "float32", ("batch", "music_len", cc))
        assert specs[comp].dynamic_axes()[CONTEXT_INPUT] == {0: "batch", 1: "music_len"}
    # TensorRT profiles size the context like x: the CFG batch and the music tokens of the durations
    limits = RequestLimits(max_batch=2, opt_batch=1, durations=(2.56, 10.24))
    for p in component_profiles(specs["transformer"], limits, index.geometry, index):
        x, c = p["x"], p[CONTEXT_INPUT]
        assert c.min[:2] == x.min[:2] and c.max[:2] == x.max[:2] and c.max[2] == cc


def test_zero_context_is_exactly_none_and_the_graph_matches_torch(context_model_dir, context_onnx, one_torch_thread):
    """context=None adds the bias only; context_in(zeros) is that bias: the graphs are fed zeros for "none"."""
    import onnx
    from fluxmusic.export.onnx_export import _load_context, example_inputs, load_graph_module, read_manifest

    from fluxmusic.backend import TorchBackend
    from fluxmusic.modeldir import read_index

    ctx = _load_context(context_model_dir)
    inp = example_inputs(ctx, "transformer", batch=3, seed=5)
    assert float(inp["context"][0].abs().sum()) == 0 and float(inp["context"][1:, :, -1].sum()) > 0
    torch_be = TorchBackend(context_model_dir, read_index(context_model_dir))
    x, t, txt, y = inp["x"], inp["t"], inp["txt"], inp["y"]
    g = ctx.index.geometry
    rope = torch_be.rope(txt.shape[1], x.shape[1] // (g.latent_width // g.patch), g.latent_width // g.patch)
    none = torch_be.velocity(x, t, txt, y, rope)
    assert torch.equal(none, torch_be.velocity(x, t, txt, y, rope, context=torch.zeros_like(inp["context"])))
    with_ctx = torch_be.velocity(x, t, txt, y, rope, context=inp["context"])
    assert float((with_ctx - none).abs().max()) > 1e-3  # the context input matters

    from fluxmusic.runtime.onnx_backend import OnnxBackend

    be = OnnxBackend(context_model_dir, read_index(context_model_dir), onnx_dir=context_onnx)
    assert be.takes_context and {"transformer", "euler_step", "vae_encoder"} <= set(be.graphs)
    scale = float(none.abs().max())
    assert float((be.velocity(x, t, txt, y, rope) - none).abs().max()) <= 1e-4 * scale
    assert float((be.velocity(x, t, txt, y, rope, context=inp["context"]) - with_ctx).abs().max()) <= 1e-4 * scale
    # the graph, its manifest entry and its torch twin
    names = [i.name for i in onnx.load(str(context_onnx / "transformer.onnx"), load_external_data=False).graph.input]
    assert names == ["x", "t", "txt", "y", "context"]
    entry = read_manifest(context_onnx)["components"]["transformer"]["inputs"][-1]
    assert entry == {"name": "context", "dtype": "float32", "shape": ["batch", "music_len", 64]}
    twin = load_graph_module(context_model_dir, "transformer")
    with torch.no_grad():
        assert torch.allclose(twin(x, t, txt, y, inp["context"]), with_ctx, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["velocity", "step-graph"])
def test_onnx_trained_route_equals_torch(context_model_dir, context_onnx, fused, monkeypatch, one_torch_thread):
    """Continuation and infilling with conditioning auto take the trained route on onnx as on torch fp32: every
    transformer call gets the same context, the same inputs give the same velocity, and the final latents agree
    within 1e-4 of their scale (the waveform SNR of the tiny random VAE's near-silent audio says little)."""
    from fluxmusic.pipeline import FluxMusicPipeline

    ref = FluxMusicPipeline.from_pretrained(context_model_dir, dtype="fp32")
    onnx = FluxMusicPipeline.from_pretrained(context_model_dir, backend="onnx", onnx_dir=context_onnx)
    assert ref.takes_context and onnx.takes_context
    if not fused:
        del onnx.backend.graphs["euler_step"]
    calls: dict = {"torch": [], "onnx": []}
    real_t, real_v, real_s = ref.backend.velocity, onnx.backend.velocity, onnx.backend.euler_step

    def spy_t(x, t, txt, y, rope, context=None):
        calls["torch"].append((x, t, txt, y, rope, context))
        return real_t(x, t, txt, y, rope, context=context)

    monkeypatch.setattr(ref.backend, "velocity", spy_t)
    monkeypatch.setattr(onnx.backend, "velocity", lambda *a, context=None: calls["onnx"].append(context) or real_v(
        *a, context=context))
    monkeypatch.setattr(onnx.backend, "euler_step", lambda context=None, **kw: calls["onnx"].append(context) or
                        calls["fused"].append(1) or real_s(context=context, **kw))
    calls["fused"] = []
    latents: list = []  # the final latents, before the VAE
    for pipe in (ref, onnx):
        real_d = pipe.backend.vae_decode
        monkeypatch.setattr(pipe.backend, "vae_decode", lambda z, real_d=real_d: latents.append(z) or real_d(z))
    kw = dict(seed=0, steps=4, solver="euler", duration=2.56)
    for name, opts in {"continue": dict(keep="0:1"), "infill": dict(regenerate="1:2"), "text": {}}.items():
        if name != "text":
            opts["audio"] = _wave()
        for v in (calls["torch"], calls["onnx"], calls["fused"], latents):
            v.clear()
        ref("calm piano", **opts, **kw)
        onnx("calm piano", **opts, **kw)
        assert len(calls["onnx"]) == len(calls["torch"]) == 4, name
        assert len(calls["fused"]) == (4 if fused else 0), name  # the fused step graph runs every step, or never
        for (*_, c_t), c_o in zip(calls["torch"], calls["onnx"]):
            assert (c_t is None) == (c_o is None) == (name == "text"), name  # the trained route (or none)
            if c_o is not None:  # the step graph gets one row per item; the velocity call the [cond; uncond] rows
                # the same mask; x0 from the VAE encoder graph (within 1e-4 of torch's, test_continuation_onnx)
                assert torch.equal(c_t[: len(c_o), :, -1], c_o[..., -1])
                assert torch.allclose(c_t[: len(c_o)], c_o, atol=1e-4)
        x, t, txt, y, rope, c = calls["torch"][-1]
        with torch.no_grad():
            v_t = real_t(x, t, txt, y, rope, context=c)
            v_o = real_v(x, t, txt, y, rope, context=c)
        assert float((v_t - v_o).abs().max()) <= 1e-4 * float(v_t.abs().max()), name
        za, zb = latents
        assert float((za - zb).abs().max()) <= 1e-4 * float(za.abs().max()), name
        if name != "text":  # and the trained route is not the replacement one
            latents.clear()
            ref("calm piano", **opts, **kw, conditioning="replace")
            assert float((latents[0] - za).abs().max()) > 1e-2 * float(za.abs().max()), name


def test_validate_covers_the_context_input(context_model_dir, context_onnx, one_torch_thread):
    from fluxmusic.export.validate import validate

    from fluxmusic.backend import make_backend
    from fluxmusic.modeldir import read_index

    be = make_backend("onnx", context_model_dir, read_index(context_model_dir), "cpu", torch.float32,
                      onnx_dir=context_onnx)
    report = validate(context_model_dir, {"onnx": be}, steps=2, duration=2.56)
    assert report.ok, report.table()
    comps = {(r.component, r.inputs) for r in report.rows}
    assert {("transformer", "random"), ("euler_step", "random"), ("transformer", "real")} <= comps


def test_a_stale_export_without_the_context_input_is_refused(tiny_model_dir, context_model_dir, tmp_path):
    """An export of the model before it had the context input would ignore the given audio: refused, not run."""
    from fluxmusic.export.onnx_export import export_onnx

    from fluxmusic.errors import FluxMusicError
    from fluxmusic.pipeline import FluxMusicPipeline

    stale = tmp_path / "stale"
    export_onnx(tiny_model_dir, stale, components=["transformer"], progress=None)
    # same name, new transformer: the config hash differs, so the manifest check refuses it first
    with pytest.raises(FluxMusicError, match="model/ONNX mismatch"):
        FluxMusicPipeline.from_pretrained(context_model_dir, backend="onnx", onnx_dir=stale)


def test_tensorrt_context_helpers_are_import_safe():
    from fluxmusic.runtime.tensorrt_backend import BATCH_INPUTS, check_context_inputs, context_feed

    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.errors import FluxMusicError

    plain = FluxMusicConfig(in_channels=8)
    ctx = FluxMusicConfig(in_channels=8, context_channels=16)
    x = torch.randn(2, 5, 8)
    assert context_feed(plain, x, None) == {}
    zeros = context_feed(ctx, x, None)["context"]
    assert zeros.shape == (2, 5, 16) and not zeros.any()
    c = torch.ones(2, 5, 16)
    assert context_feed(ctx, x, c)["context"] is c
    with pytest.raises(FluxMusicError, match="no context input"):
        context_feed(plain, x, c)
    check_context_inputs(ctx, {"transformer": ["x", "t", "txt", "y", "context"]})
    check_context_inputs(plain, {"transformer": ["x", "t", "txt", "y"], "vae_decoder": ["latent"]})
    with pytest.raises(FluxMusicError, match="transformer engine lacks the 'context' input.*context_channels 16"):
        check_context_inputs(ctx, {"transformer": ["x", "t", "txt", "y"]})
    with pytest.raises(FluxMusicError, match="euler_step engine has"):
        check_context_inputs(plain, {"euler_step": ["x", "context"]})
    assert BATCH_INPUTS["transformer"][-1] == BATCH_INPUTS["euler_step"][-1] == "context"


def test_tensorrt_plan_reads_the_context_input_from_the_graphs(tiny_model_dir, context_model_dir, context_onnx,
                                                                tmp_path):
    from fluxmusic.export.onnx_export import export_onnx
    from fluxmusic.export.tensorrt_plan import describe_onnx_dir

    desc = describe_onnx_dir(context_onnx, context_model_dir)
    for comp in ("transformer", "euler_step"):
        last = desc.specs[comp].inputs[-1]
        assert last.name == "context" and last.shape == ("batch", "music_len", 64)
    plain = tmp_path / "plain"
    export_onnx(tiny_model_dir, plain, components=["transformer"], progress=None)
    assert [t.name for t in describe_onnx_dir(plain, tiny_model_dir).specs["transformer"].inputs] == [
        "x", "t", "txt", "y"]


@pytest.fixture(scope="module")
def context_repo(context_model_dir, context_onnx, tmp_path_factory):
    from fluxmusic.export.triton_repo import build_repository

    return build_repository(context_model_dir, context_onnx, tmp_path_factory.mktemp("triton") / "repo")


def test_bls_trained_route_equals_the_pipeline(context_repo, context_model_dir, one_torch_thread):
    from fluxmusic.export.spec import COMPONENT_NAMES
    from fluxmusic.export.triton_check import check_repository
    from fluxmusic.export.validate import snr_db
    from fluxmusic.runtime.triton_bls import FluxMusicBls, OnnxRuntimeInfer

    from fluxmusic.pipeline import FluxMusicPipeline

    assert any(c.startswith("transformer: accepts what the BLS model sends") for c in check_repository(context_repo))
    assert 'name: "context"' in (context_repo / "transformer" / "config.pbtxt").read_text()
    names = (*COMPONENT_NAMES, "vae_encoder")
    bls = FluxMusicBls(context_repo / "fluxmusic" / "1",
                       OnnxRuntimeInfer({c: context_repo / c / "1" / "model.onnx" for c in names}))
    assert bls.backend.has_encoder and bls.backend.takes_context and bls.pipeline.takes_context
    pipe = FluxMusicPipeline.from_pretrained(context_model_dir, dtype="fp32")
    wave = _wave()
    req = {"prompt": np.array([b"calm piano"], dtype=object), "audio": wave, "keep": np.array([b"0:1"], dtype=object),
           "duration": np.array([2.56], np.float32), "seed": np.array([0], np.int64), "steps": np.array([3], np.int32)}
    kw = dict(audio=wave, keep="0:1", duration=2.56, seed=0, steps=3)
    for cond in (None, "trained", "replace"):
        r = req if cond is None else {**req, "conditioning": np.array([cond.encode()], dtype=object)}
        out = bls.execute(r)["audio"]
        ref = pipe("calm piano", **kw, conditioning=cond or "auto").audio[0]
        assert snr_db(out, ref) >= 40, cond
    # text-to-music on the context model (zeros sent as the context) equals the pipeline's context=None
    text = bls.execute({k: req[k] for k in ("prompt", "duration", "seed", "steps")})["audio"]
    assert snr_db(text, pipe("calm piano", duration=2.56, seed=0, steps=3).audio[0]) >= 40


def test_bls_conditioning_input_is_validated(context_repo):
    from fluxmusic.export.spec import COMPONENT_NAMES
    from fluxmusic.runtime.triton_bls import FluxMusicBls, OnnxRuntimeInfer

    from fluxmusic.errors import FluxMusicError

    bls = FluxMusicBls(context_repo / "fluxmusic" / "1",
                       OnnxRuntimeInfer({c: context_repo / c / "1" / "model.onnx" for c in COMPONENT_NAMES}))
    base = {"prompt": np.array([b"calm piano"], dtype=object), "duration": np.array([2.56], np.float32)}
    with pytest.raises(FluxMusicError, match="conditioning 'soft'.*auto, trained, replace"):
        bls.prepare({**base, "audio": _wave(), "keep": np.array([b"0:1"], dtype=object),
                     "conditioning": np.array([b"soft"], dtype=object)})
    with pytest.raises(FluxMusicError, match="given audio .* or long form only"):
        bls.prepare({**base, "conditioning": np.array([b"trained"], dtype=object)})
