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
    """

    name: str
    make: Callable[..., Any]
    batching_invariant: bool = True
    losses: str = "any"


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
]


def operator_id(case: OperatorCase) -> str:
    return case.name
