"""Image / story conditioning over gRPC (issue 18): bytes and text on the wire, limits, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("grpc_health")
import grpc  # noqa: E402
from fluxmusic.runtime.client import FluxMusicClient  # noqa: E402
from fluxmusic.runtime.proto.fluxmusic.v1 import fluxmusic_pb2 as pb2  # noqa: E402
from fluxmusic.runtime.server import FluxMusicServer, ServerConfig  # noqa: E402

from fluxmusic.errors import FluxMusicError  # noqa: E402
from fluxmusic.pipeline import FluxMusicPipeline  # noqa: E402
from fluxmusic.tiny import add_tiny_media, build_tiny_model_dir  # noqa: E402

DUR = 0.5
STORY = "The hall was dark. A slow piano began; it was soft. Nobody moved."


def png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    plain = build_tiny_model_dir(tmp_path_factory.mktemp("g") / "plain")
    media = add_tiny_media(build_tiny_model_dir(tmp_path_factory.mktemp("g") / "media"))
    return plain, media


def _serve(model_dir):
    return FluxMusicServer(FluxMusicPipeline.from_pretrained(model_dir), ServerConfig(port=0)).start()


def test_grpc_image_story(dirs):
    plain, media = dirs
    img = (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8)
    ref_pipe = FluxMusicPipeline.from_pretrained(media)
    ref = ref_pipe("", image=img, story=STORY, story_weight=2.0, steps=2, seed=3, duration=DUR).audio[0]
    server = _serve(media)
    try:
        with FluxMusicClient(server.target) as c:
            out = c.generate("", image=png(img), story=STORY, story_weight=2.0, steps=2, seed=3, duration=DUR,
                             encoding="pcm_f32le")
            np.testing.assert_allclose(out.audio[0], ref, atol=1e-5)
            for fields, match in ((dict(image=b"junk"), "cannot be decoded as an image"),
                                  (dict(story="   "), "is empty"),
                                  (dict(image_weight=2.0), "image_weight"),
                                  (dict(image=b"x" * (8 * 2**20 + 1)), "image")):
                req = pb2.GenerateRequest(prompt="", steps=1, duration=DUR)
                for k, v in fields.items():
                    setattr(req, k, v)
                with pytest.raises(grpc.RpcError) as e:
                    c.stub.Generate(req)
                assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
                assert match in e.value.details()
    finally:
        server.stop(grace=0)
    server = _serve(plain)
    try:
        with FluxMusicClient(server.target) as c, pytest.raises(FluxMusicError, match="no image / story adapters"):
            c.generate("", story=STORY, steps=1, duration=DUR)
    finally:
        server.stop(grace=0)
