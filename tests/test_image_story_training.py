"""``train --task adapter`` (issue 18): the shared loop trains the image tower + adapters and resumes exactly."""

from __future__ import annotations

import io

import numpy as np
import torch

from fluxmusic.adapters import MediaEncoder
from fluxmusic.data.media import IMAGE_SIZE, make_story, pair_seed, render_image
from fluxmusic.tiny import build_tiny_model_dir
from fluxmusic.training.adapter_task import STORY_VARIANTS, AdapterTask, to_pixels
from fluxmusic.training.config import TrainConfig
from fluxmusic.training.loop import train

ROWS = [
    {"instrument": inst, "tempo": tempo, "register": reg, "mode": mode, "dynamics": "loud", "texture": "solo",
     "bpm": 100.0, "caption": f"a {tempo} {mode} piece on {inst}", "split": split}
    for inst, tempo, reg, mode, split in [
        ("piano", "slow", "low", "major", "train"), ("organ", "fast", "high", "minor", "train"),
        ("harp", "medium", "mid", "major", "train"), ("flute", "fast", "high", "major", "train"),
        ("brass", "slow", "mid", "minor", "train"), ("choir", "medium", "low", "minor", "val"),
    ]
]


def test_render_deterministic_and_attribute_driven():
    a = render_image(ROWS[0], pair_seed(0, 0))
    assert a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_image(ROWS[0], pair_seed(0, 0)))
    # register drives brightness: high is brighter than low, whatever the rest
    hi = render_image({**ROWS[0], "register": "high"}, 1).mean()
    lo = render_image({**ROWS[0], "register": "low"}, 1).mean()
    assert hi > lo + 40
    story = make_story(ROWS[1], 5)
    assert "organ" in story and "minor" in story and story == make_story(ROWS[1], 5)
    assert len([s for s in story.split(". ") if s]) >= 5  # several sentences, with distractors


def _targets(n: int, t5: int, clap: int, length: int, chunks: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"y": torch.randn(n, clap, generator=g).tanh(), "txt": torch.randn(n, length, t5, generator=g),
            "audio": torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1),
            "story": torch.randn(STORY_VARIANTS, n, chunks, t5 + clap, generator=g),
            "story_mask": torch.ones(STORY_VARIANTS, n, chunks)}


def test_adapter_training_resumes_exactly_and_exports(tmp_path):
    model_dir = build_tiny_model_dir(tmp_path / "model")
    from fluxmusic.components import read_config

    t5 = read_config(model_dir / "text_encoder", "T5")["d_model"]
    clap = read_config(model_dir / "clap", "CLAP")["text_config"]["hidden_size"]
    proj = read_config(model_dir / "clap", "CLAP")["projection_dim"]
    targets = _targets(len(ROWS), t5, clap, 16)
    targets["audio"] = torch.nn.functional.normalize(torch.randn(len(ROWS), proj), dim=-1)
    cfg = TrainConfig(steps=4, batch_size=3, lr=1e-3, ckpt_every=2, log_every=1, ema_decay=0.5, ema_every=1,
                      device="cpu")

    def task():
        return AdapterTask(model_dir, ROWS, targets, seed=0)

    full = train(task(), cfg, tmp_path / "full", stream=io.StringIO())
    half = TrainConfig(**{**cfg.to_dict(), "steps": 2})
    train(task(), half, tmp_path / "split", stream=io.StringIO())
    resumed = train(task(), cfg, tmp_path / "split", resume=True, stream=io.StringIO())
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.export is not None and resumed.export is not None
    # the exported folders load through the real loaders, as a model directory's would
    import shutil

    for name in ("image_encoder", "image_processor", "adapters"):
        shutil.copytree(full.export / name, model_dir / name)
    enc = MediaEncoder.from_model_dir(model_dir)
    img = render_image(ROWS[2], 3)
    assert torch.equal(enc.pixel_values(img), to_pixels(img[None]))
    assert enc.encode_image(img).txt.shape == (1, 16, t5)
