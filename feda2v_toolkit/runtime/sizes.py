"""Byte sizes: parse ``8GB`` / ``512MiB`` / ``1.5 GiB`` and print ``1.23 GiB`` (no torch)."""

from __future__ import annotations

import re

from feda2v_toolkit.errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, *, option: str = "size") -> int:
    """Bytes in ``text``: a number with an optional unit.

    ``kB/MB/GB/TB`` (or ``k/M/G/T``) are powers of 1000, ``KiB/MiB/GiB/TiB`` powers of 1024; a bare
    number is bytes. Case does not matter. Raises :class:`UsageError` naming ``option`` otherwise.
    """
    match = _PATTERN.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise UsageError(f"{option}: cannot read {text!r} as a size; write e.g. 8GB, 512MiB, 1.5GiB or a "
                         f"number of bytes")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UsageError(f"{option}: must be positive, got {text!r}")
    return int(value)


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``1.50 KiB``; binary units, three significant digits."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_count(n: int) -> str:
    """``9182720`` -> ``9.18 M``; ``1910000000`` -> ``1.91 B``."""
    for div, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suffix}" if n / div < 100 else f"{n / div:.0f} {suffix}"
    return str(n)
