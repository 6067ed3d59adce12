"""fluxmusic.kernels: Triton kernels for the transformer's fused ops (optional acceleration of the core).

Public API::

    from fluxmusic.kernels import enable_kernels, disable_kernels
    enable_kernels(model)          # True if switched: CUDA model + Triton importable
    enable_kernels(model, force=True)  # any device, e.g. CPU tensors under TRITON_INTERPRET=1
    disable_kernels(model)         # back to fluxmusic.ops.REFERENCE_OPS

``TRITON_OPS`` (the :class:`fluxmusic.ops.OpSet`) and the ``fluxmusic::*`` custom ops are imported lazily,
so importing this package never requires Triton. Dependency direction: core <- kernels (the core never
imports this package).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from fluxmusic.ops import REFERENCE_OPS

from ._common import interpreting, triton_available

if TYPE_CHECKING:
    from fluxmusic.ops import OpSet

__all__ = ["TRITON_OPS", "disable_kernels", "enable_kernels", "interpreting", "kernels_enabled", "triton_available"]


def __getattr__(name: str) -> Any:
    if name == "TRITON_OPS":
        from .custom_ops import TRITON_OPS

        return TRITON_OPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _model_device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def enable_kernels(model: nn.Module, force: bool = False) -> bool:
    """Switch ``model.ops`` to the Triton kernels; return whether it did.

    Without ``force`` this happens only for a model on CUDA with Triton importable. ``force=True`` skips the
    device check (CPU tensors need ``TRITON_INTERPRET=1`` set before triton is imported) but still needs
    Triton. Export paths should call :func:`disable_kernels` (the ops also fall back to the references while
    ``torch.onnx`` is exporting).
    """
    if not triton_available():
        return False
    if not force and _model_device_type(model) != "cuda":
        return False
    from .custom_ops import TRITON_OPS

    model.ops = TRITON_OPS
    return True


def disable_kernels(model: nn.Module) -> None:
    """Return the model to the plain-torch reference ops."""
    model.ops = REFERENCE_OPS


def kernels_enabled(model: nn.Module) -> bool:
    ops: OpSet = getattr(model, "ops", REFERENCE_OPS)
    return ops.name == "triton"
