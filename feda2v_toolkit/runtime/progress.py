"""Progress of long phases: a tqdm bar on a terminal, periodic plain lines everywhere else (no torch).

Every phase that can take more than a couple of seconds reports progress, also when stderr is not a
terminal (CI logs, notebooks, ``nohup``): there, a background thread prints one plain line (no ANSI codes,
no carriage returns) every :func:`interval` seconds -- ``FEDA2V_PROGRESS_INTERVAL``, default 15 -- with the
count, the rate and the time left when the total is known, and a last line when the phase ends. A phase
shorter than one interval prints nothing.

* :class:`Progress` counts units (steps, clips, samples) towards a total (or ``None``: elapsed time only).
* :func:`activity` wraps a phase inside a component (a fit, a plugin's loop) that has no flag of its
  own: it follows the process-wide default that commands set with :func:`configure` (``-q`` /
  ``--no-progress`` turn it off).
* :func:`heartbeat` turns a ``log(message)`` callable into one that, while no new message comes for an
  interval, says the last phase is still running (for long library calls that only log phases).

``enabled``: ``None`` = the process-wide default (on, unless a command turned it off), ``True`` = on,
``False`` = off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

#: environment variable: seconds between plain progress lines when stderr is not a terminal
ENV_INTERVAL = "FEDA2V_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 15.0
_DEFAULT: dict[str, bool] = {"enabled": True}


def interval() -> float:
    """Seconds between plain progress lines (``FEDA2V_PROGRESS_INTERVAL``, default 15)."""
    try:
        value = float(os.environ.get(ENV_INTERVAL, ""))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


def configure(enabled: bool) -> None:
    """Set the process-wide default for progress whose caller passes ``enabled=None``."""
    _DEFAULT["enabled"] = bool(enabled)


@contextlib.contextmanager
def configured(enabled: bool | None) -> Iterator[None]:
    """Within the block, the process-wide default is ``enabled`` (``None``: unchanged)."""
    before = _DEFAULT["enabled"]
    if enabled is not None:
        _DEFAULT["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _DEFAULT["enabled"] = before


def _on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith("s") else "s")


def _emit(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # stderr closed (a dead pipe): not worth failing for
        print(f"feda2v-tk: {line}", file=sys.stderr, flush=True)


class Progress:
    """Progress of ``total`` units (``None``: unknown) from ``initial``; see the module docstring.

    Every method is a no-op when progress is off.
    """

    def __init__(self, total: int | None, initial: int = 0, enabled: bool | None = None, *, unit: str = "step",
                 desc: str = "train") -> None:
        on = _DEFAULT["enabled"] if enabled is None else bool(enabled)
        self.total, self.n, self.initial, self.unit, self.desc = total, initial, initial, unit, desc
        self.bar: Any = None
        self._values: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lines = 0
        self._t0 = time.monotonic()
        if not on:
            return
        if _on_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, leave=True, desc=desc)
        else:  # the thread holds only a weak reference: a bar dropped without close() falls silent
            self._thread = threading.Thread(target=_tick, args=(weakref.ref(self), self._stop),
                                            name=f"feda2v-progress-{desc}", daemon=True)
            self._thread.start()

    # -- plain lines ---------------------------------------------------------------------------------
    def line(self) -> str:
        """The plain progress line for the current state."""
        elapsed = time.monotonic() - self._t0
        unit = _plural(self.unit)
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            pct = 100.0 * self.n / self.total
            text = f"{self.desc}: {self.n}/{self.total} {unit} ({pct:.0f}%), {_duration(elapsed)} elapsed"
            if rate > 0 and self.n < self.total:
                text += f", {rate:.3g} {unit}/s, about {_duration((self.total - self.n) / rate)} left"
        else:
            text = f"{self.desc}: still running, {_duration(elapsed)} elapsed"
            if done:
                text += f", {done} {unit}"
        if self._values:
            text += " (" + ", ".join(f"{k} {v}" for k, v in self._values.items()) + ")"
        return text

    # -- the interface -------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def postfix(self, **values: Any) -> None:
        formatted = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}
        self._values = formatted
        if self.bar is not None:
            self.bar.set_postfix(formatted, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self._thread is not None:
            _emit(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=1.0)
            self._thread = None
            if self._lines:  # the phase was long enough to report: say that it ended
                unit = _plural(self.unit)
                _emit(f"{self.desc}: done, {self.n - self.initial} {unit} in {_duration(time.monotonic() - self._t0)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tick(ref: weakref.ReferenceType[Progress], stop: threading.Event) -> None:
    while not stop.wait(interval()):
        bar = ref()
        if bar is None:
            return
        _emit(bar.line())
        bar._lines += 1
        del bar


@contextlib.contextmanager
def activity(desc: str, total: int | None = None, *, unit: str = "step",
             enabled: bool | None = None) -> Iterator[Progress]:
    """A phase inside a component (a fit, a plugin's loop): ``with activity("fitting X", total=n) as p:
    ... p.update()``. Follows the process-wide default unless ``enabled`` is given."""
    bar = Progress(total, 0, enabled, unit=unit, desc=desc)
    try:
        yield bar
    finally:
        bar.close()


def counted(items: Iterable[Any], bar: Progress, size: Callable[[Any], int] = lambda item: 1) -> Iterator[Any]:
    """Yield ``items``, counting ``size(item)`` units of each on ``bar`` (e.g. the rows of each batch)."""
    for item in items:
        yield item
        bar.update(size(item))


def heartbeat(log: Callable[[str], None] | None, *, enabled: bool | None = None) -> tuple[Callable[[str], None], Callable[[], None]]:
    """``(log2, stop)``: ``log2(message)`` passes ``message`` to ``log`` and, while no next message comes for
    an interval, prints that the phase it announced is still running (elapsed time). Call ``stop()`` at the
    end. On a terminal, and with progress off, ``log2`` is ``log``."""
    on = _DEFAULT["enabled"] if enabled is None else bool(enabled)
    say = log or (lambda _m: None)
    if log is None or not on or _on_terminal():
        return say, lambda: None
    state: dict[str, Any] = {"last": None, "since": time.monotonic()}
    stop_event = threading.Event()
    lock = threading.Lock()

    def tick() -> None:
        while not stop_event.wait(interval()):
            with lock:
                last, since = state["last"], state["since"]
            if last is not None and time.monotonic() - since >= interval() * 0.99:
                _emit(f"still working ({_duration(time.monotonic() - since)} since: {last})")

    thread = threading.Thread(target=tick, name="feda2v-heartbeat", daemon=True)
    thread.start()

    def log2(message: str) -> None:
        with lock:
            state["last"], state["since"] = message, time.monotonic()
        say(message)

    def stop() -> None:
        stop_event.set()
        thread.join(timeout=1.0)

    return log2, stop
