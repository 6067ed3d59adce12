"""The dependency direction of DESIGN.md (core <- kernels <- export <- runtime) and the declared backend protocols."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from fluxmusic.backend import Backend, EncoderBackend, StepBackend, TorchBackend, fused_step

ROOT = Path(__file__).resolve().parents[1]
#: folder -> import prefixes its modules must never import (at module level or inside a function)
FORBIDDEN = {
    "fluxmusic": ("fluxmusic.export", "fluxmusic.runtime", "fluxmusic.kernels"),
    "kernels": ("fluxmusic.export", "fluxmusic.runtime"),
    "export": ("fluxmusic.runtime",),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_dependencies_flow_one_way(folder):
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, name in _imports(path):
            if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    # The core reaches the kernels only through its OpSet hook, never by import (they register themselves).
    assert bad == [], "\n".join(bad)


def test_the_torch_backend_declares_what_it_provides(tiny_model_dir):
    from fluxmusic.modeldir import read_index

    be = TorchBackend(tiny_model_dir, read_index(tiny_model_dir), "cpu", torch.float32)
    assert isinstance(be, Backend) and isinstance(be, EncoderBackend)
    assert not isinstance(be, StepBackend) and fused_step(be) is None


def test_the_bls_backend_is_a_backend(tiny_model_dir):
    from fluxmusic.export.spec import component_specs
    from fluxmusic.runtime.triton_bls import InferBackend

    from fluxmusic.config import FluxMusicConfig
    from fluxmusic.modeldir import read_index

    cfg = FluxMusicConfig.load(tiny_model_dir / "transformer" / "config.json")
    be = InferBackend(lambda name, inputs: {}, cfg, component_specs(cfg, read_index(tiny_model_dir).geometry, 48, 32))
    assert isinstance(be, Backend)


def test_make_backend_refuses_an_object_that_is_not_a_backend(tiny_model_dir, monkeypatch):
    import fluxmusic.backend as backend_module
    import fluxmusic.errors
    from fluxmusic.modeldir import read_index

    class NotABackend:  # has a name, lacks every call
        name = "bogus"

        def __init__(self, *args, **kwargs) -> None:
            pass

    monkeypatch.setattr(fluxmusic.errors, "NotABackend", NotABackend, raising=False)
    monkeypatch.setitem(backend_module.BACKENDS, "bogus", "fluxmusic.errors:NotABackend")
    with pytest.raises(TypeError, match="does not implement fluxmusic.backend.Backend"):
        backend_module.make_backend("bogus", tiny_model_dir, read_index(tiny_model_dir), "cpu", torch.float32)
