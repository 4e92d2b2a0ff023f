"""The progress bar of long commands (``train``, ``generate``): tqdm on stderr, shown only on a terminal."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A tqdm bar of ``total`` units (``enabled``: None = only when stderr is a terminal); every method
    is a no-op when the bar is not shown."""

    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None, *, unit: str = "step",
                 desc: str = "train") -> None:
        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, leave=True, desc=desc)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def postfix(self, **values: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()},
                                 refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
