"""Image / story conditioning (issue 18): components, loading, inputs, pipeline and CLI, on tiny real parts."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fluxmusic.adapters import (
    ADAPTERS,
    IMAGE_ENCODER,
    AdapterConfig,
    MediaAdapters,
    MediaEncoder,
    decode_image,
    load_adapters,
    mix,
    save_adapters,
    split_story,
)
from fluxmusic.errors import FluxMusicError
from fluxmusic.flow import Conditioning
from fluxmusic.modeldir import read_index
from fluxmusic.pipeline import FluxMusicPipeline
from fluxmusic.sampling import Limits, build_request
from fluxmusic.tiny import add_tiny_media, build_tiny_model_dir

STORY = ("It rained all day. The piano played slowly. Nobody spoke! The melody stayed low; it was soft. "
         "Then the lights went out.")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = build_tiny_model_dir(tmp_path_factory.mktemp("media") / "model")
    return add_tiny_media(d)


@pytest.fixture(scope="module")
def media_pipe(media_dir):
    return FluxMusicPipeline.from_pretrained(media_dir)


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_components_load_strictly(media_dir, tmp_path):
    enc = MediaEncoder.from_model_dir(media_dir)
    assert enc is not None and type(enc.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    read_index(media_dir)  # the optional folders pass the directory checks
    # a missing adapter tensor is one error naming it
    bad = tmp_path / "bad"
    shutil.copytree(media_dir / ADAPTERS, bad)
    cfg = json.loads((bad / "config.json").read_text())
    module = MediaAdapters(AdapterConfig.from_dict(cfg, "x"))
    state = module.state_dict()
    del state["image_clap.1.weight"]
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(bad / "model.safetensors"))
    with pytest.raises(FluxMusicError, match=r"missing keys: image_clap\.1\.weight"):
        load_adapters(bad)
    # mis-shaped: a config that does not fit the weights
    cfg["hidden"] = 64
    (bad / "config.json").write_text(json.dumps(cfg))
    save_adapters(module, tmp_path / "good")
    shutil.copy(tmp_path / "good" / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(FluxMusicError, match="mis-shaped keys"):
        load_adapters(bad)
    # a flipped weight fails the stored checksums
    flipped = tmp_path / "flip"
    shutil.copytree(tmp_path / "good", flipped)
    raw = bytearray((flipped / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(FluxMusicError, match="checksums"):
        load_adapters(flipped)


def test_partial_media_folders_refused(media_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(media_dir, d)
    shutil.rmtree(d / IMAGE_ENCODER)
    with pytest.raises(FluxMusicError, match="image_encoder"):
        read_index(d)


def test_decode_image_inputs_and_errors(tmp_path):
    a = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(a))
    from PIL import Image

    for src in (a, png_bytes(a), path, str(path), Image.fromarray(a), a.astype(np.float32) / 255):
        out = decode_image(src)
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - a).max() <= 1
    with pytest.raises(FluxMusicError, match="cannot be decoded as an image"):
        decode_image(b"not an image at all")
    with pytest.raises(FluxMusicError, match="is empty"):
        decode_image(b"")
    big = png_bytes(np.zeros((300, 400, 3), np.uint8))
    with pytest.raises(FluxMusicError, match=r"400 x 300 pixels is invalid; allowed: .*at most 10000 pixels"):
        decode_image(big, max_pixels=10000)
    with pytest.raises(FluxMusicError, match="bytes; allowed: at most 10"):
        decode_image(big, max_bytes=10)
    with pytest.raises(FluxMusicError, match="shape"):
        decode_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(FluxMusicError, match="not a file"):
        decode_image(tmp_path / "missing.png")


def test_story_split_and_request_errors(media_pipe):
    assert split_story(STORY, 16) == ["It rained all day.", "The piano played slowly.", "Nobody spoke!",
                                      "The melody stayed low;", "it was soft.", "Then the lights went out."]
    grouped = split_story(STORY, 2)
    assert len(grouped) == 2 and " ".join(grouped) == " ".join(split_story(STORY, 16))
    geo, d = media_pipe.geometry, media_pipe.defaults
    with pytest.raises(FluxMusicError, match="story '   ' is empty"):
        build_request(d, geo, "", story="   ")
    with pytest.raises(FluxMusicError, match="at most 10 characters"):
        build_request(d, geo, "", story=STORY, limits=Limits(max_story_chars=10))
    with pytest.raises(FluxMusicError, match="image_weight 1 is invalid; allowed: only together with an image"):
        build_request(d, geo, "a piano", image_weight=1)
    with pytest.raises(FluxMusicError, match=r"image_weight -1 is invalid; allowed: a number in \[0, 100\]"):
        build_request(d, geo, "", image=np.zeros((8, 8, 3), np.uint8), image_weight=-1)
    with pytest.raises(FluxMusicError, match="prompt '' is invalid"):
        build_request(d, geo, "")  # without an image or a story the prompt is still required
    r = build_request(d, geo, "", image=np.zeros((8, 8, 3), np.uint8), story=STORY, story_weight=2)
    assert r.media.image.shape == (8, 8, 3) and r.media.story_weight == 2.0 and r.items[0].prompt == ""


def test_mix_weights():
    a = Conditioning(torch.zeros(1, 2, 3), torch.zeros(1, 3))
    b = Conditioning(torch.ones(1, 2, 3), torch.ones(1, 3))
    c = mix([(a, 1.0), (b, 3.0)])
    assert torch.allclose(c.y, torch.full((1, 3), 0.75)) and torch.allclose(c.txt, torch.full((1, 2, 3), 0.75))
    with pytest.raises(FluxMusicError, match="sum to 0"):
        mix([(a, 0.0)])


def test_pipeline_image_story(media_pipe):
    img = (np.random.default_rng(1).random((40, 52, 3)) * 255).astype(np.uint8)
    enc = media_pipe.media_encoder()
    ci, cs = enc.encode_image(img), enc.encode_story(STORY, media_pipe.encoders)
    text = media_pipe.conditioning(["slow piano"])
    assert ci.txt.shape == cs.txt.shape == text.txt.shape and ci.y.shape == cs.y.shape == text.y.shape
    # the mix the pipeline uses: prompt weight 1, image weight w
    req = media_pipe.request("slow piano", image=img, image_weight=3.0, steps=2, seed=0, duration=0.5)
    got = media_pipe._conditioning(["slow piano"], media_pipe.media_conditioning(req.media))
    assert torch.allclose(got.y, 0.25 * text.y + 0.75 * ci.y, atol=1e-6)
    # image alone: exactly the image's conditioning; generation runs and differs from the text-only one
    alone = media_pipe._conditioning([""], media_pipe.media_conditioning(
        media_pipe.request("", image=img).media))
    assert torch.allclose(alone.y, ci.y) and torch.allclose(alone.txt, ci.txt)
    out = media_pipe(image=img, story=STORY, steps=2, seed=0, duration=0.5)
    assert out.audio[0].shape == (8000,) and np.isfinite(out.audio[0]).all()


def test_model_without_adapters_refuses(tiny_pipe):
    with pytest.raises(FluxMusicError, match="has no image / story adapters"):
        tiny_pipe(image=np.zeros((8, 8, 3), np.uint8), steps=1, seed=0, duration=0.5)
    assert tiny_pipe("a slow piano", steps=1, seed=0, duration=0.5).audio[0].shape == (8000,)  # text unchanged


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fluxmusic.cli", *args], capture_output=True, text=True,
                          timeout=300, **kw)


def test_cli_image_story(media_dir, tiny_model_dir, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes((np.random.default_rng(2).random((24, 24, 3)) * 255).astype(np.uint8)))
    story = tmp_path / "s.txt"
    story.write_text(STORY)
    out = tmp_path / "o.wav"
    r = _cli("generate", "--model", str(media_dir), "--image", str(img), "--story", str(story), "--steps", "2",
             "--duration", "0.5", "--seed", "0", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert out.is_file()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    r = _cli("generate", "--model", str(media_dir), "--image", str(bad), "-o", str(out), "--quiet")
    assert r.returncode == 2 and "cannot be decoded as an image" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    r = _cli("generate", "--model", str(media_dir), "--story", str(empty), "-o", str(out), "--quiet")
    assert r.returncode == 2 and "is empty" in r.stderr
    r = _cli("generate", "--model", str(tiny_model_dir), "--image", str(img), "-o", str(out), "--quiet")
    assert r.returncode == 2 and "no image / story adapters" in r.stderr


def test_onnx_export_of_media(media_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from fluxmusic.export.media_onnx import MANIFEST, MEDIA_DIR, export_media

    manifest = export_media(media_dir, tmp_path)
    assert set(manifest["graphs"]) == {"image_encoder", "image_adapter", "story_adapter"}
    assert all(g["max_abs_vs_torch"] <= 1e-4 for g in manifest["graphs"].values())
    assert json.loads((tmp_path / MEDIA_DIR / MANIFEST).read_text()) == manifest
    # the exported image path end to end equals the pipeline's conditioning
    import onnxruntime as ort

    enc = MediaEncoder.from_model_dir(media_dir)
    img = (np.random.default_rng(3).random((32, 32, 3)) * 255).astype(np.uint8)
    px = enc.pixel_values(img).numpy()
    tower = ort.InferenceSession(str(tmp_path / MEDIA_DIR / "image_encoder.onnx"))
    adapter = ort.InferenceSession(str(tmp_path / MEDIA_DIR / "image_adapter.onnx"))
    emb, tok = tower.run(None, {"pixel_values": px})
    txt, y = adapter.run(None, {"image_embeds": emb, "image_tokens": tok})
    ref = enc.encode_image(img)
    assert np.abs(y - ref.y.numpy()).max() < 1e-4 and np.abs(txt - ref.txt.numpy()).max() < 1e-4


def test_bundled_default_has_trained_adapters():
    from fluxmusic.data.media import render_image
    from fluxmusic.pipeline import default_model_dir

    d = default_model_dir()
    if not (d / ADAPTERS).is_dir():
        pytest.skip("the bundled default has no adapters")
    pipe = FluxMusicPipeline.from_pretrained(d)
    enc = pipe.media_encoder()
    attrs = {"instrument": "organ", "tempo": "slow", "register": "low", "mode": "minor", "dynamics": "soft",
             "texture": "four-part"}
    ci = enc.encode_image(render_image(attrs, 0))
    cs = enc.encode_story("The church organ played slowly. It rained. It was in a minor key.", pipe.encoders)
    text = pipe.conditioning(["slow minor church organ"])
    assert ci.txt.shape == cs.txt.shape == text.txt.shape and ci.y.shape == text.y.shape
    assert torch.isfinite(ci.txt).all() and torch.isfinite(cs.y).all()
