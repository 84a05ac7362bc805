"""Timed steps of ``analyze``, shown with the library's one progress display (``_progress``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .._progress import Display
from .result import Step

T = TypeVar("T")


class StepRunner:
    """Run named steps, timing each and counting the products of the tracked operators.

    With ``progress=True`` a transient display on stderr shows the current step, the steps
    done and an estimate of the time left; steps with many parts (landscape points, layers)
    get their own bar.
    """

    def __init__(self, num_steps: int, *, progress: bool) -> None:
        self.steps: list[Step] = []
        self._operators: list[Any] = []
        self._display = Display(progress, eta=True, transient=True)
        self._overall = self._display.add("curvscope analyze", num_steps)

    def __enter__(self) -> StepRunner:
        self._display.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._display.__exit__(*exc)

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
        self._overall.update(description=f"curvscope: {name}")
        before, start = self._products(), time.perf_counter()
        if parts is None:
            result = func()
        else:
            bar = self._display.add(f"  {name}", parts)
            result = func(bar.advance)
            self._display.remove(bar)
        seconds = time.perf_counter() - start
        evaluations = 0 if loss_evaluations is None else loss_evaluations(result)
        self.steps.append(Step(name, seconds, self._products() - before, evaluations))
        self._overall.advance()
        return result


def iterate(items: Iterable[T], advance: Callable[[], None]) -> Iterable[T]:
    """Yield ``items``, calling ``advance()`` after each."""
    for item in items:
        yield item
        advance()
