"""The shared list of operators that the operator property tests run over.

Each ``OperatorCase`` builds an operator from ``(model, loss_fn, data, **options)``, so that a
test can rebuild it on other batchings. A new operator (KFAC, a diagonal, a block) gets every
property test (symmetry, batching invariance, no side effects, dtype and device) by being
appended to ``OPERATOR_CASES``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

import curvscope


@dataclass(frozen=True)
class OperatorCase:
    """An operator factory and what can be asked of it.

    Attributes:
        name: the test id.
        make: ``make(model, loss_fn, data, **options) -> operator``.
        batching_invariant: the matrix does not depend on how the data is batched (False for
            sampled operators, whose draws follow the batches).
        losses: the loss kinds it supports ("cross_entropy", "mse" or "any").
        train_mode: it accepts ``eval_mode=False`` on a model with BatchNorm in training mode
            (KFAC and the GGN diagonal refuse it: batch statistics couple the examples).
    """

    name: str
    make: Callable[..., Any]
    batching_invariant: bool = True
    losses: str = "any"
    train_mode: bool = True


def _kfac_params(model: Any) -> list[str]:
    """The trainable parameters outside attention modules (whose projections KFAC refuses)."""
    inside = {
        f"{name}.{child}".lstrip(".")
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
        for child, _ in module.named_parameters()
    }
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in inside]


def _layers_only(make: Callable[..., Any]) -> Callable[..., Any]:
    def build(model: Any, loss_fn: Any, data: Any, **options: Any) -> Any:
        return make(model, loss_fn, data, params=_kfac_params(model), **options)

    return build


OPERATOR_CASES: list[OperatorCase] = [
    OperatorCase("hessian", curvscope.HessianOperator),
    OperatorCase(
        "hessian_forward",
        functools.partial(curvscope.HessianOperator, hvp_mode="forward-over-reverse"),
    ),
    OperatorCase("ggn", curvscope.GGNOperator),
    OperatorCase("fisher_empirical", curvscope.FisherOperator),
    OperatorCase(
        "fisher_monte_carlo",
        functools.partial(curvscope.FisherOperator, kind="monte_carlo", num_samples=2, seed=1),
        batching_invariant=False,
        losses="cross_entropy_or_mse",
    ),
    OperatorCase("kfac", _layers_only(curvscope.KFACOperator), train_mode=False),
    OperatorCase(
        "kfac_reduce_empirical",
        _layers_only(
            functools.partial(curvscope.KFACOperator, approx="reduce", fisher="empirical")
        ),
        train_mode=False,
    ),
    OperatorCase("ekfac", _layers_only(curvscope.EKFACOperator), train_mode=False),
    OperatorCase("ggn_diagonal", curvscope.GGNDiagonalOperator, train_mode=False),
    OperatorCase(
        "block_diagonal_ggn",
        lambda model, loss_fn, data, **options: curvscope.BlockDiagonalOperator(
            curvscope.GGNOperator(model, loss_fn, data, **options)
        ),
    ),
]


def operator_id(case: OperatorCase) -> str:
    return case.name
