"""Capturing and restoring every random number generator a training step may touch.

States are packed as fixed-shape tensors (no numpy arrays, no custom objects) so a checkpoint can be read
back with ``torch.load(weights_only=True)`` and the states of all DDP ranks can be gathered with one
``all_gather`` per entry.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

RngState = dict[str, Tensor]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture(generator: torch.Generator | None = None, device: torch.device | None = None) -> RngState:
    """The global torch/numpy/python RNG states (plus ``generator`` and the CUDA device's) as tensors."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_meta": torch.tensor([version, gauss_next is not None], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss_next or 0.0], dtype=torch.float64),
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: RngState, generator: torch.Generator | None = None, device: torch.device | None = None) -> None:
    """Inverse of :func:`capture`."""
    torch.set_rng_state(state["torch"].cpu())
    pos, has_gauss = (int(v) for v in state["numpy_meta"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_gauss"][0]))
    )
    version, has_py_gauss = (int(v) for v in state["python_meta"])
    gauss = float(state["python_gauss"][0]) if has_py_gauss else None
    random.setstate((version, tuple(int(v) for v in state["python_internal"]), gauss))
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"].cpu())
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


@contextlib.contextmanager
def preserved(generator: torch.Generator | None = None, device: torch.device | None = None) -> Iterator[None]:
    """Run a block (validation, sampling) without disturbing the training RNG streams.

    Whether or not a run validates at some step must not change its training trajectory, or a resumed run
    with different ``--val-every`` (or a hook that draws random numbers) would diverge.
    """
    state = capture(generator, device)
    try:
        yield
    finally:
        restore(state, generator, device)
