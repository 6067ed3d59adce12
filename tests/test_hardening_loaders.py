"""Issue 17, items 5, 6, 12: every loader fault is one FluxMusicError (CLI exit 2), never a traceback; an
inconsistent geometry and symlinks leading outside the model directory are refused at load."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fluxmusic.cli import main
from fluxmusic.errors import FluxMusicError
from fluxmusic.modelcheck import ALLOW_LINKS_ENV
from fluxmusic.pipeline import FluxMusicPipeline


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _truncate(rel: str) -> Callable[[Path], None]:
    def f(d: Path) -> None:
        p = d / rel
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])

    return f


def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def f(d: Path) -> None:
        p = d / rel
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)

    return f


def _edit_json(rel: str, *keys: str, value) -> Callable[[Path], None]:
    def f(d: Path) -> None:
        p = d / rel
        j = json.loads(p.read_text())
        node = j
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        p.write_text(json.dumps(j))

    return f


def _pickle_only(d: Path) -> None:
    (d / "vocoder" / "model.safetensors").unlink()
    (d / "vocoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": 1}))


DEEP = "[" * 200_000 + "]" * 200_000

#: name -> (mutation, a phrase the one message must contain)
FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated vocoder": (_truncate("vocoder/model.safetensors"), "truncated"),
    "truncated text_encoder": (_truncate("text_encoder/model.safetensors"), "truncated"),
    "truncated clap": (_truncate("clap/model.safetensors"), "truncated"),
    "truncated vae": (_truncate("vae/diffusion_pytorch_model.safetensors"), "truncated"),
    "truncated transformer": (_truncate("transformer/model.safetensors"), "truncated"),
    "truncated null embeddings": (_truncate("null_embeddings.safetensors"), "truncated"),
    "safetensors header garbage": (_write("vocoder/model.safetensors", b"\xff" * 64), "not safetensors"),
    "index not utf8": (_write("model_index.json", b"\xff\xfe{}"), "not UTF-8"),
    "index is a list": (_write("model_index.json", "[1, 2]"), "JSON object"),
    "index nested 200k": (_write("model_index.json", DEEP), "nested too deeply"),
    "transformer config not utf8": (_write("transformer/config.json", b"\xff\xfe{}"), "not UTF-8"),
    "transformer config is a list": (_write("transformer/config.json", "[]"), "JSON object"),
    "transformer config nested 200k": (_write("transformer/config.json", DEEP), "nested too deeply"),
    "vocoder config nested 200k": (_write("vocoder/config.json", DEEP), "nested too deeply"),
    "hop_length abc": (_edit_json("model_index.json", "geometry", "hop_length", value="abc"), "hop_length"),
    "sample_rate 0": (_edit_json("model_index.json", "geometry", "sample_rate", value=0), "sample_rate"),
    "max_duration nan": (_edit_json("model_index.json", "geometry", "max_duration", value="NaN"), "max_duration"),
    "geometry a string": (_edit_json("model_index.json", "geometry", value="abc"), "geometry"),
    "t5_max_length -5": (_edit_json("model_index.json", "text", "t5_max_length", value=-5), "t5_max_length"),
    "clap_max_length 1.5": (_edit_json("model_index.json", "text", "clap_max_length", value=1.5), "clap_max_length"),
    "axes_dim abc": (_edit_json("transformer/config.json", "axes_dim", value="abc"), "axes_dim"),
    "hidden_size string": (_edit_json("transformer/config.json", "hidden_size", value="64"), "hidden_size"),
    "tokenizer.json nested 200k": (_write("tokenizer/tokenizer.json", DEEP), "nested too deeply"),
    "tokenizer_config.json a list": (_write("clap_tokenizer/tokenizer_config.json", "[]"), "JSON object"),
    "tokenizer.json truncated": (_truncate("tokenizer/tokenizer.json"), "not valid JSON"),
    "vocoder upsample_rates a string": (_edit_json("vocoder/config.json", "upsample_rates", value="abc"),
                                        "upsample_rates"),
    "clap text_config a string": (_edit_json("clap/config.json", "text_config", value="abc"), "text_config"),
    "pickle bin only": (_pickle_only, "pickle"),
    # item 6: geometry consistency
    "vocoder upsampling 128 != hop 160": (
        _edit_json("vocoder/config.json", "upsample_rates", value=[4, 4, 2, 2, 2]), "upsample_rates product"),
    "vocoder mel bins differ": (_edit_json("vocoder/config.json", "model_in_dim", value=80), "model_in_dim"),
    "vocoder sampling rate differs": (_edit_json("vocoder/config.json", "sampling_rate", value=22050), "sampling_rate"),
    "vae latent channels differ": (_edit_json("vae/config.json", "latent_channels", value=4), "latent_channels"),
    "vae levels differ": (_edit_json("vae/config.json", "block_out_channels", value=[8, 16]), "downsampling"),
    "max_duration 1e9": (_edit_json("model_index.json", "geometry", "max_duration", value=1e9), "music tokens"),
    "clap_max_length beyond positions": (
        _edit_json("model_index.json", "text", "clap_max_length", value=200), "CLAP text tower supports"),
    "transformer width differs": (_edit_json("transformer/config.json", "context_in_dim", value=96), "context_in_dim"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_loader_fault_is_one_clear_error(model_copy, name):
    mutate, phrase = FAULTS[name]
    mutate(model_copy)
    with pytest.raises(FluxMusicError) as info:
        FluxMusicPipeline.from_pretrained(model_copy)
    assert phrase in str(info.value), str(info.value)
    assert len(str(info.value)) < 1000  # one message, not a dump


@pytest.mark.parametrize("name", ["truncated clap", "index nested 200k", "pickle bin only", "max_duration 1e9"])
def test_cli_exits_2_with_one_line(model_copy, name, tmp_path, capsys):
    FAULTS[name][0](model_copy)
    code = main(["generate", "music", "--model", str(model_copy), "-o", str(tmp_path / "x.wav"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and err.startswith("fluxmusic generate: error:")
    assert not (tmp_path / "x.wav").exists()


def test_pickle_beside_safetensors_is_never_unpickled(model_copy):
    """A .bin next to the safetensors is ignored (use_safetensors=True), never executed."""
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(model_copy / "PWNED"),))

    (model_copy / "vocoder" / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    FluxMusicPipeline.from_pretrained(model_copy)
    assert not (model_copy / "PWNED").exists()


# ------------------------------------------------------------------------------------------- item 12: symlinks
def _link_weights_outside(model_copy: Path, tmp_path: Path) -> Path:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    weights = model_copy / "vocoder" / "model.safetensors"
    shutil.move(weights, outside / "model.safetensors")
    weights.symlink_to(outside / "model.safetensors")
    return outside


def test_symlink_outside_is_refused(model_copy, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_LINKS_ENV, raising=False)
    _link_weights_outside(model_copy, tmp_path)
    with pytest.raises(FluxMusicError, match="symlinks pointing outside"):
        FluxMusicPipeline.from_pretrained(model_copy)


def test_symlinked_component_dir_outside_is_refused(model_copy, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_LINKS_ENV, raising=False)
    shutil.move(model_copy / "vae", tmp_path / "vae")
    (model_copy / "vae").symlink_to(tmp_path / "vae", target_is_directory=True)
    with pytest.raises(FluxMusicError, match="vae ->"):
        FluxMusicPipeline.from_pretrained(model_copy)


def test_symlink_inside_is_fine_and_outside_allowed_by_flag(model_copy, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_LINKS_ENV, raising=False)
    inside = model_copy / "transformer" / "model.safetensors"
    shutil.move(inside, model_copy / "transformer" / "weights.bin.safetensors")
    inside.symlink_to("weights.bin.safetensors")  # relative, inside: fine
    _link_weights_outside(model_copy, tmp_path)
    out = tmp_path / "x.wav"
    args = ["generate", "music", "--model", str(model_copy), "-o", str(out), "--quiet", "--steps", "1",
            "--duration", "0.2"]
    assert main(args) == 2
    assert main(["--allow-external-links", *args]) == 0 and out.is_file()
