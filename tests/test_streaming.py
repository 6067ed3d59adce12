"""Safetensors streamed tensor by tensor; the transformer loaded into its final dtype through a meta model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxmusic.config import CONFIGS
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.streaming import SafetensorsReader, save_state_streaming
from fluxmusic.transformer_io import WEIGHTS_NAME, convert_checkpoint, load_transformer, save_transformer


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).bfloat16(),
        "c.half": torch.randn(2, 2, generator=g).half(),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(6, dtype=torch.int64).view(2, 3),
        "mask": torch.tensor([True, False, True]),
    }


def test_streamed_file_is_standard_safetensors(tmp_path):
    state = _tensors()
    save_state_streaming(state, tmp_path / "s.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "s.safetensors"))
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_reader_reads_library_files_and_casts(tmp_path):
    state = _tensors()
    save_file(state, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    r = SafetensorsReader(tmp_path / "lib.safetensors")
    assert r.metadata == {"k": "v"} and set(r.keys()) == set(state)
    assert r.shape("a.weight") == (3, 5) and r.dtype("b") == torch.bfloat16
    with r:
        for k, v in state.items():
            assert torch.equal(r.read(k), v), k
        assert r.read("a.weight", torch.bfloat16).dtype == torch.bfloat16
        assert torch.equal(r.read("a.weight", torch.bfloat16), state["a.weight"].bfloat16())


def test_reader_refuses_truncated_and_garbage(tmp_path):
    save_state_streaming(_tensors(), tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-8])
    with pytest.raises(FluxMusicError, match="do not match its size or the file"):
        SafetensorsReader(tmp_path / "t.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(FluxMusicError, match="not a readable safetensors file"):
        SafetensorsReader(tmp_path / "g.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_transformer_streams_into_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    model = FluxMusicTransformer(CONFIGS["tiny"]).eval()
    save_transformer(model, tmp_path / "tr")
    loaded = load_transformer(tmp_path / "tr", dtype=dtype)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in loaded.parameters())
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(dtype)), k
    cfg = model.config
    x, t = torch.randn(1, 4, cfg.in_channels), torch.tensor([0.5])
    txt, y = torch.randn(1, 3, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim)
    with torch.no_grad():
        out = loaded(x.to(dtype), t.to(dtype), txt.to(dtype), y.to(dtype), loaded.rope_for(3, 2, 2))
        ref = model(x, t, txt, y, model.rope_for(3, 2, 2))
    assert torch.allclose(out.float(), ref, atol=0.05 if dtype == torch.bfloat16 else 1e-6)


def test_load_transformer_is_strict_in_one_error(tmp_path):
    model = FluxMusicTransformer(CONFIGS["tiny"])
    save_transformer(model, tmp_path / "tr")
    state = load_file(str(tmp_path / "tr" / WEIGHTS_NAME))
    del state["img_in.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["txt_in.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "tr" / WEIGHTS_NAME))
    with pytest.raises(FluxMusicError) as e:
        load_transformer(tmp_path / "tr")
    msg = str(e.value)
    assert "missing keys: img_in.weight" in msg and "unexpected keys: extra.weight" in msg
    assert "mis-shaped keys: txt_in.bias (checkpoint (3,)" in msg


def test_convert_safetensors_input(tmp_path):
    model = FluxMusicTransformer(CONFIGS["tiny"])
    save_file({k: v.bfloat16().contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = convert_checkpoint(tmp_path / "w.safetensors", tmp_path / "conv", CONFIGS["tiny"])
    back = load_file(str(out / WEIGHTS_NAME))
    for k, v in model.state_dict().items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v.bfloat16().float()), k
