"""Sharpness (the top Hessian eigenvalues) along a training run, with warm-started Lanczos."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._checks import check_float, check_int, type_error
from .estimators import eigenvalues
from .estimators import trace as estimate_trace
from .estimators._results import Result
from .operators import HessianOperator

_FUNC = "SharpnessTracker"
#: Products of the hutch++ trace estimate for ``trace=True``.
DEFAULT_TRACE_MATVECS = 30


@dataclass(frozen=True, eq=False)
class SharpnessRecord(Result):
    """The top of the Hessian spectrum at one training step.

    Attributes:
        step: the training step.
        eigenvalues: (k,) float64, the largest eigenvalues, descending; ``eigenvalues[0]`` is the
            sharpness.
        residual_norms: (k,) float64 ``‖H v − λ v‖``: an eigenvalue of H lies within each.
        num_matvecs: Hessian-vector products this record used (eigenvalues and trace).
        trace: hutch++ estimate of tr(H), or None when not asked for.
        trace_interval: its 95% confidence interval ``(low, high)``, or None.
        status: the eigenvalue solver's status (``"converged"`` or ``"max_matvecs"``).
    """

    step: int
    eigenvalues: torch.Tensor
    residual_norms: torch.Tensor
    num_matvecs: int
    trace: float | None = None
    trace_interval: tuple[float, float] | None = None
    status: str = "converged"

    @property
    def sharpness(self) -> float:
        """The largest eigenvalue."""
        return float(self.eigenvalues[0])


class SharpnessTracker:
    """Track the sharpness λ_max(H) of the full-data loss during training.

    ``update(step)`` computes the k largest Hessian eigenvalues (``curvscope.eigenvalues``,
    thick-restart Lanczos, each with its residual) on steps divisible by ``every``. With
    ``warm_start`` the previous record's eigenvectors start the next Krylov space: between
    nearby steps they are nearly the new ones, so a record costs a few products instead of a
    cold run's dozens. The edge of stability (Cohen et al., 2021, "Gradient descent on neural
    networks typically occurs at the edge of stability"): full-batch GD at learning rate η drives
    the sharpness up to about 2/η, where it hovers; ``plot(lr=η)`` draws that line.

    The Hessian is that of the loss as ``loss_fn`` reduces it over ``data`` (the mean for the
    usual losses), through ``HessianOperator`` (model in eval mode, never modified).

    Args:
        model: the network being trained (its current parameters are read at each update).
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        data: an ``(inputs, targets)`` batch or an iterable of batches (fixed order).
        k: how many of the largest eigenvalues.
        every: record on steps divisible by this.
        tol: relative residual tolerance of the eigenvalues.
        warm_start: start each Lanczos run from the previous eigenvectors.
        trace: also estimate tr(H) by hutch++ (True: 30 products; an integer: that many).
        seed: seed of the random start vector and of the trace probes.

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> data = (torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.zeros(2, 1))
        >>> tracker = curvscope.SharpnessTracker(model, torch.nn.MSELoss(), data, every=5)
        >>> tracker.update(3) is None, tracker.update(5).sharpness  # mean of 2 x^2 over x = 1, 2
        (True, 5.0)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        k: int = 1,
        every: int = 10,
        tol: float = 1e-3,
        warm_start: bool = True,
        trace: bool | int = False,
        seed: int = 0,
    ) -> None:
        self._k = check_int(_FUNC, "k", k, minimum=1)
        self._every = check_int(_FUNC, "every", every, minimum=1)
        self._tol = check_float(_FUNC, "tol", tol, minimum=0.0, maximum=1.0, open_interval=True)
        if not isinstance(warm_start, bool):
            raise type_error(_FUNC, "warm_start", "True or False", warm_start)
        self._trace_matvecs = _trace_budget(trace)
        self._seed = check_int(_FUNC, "seed", seed, minimum=0)
        self._op = HessianOperator(model, loss_fn, data)
        self._warm_start = warm_start
        self._vectors: torch.Tensor | None = None
        self._history: list[SharpnessRecord] = []

    @property
    def history(self) -> list[SharpnessRecord]:
        """The records so far, in the order they were made."""
        return list(self._history)

    @property
    def every(self) -> int:
        return self._every

    def update(self, step: int) -> SharpnessRecord | None:
        """Record the sharpness at ``step`` if ``step % every == 0``; otherwise None."""
        step = check_int(f"{_FUNC}.update", "step", step, minimum=0)
        if step % self._every:
            return None
        v0 = self._vectors if self._warm_start else None
        result = eigenvalues(
            self._op, k=self._k, which="largest", tol=self._tol, v0=v0, seed=self._seed
        )
        self._vectors = result.vectors
        products, value, interval = result.num_matvecs, None, None
        if self._trace_matvecs:
            estimate = estimate_trace(self._op, num_matvecs=self._trace_matvecs, seed=self._seed)
            products += estimate.num_matvecs
            value, interval = estimate.value, (estimate.ci_low, estimate.ci_high)
        record = SharpnessRecord(
            step=step,
            eigenvalues=result.values,
            residual_norms=result.residual_norms,
            num_matvecs=products,
            trace=value,
            trace_interval=interval,
            status=result.status,
        )
        self._history.append(record)
        return record

    def plot(self, lr: float | None = None) -> Any:
        """A matplotlib Figure of the sharpness against the step, with the 2/lr line if given."""
        if lr is not None:
            lr = check_float(f"{_FUNC}.plot", "lr", lr, minimum=0.0, open_interval=True)
        from .report.tracking_plots import sharpness_figure

        return sharpness_figure(self.history, lr=lr)


def _trace_budget(trace: Any) -> int:
    if isinstance(trace, bool):
        return DEFAULT_TRACE_MATVECS if trace else 0
    if not isinstance(trace, numbers.Integral):
        raise type_error(_FUNC, "trace", "True, False or a number of products >= 3", trace)
    return check_int(_FUNC, "trace", trace, minimum=3)
