"""The default-model recipe end to end at toy size, and the bundled default model itself."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from fluxmusic.pipeline import FluxMusicPipeline, default_model_dir
from fluxmusic.training.recipe import RECIPES, RecipeRun

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_toy_recipe_builds_a_model_directory_that_generates(tmp_path):
    import dataclasses

    from fluxmusic.beat import BEAT_CHANNELS
    from fluxmusic.transformer_io import load_transformer

    # A recipe without the masked stage assembles the plain transformer...
    no_masked = dataclasses.replace(RECIPES["toy"], masked_stage=None, beat_stage=None, register_stage=None)
    plain = RecipeRun(no_masked, tmp_path / "run", stream=io.StringIO()).run()
    assert "context_channels" not in json.loads((plain / "transformer" / "config.json").read_text())
    assert not (tmp_path / "run" / "parts" / "transformer_masked").exists()
    # ... and the full recipe in the same directory (an older run) adds the stage and assembles the model again.
    log = io.StringIO()
    model = RecipeRun(RECIPES["toy"], tmp_path / "run", stream=log).run()
    started = [line for line in log.getvalue().splitlines() if line.endswith(": starting")]
    assert started == ["recipe: transformer_masked: starting", "recipe: transformer_beat: starting",
                       "recipe: transformer_register: starting", "recipe: assemble: starting"], started
    assert "beat phases of the cache's clips" in log.getvalue()  # the synth corpus's tempo_bpm, phased from audio
    # the register stage trains on each clip's measured melody pitch, written into the cache first
    assert "transformer_register: beat phases and melody pitches of the cache's clips" in log.getvalue()
    items = (tmp_path / "run" / "cache" / "items.jsonl").read_text().splitlines()
    assert all("melody_midi" in json.loads(line) for line in items)
    index = json.loads((model / "model_index.json").read_text())
    # The VAE's 8x compression reaches the model directory's geometry (not constants).
    assert index["geometry"]["vae_downsample"] == 8 and index["defaults"]["steps"] == 2
    transformer = load_transformer(model / "transformer")
    assert transformer.config.context_channels == 2 * transformer.config.in_channels + BEAT_CHANNELS + 3
    assert transformer.takes_beat and transformer.config.register_channels == 3
    assert float(transformer.context_in.weight.detach()[:, -BEAT_CHANNELS - 3:].abs().sum()) > 0  # trained from 0
    pipe = FluxMusicPipeline.from_pretrained(model)
    assert pipe.takes_context and pipe.control_channels == (BEAT_CHANNELS, 3)
    out = pipe("a fast piano melody", duration=2.56, seed=0)
    assert out.audio[0].shape == (40960,) and np.isfinite(out.audio[0]).all()
    cont = pipe("a fast piano melody", audio=out.audio[0], keep="0:1", duration=2.56, seed=1)
    assert cont.audio[0].shape == (40960,) and np.isfinite(cont.audio[0]).all()
    masked_log = (tmp_path / "run" / "runs" / "transformer_masked" / "log.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, masked_log) if r["event"] == "val"] == [0, 3]  # baseline, end
    # A second run finds every stage done and rebuilds nothing.
    again = io.StringIO()
    RecipeRun(RECIPES["toy"], tmp_path / "run", stream=again).run()
    assert "starting" not in again.getvalue() and "done already" in again.getvalue()
    assert not (tmp_path / "run" / ".model.plain").exists()


@pytest.mark.skipif(not (default_model_dir() / "model_index.json").is_file(), reason="no bundled default model")
def test_bundled_default_loads_and_generates():
    pipe = FluxMusicPipeline.from_pretrained()
    a = pipe("a slow sad piano melody in a low register", duration=1.28, steps=2, seed=3).audio[0]
    b = pipe("a slow sad piano melody in a low register", duration=1.28, steps=2, seed=3).audio[0]
    assert a.shape == (20480,) and np.isfinite(a).all()
    assert float(np.abs(a).max()) > 1e-3  # not silence
    np.testing.assert_array_equal(a, b)  # a seed fixes the output


@pytest.mark.parametrize("transformer_dtype", [torch.float16, torch.bfloat16])
def test_half_storage_halves_the_files_and_loads_back_in_fp32(tmp_path, transformer_dtype):
    from safetensors import safe_open

    from fluxmusic.tiny import build_tiny_model_dir
    from fluxmusic.training.recipe import store_half

    model = build_tiny_model_dir(tmp_path / "m")
    before = {p: p.stat().st_size for p in model.glob("*/*.safetensors")}
    ref = FluxMusicPipeline.from_pretrained(model)(["a slow soft piano"], duration=1.0, seed=3).audio[0]
    store_half(model, ("vae", "vocoder", "text_encoder", "clap"))
    store_half(model, ("transformer",), transformer_dtype)  # the default recipe stores its transformer bf16
    with safe_open(str(next((model / "transformer").glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {transformer_dtype}  # noqa: SIM118
    after = {p: p.stat().st_size for p in model.glob("*/*.safetensors")}
    assert all(after[p] < 0.6 * before[p] for p in before)
    pipe = FluxMusicPipeline.from_pretrained(model)
    assert next(pipe.backend.transformer.parameters()).dtype.is_floating_point
    assert all(p.dtype.itemsize == 4 for p in pipe.backend.vocoder.parameters())  # loaders upcast to fp32
    out = pipe(["a slow soft piano"], duration=1.0, seed=3).audio[0]
    snr = 10 * np.log10(np.sum(ref ** 2) / max(np.sum((out - ref) ** 2), 1e-20))
    assert snr > 15  # fp16 / bf16 rounding of the weights only


@pytest.mark.skipif(not (default_model_dir() / "model_index.json").is_file(), reason="no bundled default model")
def test_bundled_default_has_trained_conditioning_and_a_mel_matched_vocoder():
    """The bundle as documented: a transformer with the trained context input (continuation and infilling use it
    under --conditioning auto) and the Vocos vocoder with the mel-match projection on."""
    import json

    d = default_model_dir()
    assert json.loads((d / "transformer" / "config.json").read_text()).get("context_channels", 0) > 0
    assert json.loads((d / "vocoder" / "config.json").read_text()).get("mel_match_iterations", 0) > 0
    pipe = FluxMusicPipeline.from_pretrained()
    assert pipe.backend.takes_context


def test_set_vocoder_mel_match_turns_the_projection_on_and_refuses_hifigan(tmp_path):
    import json
    import shutil

    from fluxmusic.components import load_vocoder
    from fluxmusic.errors import FluxMusicError
    from fluxmusic.tiny import build_tiny_model_dir
    from fluxmusic.training.recipe import set_vocoder_mel_match

    vocos = tmp_path / "vocoder"
    shutil.copytree(default_model_dir() / "vocoder", vocos)
    set_vocoder_mel_match(vocos, 3, 0.5)
    assert json.loads((vocos / "config.json").read_text())["mel_match_iterations"] == 3
    config = load_vocoder(vocos).config
    assert config.mel_match_iterations == 3 and config.mel_match_momentum == 0.5
    hifigan = build_tiny_model_dir(tmp_path / "tiny") / "vocoder"
    with pytest.raises(FluxMusicError, match="mel-match projection is a Vocos vocoder option"):
        set_vocoder_mel_match(hifigan, 3)
