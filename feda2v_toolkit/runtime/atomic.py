"""Atomic file writes (a temp file in the target directory, fsync, then ``os.replace``) and the one
overwrite rule of every command and Python function that writes (:func:`check_output`,
:func:`replace_directory`; docs/architecture.md, "Outputs"). No torch.

A crash or Ctrl-C at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from feda2v_toolkit.errors import UsageError, short_list, spelled, write_error


def default_mode(directory: bool = False) -> int:
    """Permissions a newly created file (or directory) gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def temp_prefix(target: Path) -> str:
    """Name prefix of our temporaries for ``target``: ``.<name>.<pid>-`` (the pid tells stale ones apart)."""
    return f".{target.name}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but is someone else's
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike[str], suffix: str) -> list[Path]:
    """Remove temporaries of our own naming (``.<name>.<pid>-*<suffix>``) for ``target`` whose writing
    process is gone (killed with SIGKILL, or by a power cut); return what was removed."""
    target = Path(target)
    removed: list[Path] = []
    try:
        candidates = list(target.parent.glob(f".{glob_escape(target.name)}.*{suffix}"))
    except OSError:
        return removed
    for path in candidates:
        middle = path.name[len(target.name) + 2:-len(suffix)]
        pid_text = middle.split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        try:
            if middle.endswith("-old") and path.is_dir() and not os.path.lexists(target):
                os.replace(path, target)  # killed between moving the old output aside and renaming the new in
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def make_parents(path: str | os.PathLike[str]) -> list[Path]:
    """Create the missing directories above ``path``; return them (outermost first) so that a failed write
    can remove them again with :func:`remove_created`."""
    created: list[Path] = []
    parent = Path(path).parent
    while not os.path.lexists(parent) and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    created.reverse()
    try:
        for d in created:
            d.mkdir()
    except BaseException:
        remove_created(created)
        raise
    return created


def remove_created(created: list[Path]) -> None:
    """Remove directories :func:`make_parents` created, innermost first, where they are still empty."""
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, display: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` if the block succeeds.

    Use this for writers that want a path (``safetensors.torch.save_file``). On any exception,
    including KeyboardInterrupt, the temporary file (and any directory created for it) is removed and
    ``target`` is untouched; a full disk is a one-line :class:`UsageError` naming ``target`` (or
    ``display``: the output the user named, when ``target`` is a file inside a hidden work directory).
    """
    target = Path(target)
    created: list[Path] = []
    tmp: Path | None = None
    try:
        created = make_parents(target)
        remove_stale_temporaries(target, ".tmp")
        fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if target.exists():
            with contextlib.suppress(OSError):
                os.chmod(tmp, target.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, default_mode())
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        remove_created(created)
        handled = write_error(display or target, exc) if isinstance(exc, Exception) else None
        if handled is not None:
            raise handled from None
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing and atomically move it to ``target`` on success."""
    if "r" in mode or "a" in mode or "+" in mode:
        raise ValueError("atomic_open only supports write modes ('w', 'wb')")
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()


def atomic_write_text(target: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``target`` atomically (newlines are written as given)."""
    with atomic_open(target, "w", encoding=encoding, newline="") as fh:
        fh.write(text)


# -- the overwrite rule ------------------------------------------------------------------------------
#
# One rule for every command and every Python function that writes an output (see docs/architecture.md,
# "Outputs"): :func:`check_output` before any work, then the output is replaced only by what the command
# itself wrote -- a file by :func:`atomic_path`, a directory by :func:`replace_directory`.

#: the largest safetensors header :func:`is_dataset_shard` reads
_MAX_SHARD_HEADER = 100 * 2**20


def is_dataset_shard(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file holding a feda2v-tk dataset (its safetensors header says
    ``feda2v_format = "dataset"``): what ``--overwrite`` may replace in an output directory. Reads only the
    header (bounded), never follows a device or FIFO."""
    path = Path(path)
    if path.suffix != ".safetensors" or path.is_symlink():
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size < 8:
            return False
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little")
        if not 2 <= n <= min(_MAX_SHARD_HEADER, info.st_size - 8):
            return False
        header = json.loads(os.pread(fd, n, 8))
    except (OSError, ValueError, RecursionError):
        return False
    finally:
        os.close(fd)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("feda2v_format") == "dataset"


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def check_inputs(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], *,
                 role: str = "input") -> Path:
    """Refuse an output that is one of ``inputs``, contains one (a directory holding it) or lies inside an
    input directory: a command never writes over, into or around what it reads. Symbolic links and ``./``
    spellings are resolved first."""
    o = Path(out)
    real_o = _real(o)
    for p in inputs:
        pp = Path(p)
        real_p = _real(pp)
        same = real_o == real_p
        if not same and os.path.lexists(o) and os.path.lexists(pp):
            try:
                same = os.path.samefile(o, pp)
            except OSError:
                same = False
        if same:
            raise UsageError(f"{o}: is also {'an' if role[:1] in 'aeiou' else 'a'} {role}; write to another path")
        if _inside(real_p, real_o):
            raise UsageError(f"{o}: contains the {role} {pp}; write to another path")
        if _inside(real_o, real_p):
            raise UsageError(f"{o}: is inside the {role} directory {pp}; write to another path")
    return o


def check_output(out: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = (),
                 overwrite: bool = False, directory: bool = False, role: str = "input") -> Path:
    """THE overwrite rule: check an output before any work; raise a one-line :class:`UsageError` otherwise.

    * The output may not be, contain or lie inside any of ``inputs`` (:func:`check_inputs`; ``role`` names
      them in the message, e.g. ``"input dataset"``).
    * A file output (``directory=False``) that exists must be a regular file, and is replaced only with
      ``overwrite``; a directory there is refused.
    * A directory output (``directory=True``, a shard directory) may exist empty; a non-empty one is
      replaced only with ``overwrite``, and only when it holds nothing but dataset shards
      (:func:`is_dataset_shard`): a directory holding anything a command did not write is never replaced.
    * The place must be writable (:func:`check_writable`; no directory is created by the check).

    The message names ``--overwrite`` when a ``feda2v-tk`` command runs and ``overwrite=True`` in Python.
    Returns the output as a :class:`~pathlib.Path`. Replace an output only with what the command itself
    wrote: :func:`atomic_path` for a file, :func:`replace_directory` for a directory.
    """
    o = check_inputs(out, inputs, role=role)
    flag = spelled("--overwrite", "overwrite=True")
    if os.path.lexists(o):
        if directory:
            if o.is_symlink():
                raise UsageError(f"{o}: is a symbolic link; write to the directory it points to, or another path")
            if not o.is_dir():
                raise UsageError(f"{o}: exists and is not a directory; this writes a directory of dataset shards")
            try:
                entries = sorted(o.iterdir())
            except OSError as exc:
                raise UsageError(f"{o}: cannot read the output directory: {exc.strerror or exc}") from None
            if entries:
                if not overwrite:
                    raise UsageError(f"{o}: output directory exists and is not empty; choose another path, or "
                                     f"pass {flag} to replace its dataset shards")
                foreign = [e.name for e in entries if not is_dataset_shard(e)]
                if foreign:
                    raise UsageError(f"{o}: holds files that are not dataset shards ({short_list(foreign, 3)}); "
                                     "not replacing it: remove them yourself or choose another directory")
        else:
            if o.is_dir():
                raise UsageError(f"{o}: is a directory; give the path of the file to write")
            try:
                regular = stat.S_ISREG(o.stat().st_mode)
            except OSError:  # a dangling symbolic link: the rename replaces the link itself
                regular = True
            if not regular:
                raise UsageError(f"{o}: exists and is not a regular file (a device, pipe or socket); write to "
                                 "another path")
            if not overwrite:
                raise UsageError(f"{o}: exists; choose another path, or pass {flag} to replace it")
    check_writable(o)
    return o


def replace_directory(staging: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Put the finished directory ``staging`` (written by this command, next to ``out``) at ``out``.

    An existing ``out`` must be empty or hold only dataset shards (checked again here, right before): it
    is moved aside, ``staging`` is renamed into place, and then only the old dataset shards are deleted
    (anything else that appeared meanwhile is left, with the directory). A failure puts the old one back.
    """
    staging, out = Path(staging), Path(out)
    old: Path | None = None
    if os.path.lexists(out):
        if out.is_symlink() or not out.is_dir():
            raise UsageError(f"{out}: exists and is not a directory; not replacing it")
        entries = list(out.iterdir())
        foreign = [e.name for e in entries if not is_dataset_shard(e)]
        if foreign:
            raise UsageError(f"{out}: holds files that are not dataset shards ({short_list(sorted(foreign), 3)}); "
                             "not replacing it: remove them yourself or choose another directory")
        if entries:
            old = out.with_name(f"{temp_prefix(out)}old.partial")
            os.replace(out, old)
        else:
            out.rmdir()
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                os.replace(old, out)
        raise
    if old is not None:
        _remove_shards(old)
    return out


def _remove_shards(directory: Path) -> None:
    """Delete the dataset shards of a replaced output directory, then the directory if nothing else is left."""
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            if is_dataset_shard(entry):
                with contextlib.suppress(OSError):
                    entry.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


def check_output_path(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], *,
                      role: str = "input") -> Path:
    """Refuse an output file path that is a directory, one of ``inputs``, contains one or lies inside an input
    directory (the input part of :func:`check_output`, without the existence rule)."""
    o = check_inputs(out, inputs, role=role)
    if o.is_dir():
        raise UsageError(f"{o}: is a directory; give the path of the file to write")
    return o


def check_writable(target: str | os.PathLike[str]) -> None:
    """Refuse, before any work, an output whose directory cannot be created or written to (probed in the
    nearest existing directory above it; nothing is created)."""
    parent = Path(target).parent
    probe_dir = parent
    while not os.path.lexists(probe_dir) and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(probe_dir))
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(Path(target)), suffix=".tmp", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = exc.filename or probe_dir
        raise UsageError(f"{Path(target)}: cannot write to {where}: {exc.strerror or exc}") from None


def _real(path: Path) -> Path:
    """``path`` with symbolic links resolved, without raising on a link loop (``Path.resolve`` does)."""
    return Path(os.path.realpath(path))
