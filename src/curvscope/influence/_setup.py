"""Validation and set-up for InfluenceFunction: the curvature operator, the parameter names,
the solver choice, and a small progress bar."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

from .._checks import check_choice, check_float, check_int, type_error, value_error
from ..operators import EKFACOperator, GGNDiagonalOperator, KFACOperator
from ..operators._inputs import select_params as _select_params

FUNC = "InfluenceFunction"
CURVATURES = ("ggn", "hessian", "fisher", "kfac", "ekfac", "diagonal", "identity")
SOLVER_NAMES = ("auto", "exact", "cg", "lowrank", "lissa")
#: curvature name -> the structured operator class (exact inverse, no products).
STRUCTURED = {"kfac": KFACOperator, "ekfac": EKFACOperator, "diagonal": GGNDiagonalOperator}
#: ``solver="auto"`` builds the dense matrix up to this many parameters, and uses CG above.
AUTO_EXACT_MAX_PARAMS = 4096


def is_operator(value: Any) -> bool:
    """Whether ``value`` has the operator interface (shape, dtype, device, matmat)."""
    return all(hasattr(value, name) for name in ("shape", "dtype", "device", "matmat"))


def check_curvature(curvature: Any) -> str | Any:
    """A curvature name from CURVATURES, or an operator object (returned as is)."""
    if isinstance(curvature, str):
        return check_choice(FUNC, "curvature", curvature, CURVATURES)
    if is_operator(curvature):
        shape = tuple(curvature.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise value_error(FUNC, "curvature", "a square operator of shape (P, P)", curvature)
        return curvature
    listed = ", ".join(repr(c) for c in CURVATURES)
    raise type_error(
        FUNC,
        "curvature",
        f"one of {listed} or a curvscope operator",
        curvature,
        "Pass a name, or an operator such as curvscope.GGNOperator(model, loss_fn, data).",
    )


def check_options(
    curvature, solver, damping, max_batch_size, seed, progress, rank, tol, max_matvecs
) -> float | None:
    """Validate the numeric and flag options of InfluenceFunction; returns the damping."""
    if damping is not None:
        damping = check_float(FUNC, "damping", damping, minimum=0.0)
        if not math.isfinite(damping):
            raise value_error(FUNC, "damping", "a finite number >= 0", damping)
    if solver == "lowrank" and damping == 0.0 and curvature != "identity":
        raise value_error(
            FUNC, "damping", "a number > 0 with solver='lowrank'", damping, "Pass damping>0."
        )
    check_int(FUNC, "max_batch_size", max_batch_size, minimum=1, allow_none=True)
    check_int(FUNC, "seed", seed, minimum=0)
    if not isinstance(progress, bool):
        raise type_error(FUNC, "progress", "True or False", progress)
    check_int(FUNC, "rank", rank, minimum=1)
    if tol is not None:
        check_float(FUNC, "tol", tol, minimum=0.0, maximum=1.0, open_interval=True)
    check_int(FUNC, "max_matvecs", max_matvecs, minimum=1, allow_none=True)
    return damping


def select_params(model: nn.Module, params: Any) -> list[str]:
    """Parameter names in model order: ``params`` (validated) or all with requires_grad."""
    return _select_params(model, params, FUNC)


def operator_names(model: nn.Module, op: Any, params: Any) -> list[str]:
    """The parameter names a user-supplied operator acts on, checked against its size."""
    names = getattr(op, "param_names", None)
    named = dict(model.named_parameters())
    if params is not None or not names or any(name not in named for name in names):
        if params is None:
            raise value_error(
                FUNC,
                "params",
                "the parameter names the curvature operator acts on",
                None,
                "The operator does not name model parameters (op.param_names); pass params=[...] "
                "in the order of its rows.",
            )
        names = select_params(model, params)
    size = sum(named[name].numel() for name in names)
    if size != op.shape[0]:
        raise value_error(
            FUNC,
            "curvature",
            f"an operator of size {size} (the parameters {names})",
            op,
            "Build it on the same model and params.",
        )
    return list(names)


def same_names(op: Any, names: list[str]) -> list[str]:
    """The operator's parameter order, checked to hold the same parameters as ``names``."""
    order = list(getattr(op, "param_names", names))
    if sorted(order) != sorted(names):
        raise value_error(
            FUNC,
            "params",
            f"parameters the structured curvature supports ({order})",
            names,
            "Restrict params= to the parameters of supported layers.",
        )
    return order


def resolve_solver(solver: str, curvature: Any, op: Any, size: int) -> str:
    """The solver that ``solver="auto"`` stands for (see InfluenceFunction)."""
    if curvature == "identity":
        return "identity"
    if solver != "auto":
        return solver
    if callable(getattr(op, "inverse", None)) or size <= AUTO_EXACT_MAX_PARAMS:
        return "exact"
    return "cg"


class ProgressBar:
    """A rich progress bar on stderr when enabled; a no-op otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Any]:
        if not self.enabled:
            yield lambda steps=1: None
            return
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(file=sys.stderr), transient=True) as bar:
            task = bar.add_task(description, total=max(total, 1))
            yield lambda steps=1: bar.advance(task, steps)
