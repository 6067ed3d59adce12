"""Shared fixtures: paths to the shared parity data, and tiny models built with random weights."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is imported: set it before any test module can import triton, so the
# kernel tests (tests/test_kernels.py) run on CPU tensors through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TESTDATA = SHARED / "testdata"


@pytest.fixture(scope="session")
def official_configs() -> dict:
    return json.loads((TESTDATA / "official_configs.json").read_text())


@pytest.fixture(scope="session")
def official_tiny() -> dict:
    """The official parity case: meta, weights (official names) and arrays as torch tensors."""
    z = np.load(TESTDATA / "official_tiny_a.npz")
    meta = json.loads(bytes(z["meta_json"]))
    state = {k[len("state.") :]: torch.from_numpy(z[k]) for k in z.files if k.startswith("state.")}
    arrays = {k: torch.from_numpy(z[k]) for k in z.files if not k.startswith("state.") and k != "meta_json"}
    return {"meta": meta, "state": state, **arrays}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny model directory of the real component classes (random weights), built once."""
    from fluxmusic.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def context_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model directory with its transformer extended by a context input (trained masked conditioning)
    whose weights are seeded, non-zero values: a trained-looking one, so the trained route differs from replace."""
    import shutil

    import torch

    from fluxmusic.model import add_context_input
    from fluxmusic.transformer_io import load_transformer, save_transformer

    d = tmp_path_factory.mktemp("ctx") / "model"
    shutil.copytree(tiny_model_dir, d)
    ext = add_context_input(load_transformer(tiny_model_dir / "transformer"))
    with torch.no_grad():
        ext.context_in.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        ext.context_in.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    shutil.rmtree(d / "transformer")
    save_transformer(ext, d / "transformer")
    return d


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir):
    from fluxmusic.pipeline import FluxMusicPipeline

    return FluxMusicPipeline.from_pretrained(tiny_model_dir, dtype="fp32")  # exactness tests compare to fp32 math


@pytest.fixture()
def one_torch_thread():
    """One torch thread: on a shared CPU extra threads mostly spin-wait (results do not depend on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
