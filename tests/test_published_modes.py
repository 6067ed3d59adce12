"""Files and directories our atomic writers publish get a plain create's permissions, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from fluxmusic.audio import write_audio
from fluxmusic.checkpoint import atomic_save_safetensors, atomic_write_bytes
from fluxmusic.tempfiles import publish
from fluxmusic.training.saving import atomic_save_dir


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_written_files_and_dirs_are_readable_by_others(tmp_path, umask):
    umask(0o022)
    write_audio(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    atomic_write_bytes(tmp_path / "b.bin", b"x")
    atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "c.safetensors")

    def write(d: str) -> None:
        (open(os.path.join(d, "f.txt"), "w")).close()

    atomic_save_dir(write, tmp_path / "comp")
    for name in ("a.wav", "b.bin", "c.safetensors", "comp/f.txt"):
        assert _mode(tmp_path / name) == 0o644, name
    assert _mode(tmp_path / "comp") == 0o755


def test_private_umask_is_respected_and_set_modes_kept(tmp_path, umask):
    umask(0o077)
    write_audio(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    assert _mode(tmp_path / "a.wav") == 0o600
    umask(0o022)
    p = tmp_path / "script.sh"
    p.write_text("#!/bin/sh\n")
    p.chmod(0o700)
    publish(p)
    assert _mode(p) == 0o755  # a private executable stays executable
    q = tmp_path / "shared.txt"
    q.write_text("")
    q.chmod(0o640)
    publish(q)
    assert _mode(q) == 0o640  # not private: chosen on purpose, left alone
