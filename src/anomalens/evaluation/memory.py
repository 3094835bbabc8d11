"""The one memory meter: this process's peak resident memory, from the kernel's high-water mark
(`VmHWM` in /proc/self/status, Linux), exact rather than sampled."""

from __future__ import annotations

import contextlib
from pathlib import Path

_highest_mb = 0.0
"""The highest reading so far: the kernel updates its high-water mark lazily (when memory is
unmapped), so a later reading can come out a few pages lower than an earlier one."""


def peak_rss_mb() -> float:
    """The process's peak resident memory so far in MB (since start or the last `PeakMemory`)."""
    global _highest_mb
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    _highest_mb = max(_highest_mb, int(line.split()[1]) / 1024)
                    return _highest_mb
    except OSError:
        pass
    return float("nan")


class PeakMemory:
    """Peak resident memory (MB) of this process while the `with` block runs: the high-water mark
    is reset to the current memory on entry (/proc/self/clear_refs) and read on exit."""

    peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        global _highest_mb
        # Not Linux, or not allowed: the peak is then the whole process's.
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
            _highest_mb = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = peak_rss_mb()
