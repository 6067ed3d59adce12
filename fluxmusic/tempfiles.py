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


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it, which races
    with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def publish(path: str | Path) -> None:
    """Give a finished temporary the permissions a plain ``open()`` / ``mkdir()`` would have, before it is renamed
    into place.

    ``mkstemp`` creates files 0600 and ``mkdtemp`` directories 0700, and a rename keeps them: a model directory or
    a WAV written that way is unreadable to any other user, e.g. a Triton server or a web server running as its own
    account. Only private entries (no group/other bits) are widened, to ``0666`` / ``0777`` minus the umask, so a
    user who wants private files (umask 077) still gets them and modes set on purpose are kept.
    """
    mask = _umask()
    root = Path(path)
    entries = [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]
    for p in entries:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o777
        if mode & 0o077 == 0:
            base = 0o777 if p.is_dir() else 0o666 | (mode & 0o100) * 0o111 // 0o100
            p.chmod(base & ~mask)
