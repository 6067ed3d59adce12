"""Removing the temporaries our atomic writers leave when a process is killed mid-write (issue 17, item 8).

Every writer here writes ``.<name>.<8 random chars>.tmp`` (``tempfile.mkstemp``) or a ``.<name>.<8 chars>``
directory (``tempfile.mkdtemp``), or keeps ``.<name>.old`` during a directory swap, then renames. A SIGKILL
between the two leaves the temporary forever (up to a whole checkpoint, 113 MB for ``small``). Whoever owns a
directory calls :func:`remove_stale_temporaries` on start, before writing there; only names of exactly these
shapes are touched, so a user's own dotfiles are safe.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_DIR = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}|old)$")


def stale_temporaries(directory: str | Path) -> list[Path]:
    """Entries of ``directory`` (not recursive) named as our atomic writers name their temporaries."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        if p.is_symlink():
            continue
        if (p.is_file() and _FILE.match(p.name)) or (p.is_dir() and _DIR.match(p.name)):
            out.append(p)
    return out


def remove_stale_temporaries(directory: str | Path) -> tuple[list[str], int]:
    """Delete them; returns (names, bytes freed). Call it only where no other writer can be at work (the
    owner of the directory, on start)."""
    names, freed = [], 0
    for p in stale_temporaries(directory):
        try:
            if p.is_dir():
                freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(p)
            else:
                freed += p.stat().st_size
                p.unlink()
        except OSError:
            continue  # vanished or not ours to remove: not worth failing a start for
        names.append(p.name)
    return names, freed
