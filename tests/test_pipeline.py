"""Text-to-music end to end on a tiny model directory built from the real component classes."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from fluxmusic.cli import main
from fluxmusic.components import load_clap_text, load_vocoder
from fluxmusic.errors import FluxMusicError
from fluxmusic.pipeline import FluxMusicPipeline


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max-abs difference relative to the signal's peak (random tiny vocoders output tiny amplitudes)."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_generate_cli_writes_audio(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.wav"
    rc = main(["generate", "a slow piano melody", "-o", str(out), "--model", str(tiny_model_dir),
               "--duration", "1.5", "--steps", "2", "--seed", "3", "--quiet"])
    assert rc == 0
    wave, sr = sf.read(out)
    assert sr == 16000 and wave.shape == (24000,)
    assert "wrote" in capsys.readouterr().out


def test_prompts_file_and_formats(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("fast drums\n\ncalm pad\n")
    rc = main(["generate", "--prompts-file", str(prompts), "-o", str(tmp_path / "x.flac"), "--model",
               str(tiny_model_dir), "--duration", "0.5", "--steps", "1", "--quiet", "--seed", "1"])
    assert rc == 0
    for i in range(2):
        wave, sr = sf.read(tmp_path / f"x_{i:02d}.flac")
        assert sr == 16000 and len(wave) == 8000


def test_same_seed_same_audio_and_batch_equals_alone(tiny_pipe):
    kw = dict(duration=1.0, steps=3, guidance=4.0)
    a = tiny_pipe(["a slow piano melody", "fast drums", "calm pad"], seed=10, **kw)
    b = tiny_pipe(["a slow piano melody", "fast drums", "calm pad"], seed=10, **kw)
    assert a.seeds == [10, 11, 12]
    for x, y in zip(a.audio, b.audio):
        assert np.array_equal(x, y)
    alone = tiny_pipe("fast drums", seed=11, **kw)
    # Same noise and conditioning; CPU GEMMs may round differently for another batch size (~1e-7 relative).
    assert rel_diff(alone.audio[0], a.audio[1]) <= 1e-5
    different = tiny_pipe("fast drums", seed=99, **kw)
    assert rel_diff(different.audio[0], a.audio[1]) > 1e-2


def test_per_item_seeds_and_waveforms_per_prompt(tiny_pipe):
    r = tiny_pipe("calm pad", seed=[5, 7], num_waveforms_per_prompt=2, duration=0.5, steps=2)
    assert r.seeds == [5, 7] and len(r.audio) == 2
    alone = tiny_pipe("calm pad", seed=7, duration=0.5, steps=2)
    assert rel_diff(alone.audio[0], r.audio[1]) <= 1e-5


def test_default_negative_prompt_runs_no_encoder(tiny_model_dir):
    pipe = FluxMusicPipeline.from_pretrained(tiny_model_dir)
    pipe("bright bell melody", duration=0.5, steps=1, seed=0)
    assert pipe.encoders.calls == 1  # the prompt only; "" came from null_embeddings.safetensors
    pipe("bright bell melody", duration=0.5, steps=1, seed=0)
    assert pipe.encoders.calls == 1  # cached prompt
    pipe("bright bell melody", negative_prompt="low quality, gentle", duration=0.5, steps=1, seed=0)
    pipe("bright bell melody", negative_prompt="low quality, gentle", duration=0.5, steps=1, seed=0)
    assert pipe.encoders.calls == 2  # the other negative prompt is encoded once, then cached


def test_null_embeddings_equal_encoding_empty_string(tiny_pipe):
    enc = tiny_pipe.encode_text([""])
    assert torch.allclose(enc.txt, tiny_pipe.null.txt, atol=1e-6)
    assert torch.allclose(enc.y, tiny_pipe.null.y, atol=1e-6)


def test_progress_callback_and_abort(tiny_pipe):
    seen = []
    tiny_pipe("calm pad", duration=0.5, steps=3, seed=0, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    def stop(i, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_pipe("calm pad", duration=0.5, steps=3, seed=0, progress=stop)


def test_duration_is_trimmed_from_the_patch_grid(tiny_pipe):
    r = tiny_pipe("calm pad", duration=0.33, steps=1, seed=0)
    assert r.audio[0].shape == (5280,) and r.audio[0].dtype == np.float32


def test_clap_full_checkpoint_loads_real_text_weights(tiny_model_dir):
    """Upstream's ClapTextModel.from_pretrained on a full ClapModel finds no keys; ours must load them."""
    text = load_clap_text(tiny_model_dir / "clap")
    saved = load_file(str(tiny_model_dir / "clap" / "model.safetensors"))
    for name, tensor in text.state_dict().items():
        key = f"text_model.{name}"
        if key in saved:
            assert torch.equal(tensor, saved[key]), key
    assert sum(f"text_model.{n}" in saved for n in text.state_dict()) >= len(text.state_dict()) - 1


def test_component_with_missing_tensor_is_refused(tiny_model_dir, tmp_path):
    broken = tmp_path / "vocoder"
    shutil.copytree(tiny_model_dir / "vocoder", broken)
    state = load_file(str(broken / "model.safetensors"))
    victim = sorted(state)[3]
    del state[victim]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FluxMusicError, match=victim.replace(".", r"\.")):
        load_vocoder(broken)


def test_clap_text_tower_missing_tensor_is_refused(tiny_model_dir, tmp_path):
    broken = tmp_path / "clap"
    shutil.copytree(tiny_model_dir / "clap", broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["text_model.embeddings.word_embeddings.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FluxMusicError, match="word_embeddings"):
        load_clap_text(broken)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--duration", "0"], "duration 0.0 is invalid; allowed: seconds in [0.04, 300]"),
        (["--duration", "301"], "duration 301.0 is invalid"),
        (["--steps", "0"], "steps 0 is invalid; allowed: an integer in [1, 1000]"),
        (["--guidance", "nan"], "guidance nan is invalid; allowed: a number in [0, 100]"),
        (["--guidance", "inf"], "guidance inf is invalid"),
        (["--guidance", "-3"], "guidance -3.0 is invalid"),
        (["--shift", "1e-300"], "shift 1e-300 is invalid; allowed: a number in [0.01, 100]"),
        (["--shift", "abc"], "shift 'abc' is invalid"),
        (["--seed", "-2"], "seed -2 is invalid; allowed: -1 (random) or an integer"),
        (["--num-waveforms", "0"], "num_waveforms 0 is invalid"),
        (["--guidance-interval", "0.5", "0.5"], "guidance_interval (0.5, 0.5) is invalid"),
        (["--cache-threshold", "-1"], "cache_threshold -1.0 is invalid; allowed: a number in [0, 1]"),
        (["--negative-prompt", "n" * 3000], "negative_prompt 'nnnn"),
        (["--official", "--preset", "official", "--solver", "rk4"], None),
        (["--dtype", "float8"], None),  # argparse: invalid choice
        (["--solver", "rk4"], None),
        (["--device", "cuda"], "CUDA is not available"),
        (["--device", "tpu9"], "not a valid torch device"),
    ],
)
def test_bad_inputs_exit_2_with_a_clear_message(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "o.wav"
    argv = ["generate", "calm pad", "-o", str(out), "--model", str(tiny_model_dir), "--steps", "1", "--quiet", *args]
    if message is None:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    else:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_empty_prompt_missing_model_and_unwritable_output(tiny_model_dir, tmp_path, capsys):
    common = ["--model", str(tiny_model_dir), "--steps", "1", "--quiet"]
    assert main(["generate", "  ", "-o", str(tmp_path / "a.wav"), *common]) == 2
    assert "prompt '  ' is invalid; allowed: a non-empty string" in capsys.readouterr().err
    assert main(["generate", "x" * 2001, "-o", str(tmp_path / "a.wav"), *common]) == 2
    err = capsys.readouterr().err
    assert "prompt 'xxx" in err and "at most 2000 characters (got 2001)" in err and len(err) < 300
    assert main(["generate", "x", "-o", str(tmp_path / "a.wav"), "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(tmp_path / "no" / "dir" / "a.wav"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "d.wav").mkdir()
    assert main(["generate", "x", "-o", str(tmp_path / "d.wav"), *common]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "d.wav").rmdir()
    assert main(["generate", "x", "-o", str(tmp_path / "a.mp3"), *common]) == 2
    assert "allowed: .wav, .flac, .ogg" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_incomplete_model_directory(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vocoder")
    assert main(["generate", "x", "-o", str(tmp_path / "a.wav"), "--model", str(broken)]) == 2
    assert "incomplete; missing: vocoder" in capsys.readouterr().err
    (broken / "model_index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FluxMusicError, match="format 'other'"):
        FluxMusicPipeline.from_pretrained(broken)


def test_official_option_uses_the_official_settings(tiny_model_dir, tmp_path, monkeypatch):
    import dataclasses

    seen = []
    real = FluxMusicPipeline.generate

    def spy(self, request, progress=None):
        seen.append(request.settings)
        fast = dataclasses.replace(request.settings, steps=1)  # keep the test fast: 1 step
        return real(self, dataclasses.replace(request, settings=fast), progress)

    monkeypatch.setattr(FluxMusicPipeline, "generate", spy)
    argv = ["generate", "calm pad", "-o", str(tmp_path / "o.wav"), "--model", str(tiny_model_dir), "--duration",
            "0.5", "--quiet"]
    assert main([*argv, "--official"]) == 0
    st = seen[-1]
    assert (st.steps, st.guidance, st.solver, st.shift, st.negative_prompt) == (
        50, 7.0, "euler", None, "low quality, gentle")
    # An explicit option wins over the preset (and the CLI prints the settings it runs with).
    assert main([*argv, "--official", "--negative-prompt", "", "--steps", "7"]) == 0
    assert (seen[-1].steps, seen[-1].negative_prompt, seen[-1].guidance) == (7, "", 7.0)
