"""Strict, safe loading of transformer checkpoints and the convert command."""

import argparse
import os

import pytest
import torch

from fluxmusic.checkpoint import load_weights, read_state_dict
from fluxmusic.cli import main
from fluxmusic.config import CONFIGS
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.transformer_io import convert_checkpoint, load_transformer


@pytest.fixture()
def tiny_official_pt(tmp_path):
    """An official-format checkpoint: {"ema", "opt", "args": argparse.Namespace}."""
    model = FluxMusicTransformer(CONFIGS["tiny"])
    ckpt = {"ema": model.state_dict(), "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(version="tiny", lr=1e-4)}
    path = tmp_path / "musicflow_tiny.pt"
    torch.save(ckpt, path)
    return path, model


def test_official_pt_converts_and_loads_identically(tiny_official_pt, tmp_path):
    path, model = tiny_official_pt
    out = convert_checkpoint(path, tmp_path / "conv", CONFIGS["tiny"])
    loaded = load_transformer(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_convert_cli(tiny_official_pt, tmp_path):
    path, _ = tiny_official_pt
    assert main(["convert", str(path), str(tmp_path / "c"), "--config", "tiny"]) == 0
    assert (tmp_path / "c" / "model.safetensors").is_file() and (tmp_path / "c" / "config.json").is_file()
    assert main(["convert", str(path), str(tmp_path / "d"), "--config", "small"]) == 2  # mis-shaped
    assert not (tmp_path / "d" / "model.safetensors").exists()


def test_bare_state_dict_and_ddp_prefix(tmp_path):
    model = FluxMusicTransformer(CONFIGS["tiny"])
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "bare.pt")
    state = read_state_dict(tmp_path / "bare.pt")
    load_weights(FluxMusicTransformer(CONFIGS["tiny"]), state)


@pytest.mark.parametrize("change", ["rename", "remove", "reshape"])
def test_broken_checkpoint_names_the_key(tiny_official_pt, tmp_path, change):
    path, model = tiny_official_pt
    state = dict(model.state_dict())
    key = "double_blocks.0.img_attn.qkv.weight"
    if change == "rename":
        state["double_blocks.0.img_attn.qkv_renamed.weight"] = state.pop(key)
    elif change == "remove":
        del state[key]
    else:
        state[key] = state[key][:-1]
    torch.save({"ema": state}, tmp_path / "broken.pt")
    target = FluxMusicTransformer(CONFIGS["tiny"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(FluxMusicError, match=key.replace(".", r"\.")):
        load_weights(target, read_state_dict(tmp_path / "broken.pt"), "broken.pt")
    # all-or-nothing: nothing was copied into the model
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_arbitrary_object_is_refused(tmp_path):
    torch.save({"ema": {}, "payload": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(FluxMusicError, match="refusing to unpickle"):
        read_state_dict(tmp_path / "evil.pt")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FluxMusicError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FluxMusicError, match="not a readable safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(FluxMusicError, match="cannot be read|refusing"):
        read_state_dict(tmp_path / "trunc.pt")
