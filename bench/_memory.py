"""Peak-memory probes shared by the benchmark scripts (Linux ``/proc``)."""

from __future__ import annotations


def status(field: str) -> int:
    """A ``/proc/self/status`` field (e.g. ``VmHWM``, ``VmRSS``) in bytes; 0 where it is unavailable."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Reset the peak resident set size (``VmHWM``) where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
