"""A small progress bar on stderr: products done and the current residual (or error)."""

from __future__ import annotations

import sys
from types import TracebackType


class Progress:
    """Context manager showing a rich progress bar when ``enabled``; a no-op otherwise.

    Args:
        enabled: show the bar.
        description: what is being computed, e.g. ``"eigenvalues"``.
        total: the product budget (the bar's length).
    """

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled = bool(enabled)
        self.description = description
        self.total = max(int(total), 1)
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("products"),
                TextColumn("{task.fields[residual]}"),
                TimeElapsedColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, residual="")
        return self

    def update(self, num_matvecs: int, residual: float | None = None) -> None:
        """Show ``num_matvecs`` products done, and the current residual if given."""
        if self._bar is None:
            return
        text = "" if residual is None else f"residual {residual:.3g}"
        self._bar.update(self._task, completed=min(num_matvecs, self.total), residual=text)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, error, traceback)
