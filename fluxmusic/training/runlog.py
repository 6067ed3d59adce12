"""Training logs: one line per event to the console and one JSON object per line to ``log.jsonl``."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RunLog:
    """Writes only when ``enabled`` (rank 0). The JSONL file is appended to, so a resumed run continues it."""

    def __init__(self, path: Path | None, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._file = None
        if enabled and path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1)  # noqa: SIM115 - kept open for the whole run

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        self.stream.write(_console(event, fields) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _console(event: str, fields: dict[str, Any]) -> str:
    parts = [event]
    for k, v in fields.items():
        if k == "eta_s":
            parts.append(f"eta {format_duration(v)}")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


class Throughput:
    """Steps per second over the last log window, and the ETA it implies."""

    def __init__(self, step: int) -> None:
        self._step = step
        self._time = time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training steps (validation, checkpoints) out of the rate."""
        self._time += seconds

    def tick(self, step: int, total: int) -> tuple[float, float]:
        now = time.perf_counter()
        rate = (step - self._step) / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        eta = (total - step) / rate if rate > 0 else math.inf
        return rate, eta
