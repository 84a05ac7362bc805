"""Hessian-free optimisation (truncated Newton with damping) on the curvature operators."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_float, check_int, type_error, value_error
from ..estimators._results import Result
from ..operators import GGNOperator, HessianOperator
from ._cg import CGRun, Iterate, damped_cg
from ._common import add_flat, check_bool, check_loss_fn, check_model, trainable

_FUNC = "optim.HessianFree"
_CURVATURES = ("ggn", "hessian")
#: The previous direction, times this, starts the next CG run (Martens, 2010, section 4.5).
_DECAY = 0.95
#: Line search: step fractions 0.8^j, j = 1.., and Armijo's constant (Martens & Sutskever 2012).
_SHRINK, _ARMIJO, _MAX_LINE_SEARCH = 0.8, 1e-2, 20


@dataclass(frozen=True, eq=False)
class StepResult(Result):
    """What one Hessian-free step did.

    Attributes:
        loss: the batch loss before the step.
        damping: the damping λ used by this step's CG (the next step's is ``optimizer.damping``).
        cg_iters: CG iterations run.
        num_matvecs: curvature-vector products used (CG iterations, plus one for a warm start).
        reduction_ratio: ρ = (L(θ + d) − L(θ)) / q(d), the actual over the predicted decrease of
            the chosen CG iterate, q the undamped quadratic model; NaN when q(d) >= 0.
        status: ``"accepted"`` (a CG iterate lowered the loss), ``"line_search"`` (a fraction of
            it did) or ``"rejected"`` (nothing lowered the loss; the parameters are unchanged).
        new_loss: the batch loss after the step (equal to ``loss`` when rejected).
        cg_status: why CG stopped: ``"progress"`` (Martens' relative-progress rule),
            ``"converged"``, ``"max_iters"`` or ``"negative_curvature"``.
    """

    loss: float
    damping: float
    cg_iters: int
    num_matvecs: int
    reduction_ratio: float
    status: str
    new_loss: float = math.nan
    cg_status: str = ""


class HessianFree:
    """Hessian-free optimisation: damped CG on the local quadratic model, every step.

    Each ``step(batch)`` solves ``(C + λI) d = −g`` approximately by CG on the batch (Martens,
    2010, "Deep learning via Hessian-free optimization"), with ``C`` the generalised Gauss-Newton
    matrix (``curvature="ggn"``, positive semi-definite for convex losses; the usual choice) or
    the Hessian (``"hessian"``: Newton-CG), ``g`` the gradient of the batch loss. As in Martens:

    - CG starts from the previous direction times 0.95 (from zero if that is worse on the model)
      and stops when the model's relative progress over the last k = max(10, 0.1 i) iterations
      falls below ``k · cg_tol``, or after ``max_cg_iters``; with ``curvature="hessian"`` also
      once ``‖r‖ <= min(0.5, √‖g‖)‖g‖``, the forcing sequence that gives Newton-CG superlinear
      local convergence (Nocedal & Wright, 2006, Algorithm 7.1), as scipy's trust-ncg uses;
    - iterates are kept at iterations ⌈1.3^j⌉; going back from the last one, the one with the
      lowest batch loss is taken (backtracking); if none lowers the loss, an Armijo line search
      along it (fractions 0.8^j); if that fails too, the step is rejected;
    - λ follows Levenberg-Marquardt: ρ > 3/4 → λ·2/3, ρ < 1/4 → λ·3/2 (``adapt_damping``).

    Curvatures are of the loss as ``loss_fn`` reduces it (the mean for the usual losses), via
    ``GGNOperator``/``HessianOperator`` on ``batch``: the model is evaluated in eval mode for the
    products and losses. Only ``step`` changes the model: its trainable parameters, in place.

    Args:
        model: the network; its parameters with ``requires_grad`` are optimised.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``.
        curvature: ``"ggn"`` or ``"hessian"``.
        damping: the initial λ >= 0.
        adapt_damping: adapt λ from the reduction ratio (else λ stays fixed).
        max_cg_iters: at most this many CG iterations (products) per step.
        cg_tol: Martens' ε of the relative-progress stop.

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> opt = curvscope.optim.HessianFree(model, torch.nn.MSELoss(), damping=0.0)
        >>> opt.step((x, y)).status
        'accepted'
        >>> model.weight.data.round(decimals=6).tolist()  # one Newton step: least squares
        [[1.0, 1.0]]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        *,
        curvature: str = "ggn",
        damping: float = 1.0,
        adapt_damping: bool = True,
        max_cg_iters: int = 50,
        cg_tol: float = 5e-4,
    ) -> None:
        self._model = check_model(_FUNC, model)
        self._loss_fn = check_loss_fn(_FUNC, loss_fn)
        self._curvature = check_choice(_FUNC, "curvature", curvature, _CURVATURES)
        self._damping = check_float(_FUNC, "damping", damping, minimum=0.0)
        if math.isinf(self._damping):
            raise value_error(_FUNC, "damping", "a finite number >= 0", damping)
        self._adapt = check_bool(_FUNC, "adapt_damping", adapt_damping)
        self._max_cg_iters = check_int(_FUNC, "max_cg_iters", max_cg_iters, minimum=1)
        self._cg_tol = check_float(_FUNC, "cg_tol", cg_tol, minimum=0.0, open_interval=True)
        self._direction: torch.Tensor | None = None
        self._num_steps = 0
        self._hvp_mode = "auto"

    @property
    def damping(self) -> float:
        """The damping λ the next step will use."""
        return self._damping

    @property
    def num_steps(self) -> int:
        """Steps taken (accepted or not)."""
        return self._num_steps

    def step(self, batch: Any) -> StepResult:
        """One Hessian-free step on ``batch`` (an ``(inputs, targets)`` pair, or any data the
        curvature operators accept); updates the parameters in place unless rejected."""
        op = self._operator(batch)
        loss, gradient = op.gradient()
        x0 = None if self._direction is None else _DECAY * self._direction
        run = damped_cg(
            lambda v: op.matvec(v),
            gradient,
            self._damping,
            x0=x0,
            max_iters=self._max_cg_iters,
            tol=self._cg_tol,
            forcing=self._curvature == "hessian",
        )
        chosen, new_loss = _backtrack(op, run.iterates, loss)
        ratio = _reduction_ratio(chosen, new_loss - loss, self._damping)
        status, delta = "accepted", chosen.x if chosen is not None else None
        if delta is None or not new_loss < loss:
            delta, new_loss = _line_search(op, delta, gradient, loss)
            status = "line_search" if delta is not None else "rejected"
        if delta is not None:
            add_flat(trainable(self._model), op.param_names, delta)
        if chosen is not None:
            self._direction = chosen.x.detach().clone()
        if self._curvature == "hessian":  # the product mode is chosen once, then kept
            self._hvp_mode = op.hvp_mode
        result = self._result(loss, new_loss, run, ratio, status, op.num_matvecs)
        self._adapt_damping(ratio, status)
        self._num_steps += 1
        return result

    def _operator(self, batch: Any) -> Any:
        names = list(trainable(self._model))
        options = dict(params=names, check_deterministic=False)
        if self._curvature == "ggn":
            return GGNOperator(self._model, self._loss_fn, batch, **options)
        return HessianOperator(
            self._model, self._loss_fn, batch, hvp_mode=self._hvp_mode, **options
        )

    def _result(self, loss, new_loss, run: CGRun, ratio, status, products) -> StepResult:
        cg_iters = run.iterates[-1].iteration if run.iterates else 0
        return StepResult(
            loss=float(loss),
            damping=self._damping,
            cg_iters=cg_iters,
            num_matvecs=products,
            reduction_ratio=ratio,
            status=status,
            new_loss=float(new_loss),
            cg_status=run.status,
        )

    def _adapt_damping(self, ratio: float, status: str) -> None:
        if not self._adapt:
            return
        if status == "rejected" or not ratio >= 0.25:  # NaN ratio counts as bad
            self._damping *= 1.5
        elif ratio > 0.75:
            self._damping *= 2.0 / 3.0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Damping, previous direction, step count and product mode, as torch optimisers do."""
        direction = None if self._direction is None else self._direction.clone()
        return {
            "damping": self._damping,
            "direction": direction,
            "num_steps": self._num_steps,
            "hvp_mode": self._hvp_mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``, so that training resumes exactly."""
        func = "optim.HessianFree.load_state_dict"
        keys = {"damping", "direction", "num_steps", "hvp_mode"}
        if not isinstance(state, dict) or set(state) != keys:
            raise type_error(
                func, "state", f"a dict with keys {sorted(keys)}", state, "Pass a state_dict()."
            )
        size = sum(p.numel() for p in trainable(self._model).values())
        direction = state["direction"]
        if direction is not None and (
            not isinstance(direction, torch.Tensor) or tuple(direction.shape) != (size,)
        ):
            raise value_error(func, "state['direction']", f"None or a ({size},) tensor", direction)
        self._damping = check_float(func, "state['damping']", state["damping"], minimum=0.0)
        self._num_steps = check_int(func, "state['num_steps']", state["num_steps"], minimum=0)
        self._hvp_mode = state["hvp_mode"]
        self._direction = None if direction is None else direction.detach().clone()


def _backtrack(op: Any, iterates: list[Iterate], loss: float) -> tuple[Iterate | None, float]:
    """From the last kept iterate backwards, while the batch loss keeps falling."""
    if not iterates:
        return None, loss
    index = len(iterates) - 1
    best = op.loss(iterates[index].x)
    while index > 0:
        earlier = op.loss(iterates[index - 1].x)
        if not earlier < best:
            break
        index, best = index - 1, earlier
    return iterates[index], best


def _reduction_ratio(chosen: Iterate | None, actual: float, damping: float) -> float:
    """Actual over predicted change, the prediction from the undamped model q = φ − ½λ‖x‖²."""
    if chosen is None or not math.isfinite(chosen.phi):
        return math.nan
    predicted = chosen.phi - 0.5 * damping * float(torch.dot(chosen.x, chosen.x))
    return actual / predicted if predicted < 0 else math.nan


def _line_search(
    op: Any, direction: torch.Tensor | None, gradient: torch.Tensor, loss: float
) -> tuple[torch.Tensor | None, float]:
    """Armijo backtracking along ``direction``: ``L(θ + αd) <= L(θ) + c α gᵀd``."""
    if direction is None:
        return None, loss
    slope = float(torch.dot(gradient, direction))
    if not slope < 0:
        return None, loss
    alpha = 1.0
    for _ in range(_MAX_LINE_SEARCH):
        alpha *= _SHRINK
        trial = op.loss(alpha * direction)
        if trial <= loss + _ARMIJO * alpha * slope:
            return alpha * direction, trial
    return None, loss
