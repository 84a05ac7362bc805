"""Timed steps with an optional rich progress display on stderr (time estimates included)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .result import Step

T = TypeVar("T")


class StepRunner:
    """Run named steps, timing each and counting the products of the tracked operators.

    With ``progress=True`` a rich progress display on stderr shows the current step, the steps
    done and an estimate of the time left; steps with many parts (landscape points, layers)
    get their own bar.
    """

    def __init__(self, num_steps: int, *, progress: bool) -> None:
        self.steps: list[Step] = []
        self._operators: list[Any] = []
        self._num_steps = num_steps
        self._progress = None
        self._overall = None
        if progress:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description:<22}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )

    def __enter__(self) -> StepRunner:
        if self._progress is not None:
            self._progress.start()
            self._overall = self._progress.add_task("curvscope analyze", total=self._num_steps)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def track(self, operator: Any) -> Any:
        """Count the products of ``operator`` in the steps that follow; returns it."""
        self._operators.append(operator)
        return operator

    def _products(self) -> int:
        return int(sum(op.num_matvecs for op in self._operators))

    def run(
        self,
        name: str,
        func: Callable[..., T],
        *,
        parts: int | None = None,
        loss_evaluations: Callable[[T], int] | None = None,
    ) -> T:
        """Run ``func`` as step ``name``; with ``parts``, ``func`` receives an ``advance()``."""
        task = None
        if self._progress is not None:
            self._progress.update(self._overall, description=f"curvscope: {name}")
            if parts is not None:
                task = self._progress.add_task(f"  {name}", total=parts)
        before, start = self._products(), time.perf_counter()
        if parts is None:
            result = func()
        else:

            def advance() -> None:
                if task is not None:
                    self._progress.advance(task)

            result = func(advance)
        seconds = time.perf_counter() - start
        evaluations = 0 if loss_evaluations is None else loss_evaluations(result)
        self.steps.append(Step(name, seconds, self._products() - before, evaluations))
        if self._progress is not None:
            if task is not None:
                self._progress.remove_task(task)
            self._progress.advance(self._overall)
        return result


def iterate(items: Iterable[T], advance: Callable[[], None]) -> Iterable[T]:
    """Yield ``items``, calling ``advance()`` after each."""
    for item in items:
        yield item
        advance()
