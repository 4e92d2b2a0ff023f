"""Atomic file writes: a temp file in the target directory, fsync, then ``os.replace``.

A crash or Ctrl-C at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from feda2v_toolkit.errors import UsageError


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


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` if the block succeeds.

    Use this for writers that want a path (``safetensors.torch.save_file``). On any exception,
    including KeyboardInterrupt, the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target, ".tmp")
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if target.exists():
            with contextlib.suppress(OSError):
                os.chmod(tmp, target.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, default_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
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


def check_output_path(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], *,
                      role: str = "input") -> Path:
    """Refuse an output path that is a directory, one of ``inputs`` or inside an input directory.

    Overwriting anything else is safe (writes are atomic); destroying what a command reads is not.
    """
    o = Path(out)
    if o.is_dir():
        raise UsageError(f"{o}: is a directory; give the path of the file to write")
    for p in inputs:
        pp = Path(p)
        same = _real(o) == _real(pp)
        if not same and o.exists() and pp.exists():
            try:
                same = os.path.samefile(o, pp)
            except OSError:
                same = False
        if same:
            raise UsageError(f"{o}: is also an {role}; write to another path")
        if pp.is_dir() and _real(o).parent == _real(pp):
            raise UsageError(f"{o}: is inside the {role} directory {pp}; write to another path")
    return o


def check_writable(target: str | os.PathLike[str]) -> None:
    """Refuse, before any work, an output whose directory cannot be created or written to."""
    parent = Path(target).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(Path(target)), suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = exc.filename or parent
        raise UsageError(f"{Path(target)}: cannot write to {where}: {exc.strerror or exc}") from None


def _real(path: Path) -> Path:
    """``path`` with symbolic links resolved, without raising on a link loop (``Path.resolve`` does)."""
    return Path(os.path.realpath(path))
