"""Refuse work that cannot fit in memory or on disk before starting it (a clear message, not an OOM kill
or a disk filled for hours).

Sizes come from untrusted places (model metadata, command-line options), so commands estimate what
they need and call :func:`require_memory` / :func:`require_disk_space` first.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from feda2v_toolkit.errors import ResourceError, UsageError

#: environment variable that overrides the memory limit (bytes), e.g. for tests or shared machines
ENV_MEMORY_LIMIT = "FEDA2V_MEMORY_LIMIT"


def memory_limit() -> int | None:
    """Bytes a command may use: ``FEDA2V_MEMORY_LIMIT`` if set, else the machine's physical memory."""
    value = os.environ.get(ENV_MEMORY_LIMIT, "").strip()
    if value:
        try:
            return int(float(value))
        except ValueError:
            return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def require_memory(needed: float, what: str, hint: str = "") -> None:
    """Raise :class:`~feda2v_toolkit.errors.ResourceError` (exit code 2) if ``needed`` bytes exceed
    :func:`memory_limit`."""
    limit = memory_limit()
    if limit is not None and needed > limit:
        raise ResourceError(f"{what} needs about {format_bytes(needed)} of memory, more than the "
                         f"{format_bytes(limit)} available{'; ' + hint if hint else ''}")


def free_disk_bytes(target: str | os.PathLike[str]) -> int | None:
    """Free bytes of the file system ``target`` (which need not exist yet) would be written to: that of its
    nearest existing folder; ``None`` when it cannot be told."""
    path = Path(target).absolute()
    for folder in (path, *path.parents):
        try:
            if folder.is_dir():
                return int(shutil.disk_usage(folder).free)
        except OSError:  # e.g. a folder that cannot be searched: the write itself will say
            return None
    return None  # pragma: no cover - the root always exists


def require_disk_space(needed: float, target: str | os.PathLike[str], what: str, hint: str = "") -> None:
    """Raise :class:`UsageError` (a full disk: exit 2) naming ``target`` if writing ``needed`` bytes there
    would not fit the free space of its file system."""
    free = free_disk_bytes(target)
    if free is not None and needed > free:
        raise UsageError(f"{target}: not enough free disk space ({os.strerror(errno.ENOSPC)}): {what} needs about "
                         f"{format_bytes(needed)}, its file system has {format_bytes(free)} free"
                         f"{'; ' + hint if hint else ''}")


#: environment variable: the memory budget of a command (a size: ``2GiB``, ``1.5GB``, ``512MiB``, bytes)
ENV_MEMORY_BUDGET = "FEDA2V_MEMORY_BUDGET"
#: the budget when neither ``--memory-budget`` nor the environment sets one
DEFAULT_MEMORY_BUDGET = 2 * 2**30
_BUDGET: dict[str, int | None] = {"bytes": None}


def set_memory_budget(nbytes: int | None) -> None:
    """The process-wide budget (``--memory-budget``); ``None``: the environment's or the default."""
    _BUDGET["bytes"] = None if nbytes is None else int(nbytes)


def memory_budget() -> int:
    """Bytes a command plans to stay within: ``--memory-budget``, else ``FEDA2V_MEMORY_BUDGET``, else
    :data:`DEFAULT_MEMORY_BUDGET`; never more than :func:`memory_limit`."""
    budget = _BUDGET["bytes"]
    if budget is None:
        from feda2v_toolkit.runtime.sizes import parse_size

        value = os.environ.get(ENV_MEMORY_BUDGET, "").strip()
        budget = parse_size(value, option=ENV_MEMORY_BUDGET) if value else DEFAULT_MEMORY_BUDGET
    limit = memory_limit()
    return min(budget, limit) if limit is not None else budget


def cache_in_memory(nbytes: int, budget: int | None = None) -> bool:
    """Whether a cache of ``nbytes`` stays in memory: up to a quarter of the budget (default
    :func:`memory_budget`); else it goes to a temporary file."""
    return nbytes <= (memory_budget() if budget is None else budget) // 4
