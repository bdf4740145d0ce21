"""The process's resident memory as the operating system counts it (RSS), beside MLX's own
counter: a budget must hold there too (MLX's buffer cache, Python's objects, reader buffers).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def _status(field: str) -> int | None:
    """A "kB" field of /proc/self/status in bytes (Linux), or None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def peak_rss() -> int:
    """The most resident memory this process has had (since `reset_peak_rss`, on Linux)."""
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux kB


def current_rss() -> int | None:
    return _status("VmRSS")


def reset_peak_rss() -> bool:
    """Start the peak over from the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
