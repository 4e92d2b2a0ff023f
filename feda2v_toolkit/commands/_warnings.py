"""Show Python warnings (deprecated config keys, class-agnostic models...) as one-line CLI messages."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import click


@contextlib.contextmanager
def warnings_as_messages() -> Iterator[None]:
    """Within the block, every warning (DeprecationWarning included) prints ``feda2v-tk: warning: ...``."""

    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        click.echo(f"feda2v-tk: warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield
