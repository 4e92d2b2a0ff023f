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


def tree_rss(root: int) -> int:
    """Resident set size (bytes) of process ``root`` and all its descendants, from ``/proc``."""
    import os

    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class TreePeak:
    """Samples :func:`tree_rss` of this process every ``interval`` seconds on a thread; ``peak`` is the largest."""

    def __init__(self, interval: float = 0.5) -> None:
        import os
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(os.getpid(), interval), daemon=True)

    def _run(self, pid: int, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(pid))
            self._stop.wait(interval)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
