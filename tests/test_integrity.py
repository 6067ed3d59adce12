"""Issue 17, items 7 and 8: bit flips in training checkpoints and exported weights are detected on load; a
killed writer's temporaries are removed when the run starts again."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxmusic import integrity
from fluxmusic.config import FluxMusicConfig
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer
from fluxmusic.training.cache import CachedEmbeddingDataset, write_cache
from fluxmusic.training.checkpointing import CHECKPOINT_NAME, CHECKSUMS, read_checkpoint
from fluxmusic.training.config import TrainConfig
from fluxmusic.training.loop import LOG_NAME, train
from fluxmusic.training.transformer_task import TransformerTask
from fluxmusic.transformer_io import WEIGHTS_NAME, load_transformer, save_transformer

MICRO = FluxMusicConfig(in_channels=32, vec_in_dim=16, context_in_dim=24, hidden_size=32, num_heads=2, depth=1,
                        depth_single_blocks=1, axes_dim=(4, 6, 6))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)

    def items():
        for i in range(8):
            code = torch.randn(24, generator=g)
            yield {"latent": torch.randn(8, 4, 4, generator=g), "txt": code.expand(3, 24).clone(),
                   "y": code[:16].clone(), "caption": f"c{i}"}

    return write_cache(tmp_path_factory.mktemp("cache") / "cache", items(), null_txt=torch.zeros(3, 24),
                       null_y=torch.zeros(16), shard_size=8)


def run(cache: Path, run_dir: Path, steps: int, resume: bool = False):
    ds = CachedEmbeddingDataset(cache)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, log_every=1, ckpt_every=1, seed=1, device="cpu")
    return train(TransformerTask(MICRO, ds, ds.null_txt, ds.null_y), cfg, run_dir, resume=resume)


def zip_record_span(path: Path, min_bytes: int = 4096) -> tuple[int, int]:
    """(offset, size) of the largest stored tensor record inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.file_size >= min_bytes and info.compress_type == zipfile.ZIP_STORED
    with path.open("rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------- item 7
def test_bit_flips_in_a_training_checkpoint_are_detected(cache, tmp_path):
    run_dir = tmp_path / "run"
    run(cache, run_dir, steps=2)
    ckpt_path = run_dir / CHECKPOINT_NAME
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert CHECKSUMS in ckpt and integrity.PLAIN_KEY in ckpt[CHECKSUMS]
    assert "/model/double_blocks.0.img_attn.qkv.weight" in ckpt[CHECKSUMS]
    read_checkpoint(ckpt_path)  # verifies

    offset, size = zip_record_span(ckpt_path)
    flip(ckpt_path, offset + size // 2)  # 64 bytes inside one tensor: still a loadable file
    torch.load(ckpt_path, weights_only=True)  # torch does not notice
    with pytest.raises(FluxMusicError, match="fails its checksums.*changed: /"):
        run(cache, run_dir, steps=4, resume=True)


def test_changed_plain_value_is_detected(cache, tmp_path):
    run(cache, tmp_path / "run", steps=1)
    path = tmp_path / "run" / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    ckpt["step"] = 7  # what a flipped bit in the pickled structure can do
    torch.save(ckpt, path)
    with pytest.raises(FluxMusicError, match=integrity.PLAIN_KEY):
        read_checkpoint(path)


def test_checkpoint_without_checksums_still_loads(cache, tmp_path):
    run(cache, tmp_path / "run", steps=1)
    path = tmp_path / "run" / CHECKPOINT_NAME
    ckpt = torch.load(path, weights_only=True)
    del ckpt[CHECKSUMS]
    torch.save(ckpt, path)
    assert run(cache, tmp_path / "run", steps=2, resume=True).step == 2


def test_bit_flips_in_exported_safetensors_are_detected(tmp_path):
    model = FluxMusicTransformer(MICRO)
    out = save_transformer(model, tmp_path / "t")
    path = out / WEIGHTS_NAME
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + n])
    assert integrity.METADATA_KEY in header["__metadata__"]
    begin, end = header["double_blocks.0.img_attn.qkv.weight"]["data_offsets"]
    flip(path, 8 + n + (begin + end) // 2, 64)
    load_file(str(path))  # safetensors does not notice
    with pytest.raises(FluxMusicError, match="fails its checksums.*double_blocks.0.img_attn.qkv.weight"):
        load_transformer(out)


def test_safetensors_without_checksums_still_load(tmp_path):
    model = FluxMusicTransformer(MICRO)
    out = save_transformer(model, tmp_path / "t")
    state = load_file(str(out / WEIGHTS_NAME))
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})  # as written before issue 17
    loaded = load_transformer(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_onnx_manifest_checksums_are_verified(tmp_path):
    from fluxmusic.export.onnx_export import _file_entry, verify_file_entry

    (tmp_path / "g.onnx").write_bytes(b"graph" * 100)
    (tmp_path / "g.onnx.data").write_bytes(b"weights" * 100)
    entry = _file_entry(tmp_path, "g.onnx")
    assert "external_data_sha256" in entry
    verify_file_entry(tmp_path, entry)
    flip(tmp_path / "g.onnx.data", 10, 1)
    with pytest.raises(FluxMusicError, match=r"g\.onnx\.data fails its checksum"):
        verify_file_entry(tmp_path, entry)


# ------------------------------------------------------------------------------------------- item 8
def test_stale_temporaries_are_removed_on_start(cache, tmp_path):
    run_dir = tmp_path / "run"
    run(cache, run_dir, steps=1)
    # What SIGKILLs during writes leave behind (names as tempfile.mkstemp / mkdtemp make them) ...
    stale = [run_dir / ".checkpoint.pt.k2j3h4g5.tmp", run_dir / ".train_config.json.a_b1c2d3.tmp",
             run_dir / "export" / ".model.safetensors.zz99yy88.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 100_000)
    (run_dir / ".export.q1w2e3r4").mkdir()
    (run_dir / ".export.q1w2e3r4" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run_dir / ".export.old").mkdir()
    # ... and what is not ours: kept.
    keep = [run_dir / ".notes", run_dir / "notes.tmp", run_dir / ".checkpoint.pt.short.tmp", run_dir / "a.b.c.tmp"]
    for p in keep:
        p.write_text("mine")
    run(cache, run_dir, steps=2, resume=True)
    assert not any(p.exists() for p in stale)
    assert not (run_dir / ".export.q1w2e3r4").exists() and not (run_dir / ".export.old").exists()
    assert all(p.read_text() == "mine" for p in keep)
    events = [json.loads(line) for line in (run_dir / LOG_NAME).read_text().splitlines()]
    cleanup = [e for e in events if e["event"] == "cleanup"]
    assert len(cleanup) == 1 and cleanup[0]["bytes"] == 301_000 and len(cleanup[0]["removed"]) == 5
