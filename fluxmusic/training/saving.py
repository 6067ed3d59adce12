"""Atomic ``save_pretrained``: write into a temporary sibling directory, then rename it into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fluxmusic.tempfiles import publish


def atomic_save_dir(write: Callable[[str], object], out_dir: str | Path) -> Path:
    """Call ``write(tmp_dir)`` (e.g. ``model.save_pretrained``) and move the result to ``out_dir``.

    An existing ``out_dir`` is replaced only after the new one is complete, so a crash never leaves a
    half-written component directory.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(str(tmp))
        publish(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
