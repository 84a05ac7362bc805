"""The one progress helper of the library: rich bars on stderr when enabled, else nothing.

``progress_bar`` is what a loop uses: one bar with a total, a unit ("products") and live fields
(e.g. the current residual). ``Display`` holds several bars at once (the report's steps and their
parts). When not enabled, nothing is shown and rich is not imported. This module imports nothing
from the rest of curvscope: callers decide ``enabled`` (e.g. ``progress and is_main_process()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import Any


class Bar:
    """One bar of a ``Display``; every method does nothing when the display is off."""

    def __init__(self, display: Display, task: Any, total: int) -> None:
        self._display = display
        self._task = task
        self.total = total
        self.completed = 0

    def advance(self, steps: int = 1) -> None:
        """Move the bar ``steps`` forward (never past its total)."""
        self.update(self.completed + steps)

    def update(
        self, completed: int | None = None, *, description: str | None = None, **fields: Any
    ) -> None:
        """Set the steps done, the description, and live fields shown as ``name value``.

        ``bar.update(12, residual=3e-4)`` shows ``12/… residual 0.0003``; a field set to None
        is not shown.
        """
        if self._task is None:
            return
        options: dict[str, Any] = {"fields": _fields_text(fields)} if fields else {}
        if completed is not None:
            self.completed = min(int(completed), self.total)
            options["completed"] = self.completed
        if description is not None:
            options["description"] = description
        self._display.rich.update(self._task, **options)

    def __call__(self) -> None:
        """``bar()`` is ``bar.advance()``, so a bar can be passed where a callback is expected."""
        self.advance()


def _fields_text(fields: dict[str, Any]) -> str:
    parts = []
    for name, value in fields.items():
        if value is None:
            continue
        shown = value if isinstance(value, str) else f"{float(value):.3g}"
        parts.append(f"{name.replace('_', ' ')} {shown}")
    return "  ".join(parts)


class Display:
    """A rich progress display on stderr when ``enabled``; a no-op otherwise.

    Args:
        enabled: show the display (else nothing is shown and rich is not imported).
        unit: what the steps count, shown after ``done/total`` (e.g. ``"products"``).
        eta: also show an estimate of the time left.
        transient: erase the display when done (else its last state stays on stderr; a
            transient display shows nothing when stderr is not a terminal).
    """

    def __init__(
        self, enabled: bool, *, unit: str = "", eta: bool = False, transient: bool = True
    ) -> None:
        self.enabled = bool(enabled)
        self.rich: Any = None
        if self.enabled:
            self.rich = _rich_progress(unit, eta, transient)

    def __enter__(self) -> Display:
        if self.rich is not None:
            self.rich.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.rich is not None:
            self.rich.stop()

    def add(self, description: str, total: int) -> Bar:
        """A new bar of ``total`` steps (at least one)."""
        total = max(int(total), 1)
        if self.rich is None:
            return Bar(self, None, total)
        return Bar(self, self.rich.add_task(description, total=total, fields=""), total)

    def remove(self, bar: Bar) -> None:
        """Take ``bar`` off the display."""
        if self.rich is not None and bar._task is not None:
            self.rich.remove_task(bar._task)
            bar._task = None


def _rich_progress(unit: str, eta: bool, transient: bool) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[Any] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn("{task.fields[fields]}"),
        TimeElapsedColumn(),
    ]
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=Console(stderr=True), transient=transient)


@contextlib.contextmanager
def progress_bar(
    enabled: bool, description: str, total: int, *, unit: str = "", transient: bool = True
) -> Iterator[Bar]:
    """Yield one bar of ``total`` steps on stderr (see ``Display``); a no-op when not enabled.

    Args:
        enabled: show the bar (else every call on it does nothing and rich is not imported).
        description: what is being computed, e.g. ``"HessianOperator product"``.
        total: the number of steps.
        unit: what the steps count, e.g. ``"products"``.
        transient: erase the bar when done.

    Example:
        >>> with progress_bar(False, "trace", 10, unit="products") as bar:
        ...     bar.update(3, std_error=0.1)
    """
    with Display(enabled, unit=unit, transient=transient) as display:
        yield display.add(description, total)
