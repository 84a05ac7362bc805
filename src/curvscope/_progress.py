"""One progress helper for the library: a rich bar on stderr when enabled, else nothing."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[], None]]:
    """Yield ``advance()``, which moves a transient bar of ``total`` steps on stderr by one.

    Args:
        enabled: show the bar (else ``advance`` does nothing and rich is not imported).
        description: what is being computed, e.g. ``"HessianOperator product"``.
        total: the number of steps.
    """
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(file=sys.stderr)) as bar:
        task = bar.add_task(description, total=max(int(total), 1))
        yield lambda: bar.advance(task)
