"""Time and peak resident memory of each phase of a run (the report's "Run: time and memory").

On Linux the process's resident peak (VmHWM) is reset before each phase, so each row is that
phase's own peak (which includes what earlier phases still hold, e.g. the teacher). Elsewhere
the peak is the process's since it started.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def peak_rss_gb() -> float:
    """This process's resident-memory peak in GB (since the last reset where resets exist)."""
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024 ** 2  # kB
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kb / 1024 ** 2


def reset_peak() -> bool:
    """Reset the resident peak to the current resident size; False where the OS cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """`with meter("name"): ...` records seconds and peak RSS; a repeated name accumulates."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    @contextmanager
    def __call__(self, name: str):
        reset_peak()
        t0 = time.time()
        try:
            yield
        finally:
            row = self.rows.setdefault(name, {"seconds": 0.0, "peak_rss_gb": 0.0})
            row["seconds"] = round(row["seconds"] + time.time() - t0, 1)
            row["peak_rss_gb"] = round(max(row["peak_rss_gb"], peak_rss_gb()), 2)
