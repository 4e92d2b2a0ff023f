"""Exceptions the CLI turns into one-line messages and exit codes."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterable, Iterator


class ToolkitError(Exception):
    """A problem the user can fix. The CLI prints ``str(error)`` on one line and exits ``exit_code``."""

    exit_code = 1


class UsageError(ToolkitError):
    """Wrong arguments, missing or unreadable files: exit code 2."""

    exit_code = 2


class InputError(ToolkitError):
    """A file exists but its content is invalid (bad JSON, bad tensors, wrong shapes): exit code 1."""

    exit_code = 1


class ResourceError(InputError):
    """A valid input too large for this machine (memory, the memory budget's limit): exit code 2, like a full
    disk -- the input is not wrong, the machine is short. An :class:`InputError` for code that catches those."""

    exit_code = 2


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


#: who is calling: ``"python"`` (the library, a notebook) or ``"cli"`` (set by ``feda2v_toolkit.cli.main`` for
#: the duration of a command), so that a message names what the caller can change
_CALLER = {"name": "python"}


def spelled(cli: str, python: str) -> str:
    """``cli`` when a ``feda2v-tk`` command is running, else ``python``: errors speak the caller's language
    (``spelled("--overwrite", "overwrite=True")``)."""
    return cli if _CALLER["name"] == "cli" else python


@contextlib.contextmanager
def cli_caller() -> Iterator[None]:
    """Within the block, :func:`spelled` names command-line options (the CLI runs its commands in it)."""
    before = _CALLER["name"]
    _CALLER["name"] = "cli"
    try:
        yield
    finally:
        _CALLER["name"] = before


#: errno values that mean "the environment", not a bug: permissions, full or read-only disks, bad paths
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EACCES", "EPERM", "ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EISDIR", "ENOTDIR",
                                      "ENOENT", "ELOOP", "ENAMETOOLONG", "EMFILE", "ENFILE", "EIO", "ENXIO",
                                      "EEXIST", "ENOTEMPTY", "EBUSY", "ETXTBSY", "EXDEV")
    if hasattr(errno, name))


#: errno values of a write that could not complete (full disk, quota, file too large, read-only, I/O error)
WRITE_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO")
                         if hasattr(errno, name))


def os_error_code(exc: BaseException) -> int | None:
    """The errno of an OS error, also when safetensors wraps it in a ``SafetensorError`` (``Os { code: 28 ..``)."""
    if isinstance(exc, OSError):
        return exc.errno
    if type(exc).__name__ == "SafetensorError":
        match = re.search(r"Os \{ code: (\d+)", str(exc))
        return int(match.group(1)) if match else None
    return None


def write_error(target: str | os.PathLike[str], exc: BaseException) -> UsageError | None:
    """A one-line :class:`UsageError` naming ``target`` for a write that failed because of the environment
    (full disk, quota, file size limit, read-only file system, I/O error); ``None`` for anything else."""
    code = os_error_code(exc)
    if code not in WRITE_ERRNOS:
        return None
    return UsageError(f"{target}: cannot write: {os.strerror(code)}; nothing was written")


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without ANSI escape sequences (libraries put bold text in their messages)."""
    return _ANSI.sub("", text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without ANSI codes (its type name when it has none)."""
    text = plain(str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def unpickling_refusal(exc: BaseException, head: bytes | None = None) -> str | None:
    """For ``torch.load(weights_only=True)`` refusing a file that needs unpickling: one line saying so (with
    the Python object it would have created), instead of torch's multi-line advice to set
    ``weights_only=False``; ``None`` for any other error. ``head``: the file's first bytes, if known -- a file
    that is neither a zip archive nor a pickle stream is then "not a PyTorch file" (random or damaged bytes
    also fail the unpickler, on an unknown operation)."""
    text = plain(str(exc))
    if "Weights only load failed" not in text and "WeightsUnpickler" not in text:
        return None
    pickle_or_zip = head is None or head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03",
                                                                                               b"\x04", b"\x05"))
    if not pickle_or_zip:
        return "it is not a PyTorch file torch can read (damaged, or not written by torch.save)"
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    what = f" ({found.group(1)})" if found else ""
    return (f"it holds pickled Python objects{what}, which feda2v-tk never unpickles (torch.load with "
            "weights_only=True); re-save it with only tensors, dicts, lists and plain values")


def short_list(items: Iterable[object], limit: int = 5, *, sep: str = ", ") -> str:
    """At most ``limit`` items joined by ``sep``, then how many more: error messages stay one short line."""
    items = list(items)
    head = sep.join(str(i) for i in items[:limit])
    return head + (f"{sep}... ({len(items) - limit} more)" if len(items) > limit else "")


def stat_mode(path: os.PathLike[str] | str, missing: str = "no such file or directory") -> int:
    """``path``'s mode, symbolic links followed; a missing path (said as ``missing``), a link loop or an unreadable
    one is a one-line :class:`UsageError`."""
    try:
        return os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{path}: symbolic link loop") from None
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            dangling = " (a symbolic link to a missing file)" if os.path.islink(path) else ""
            raise UsageError(f"{path}: {missing}{dangling}") from None
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None


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
