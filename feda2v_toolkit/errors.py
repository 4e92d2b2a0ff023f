"""Exceptions the CLI turns into one-line messages and exit codes."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable


class ToolkitError(Exception):
    """A problem the user can fix. The CLI prints ``str(error)`` on one line and exits ``exit_code``."""

    exit_code = 1


class UsageError(ToolkitError):
    """Wrong arguments, missing or unreadable files: exit code 2."""

    exit_code = 2


class InputError(ToolkitError):
    """A file exists but its content is invalid (bad JSON, bad tensors, wrong shapes): exit code 1."""

    exit_code = 1


class PluginError(ToolkitError):
    """A plugin failed to load or registered something invalid (fatal only in strict mode)."""

    exit_code = 1


class PluginValidationError(PluginError):
    """A registered component, fragment or migration does not satisfy the host's contract."""


class ComponentNotFoundError(UsageError):
    """A component name is not registered (or is ambiguous between plugins)."""


class NewerVersionError(InputError):
    """A file was written by a newer toolkit / format / schema version than this one understands."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: every ``except KeyboardInterrupt`` / ``BaseException`` cleanup runs."""


#: errno values that mean "the environment", not a bug: permissions, full or read-only disks, bad paths
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EACCES", "EPERM", "ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EISDIR", "ENOTDIR",
                                      "ENOENT", "ELOOP", "ENAMETOOLONG", "EMFILE", "ENFILE", "EIO", "ENXIO",
                                      "EEXIST", "ENOTEMPTY", "EBUSY", "ETXTBSY", "EXDEV")
    if hasattr(errno, name))


def short_list(items: Iterable[object], limit: int = 5, *, sep: str = ", ") -> str:
    """At most ``limit`` items joined by ``sep``, then how many more: error messages stay one short line."""
    items = list(items)
    head = sep.join(str(i) for i in items[:limit])
    return head + (f"{sep}... ({len(items) - limit} more)" if len(items) > limit else "")


def environment_error(exc: BaseException) -> ToolkitError | None:
    """A one-line :class:`UsageError` for an OS error that the user's environment caused (unwritable
    directory, full disk, ...), also when safetensors wraps it; ``None`` for anything else."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = exc.filename if exc.filename is not None else ""
        what = exc.strerror or str(exc)
        return UsageError(f"{where}: {what}" if where else what)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "Os {" in text:
        match = re.search(r"code: (\d+)", text)
        code = int(match.group(1)) if match else None
        if code in ENVIRONMENT_ERRNOS:
            return UsageError(f"cannot write a safetensors file: {os.strerror(code)}")
    if isinstance(exc, MemoryError):
        return InputError("not enough memory for this command (try smaller sizes: fewer samples per batch, "
                          "a shorter length, a smaller hidden size)")
    return None
