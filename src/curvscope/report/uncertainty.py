"""The report's Uncertainty section: a Laplace approximation judged on held-out data.

The held-out batches are split in two, by example (even positions: validation, odd: test). On
the training data a :class:`curvscope.LaplaceApproximation` is fitted ("kfac" over all
parameters, or over ``params``); its prior precision is tuned twice, by the evidence ("marglik")
and by the validation NLL of the probit predictive ("gridsearch"). The trained model and both
Laplace predictives are compared on the test half: accuracy, NLL, ECE and the reliability
diagram.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..laplace import LaplaceApproximation
from ..laplace.predictive import reliability
from ..operators.data import iterate_batches

#: The prior precisions of the evidence curve.
CURVE = tuple(float(x) for x in np.logspace(-3, 4, 29))


@dataclass(frozen=True)
class UncertaintyResult:
    """What the Uncertainty section shows (every number is in ``results.json``).

    Attributes:
        structure, subset: the Laplace approximation's curvature structure and parameters.
        num_params: P, the parameters in the subset.
        num_validation, num_test: examples of the held-out halves.
        prior_grid: the prior precisions δ of the curves.
        log_evidence: log marginal likelihood at each δ.
        validation_nll: validation NLL of the probit predictive at each δ.
        prior_evidence: δ maximising the evidence; ``prior_validation``: δ minimising the
            validation NLL (over ``prior_grid``).
        metrics: "trained", "laplace_evidence", "laplace_validation" -> accuracy, nll, ece and
            the reliability bins (``bin_edges``, ``bin_counts``, ``bin_accuracy``,
            ``bin_confidence``) on the test half.
        seconds: wall-clock time of the section.
    """

    structure: str
    subset: str
    num_params: int
    num_validation: int
    num_test: int
    prior_grid: tuple[float, ...]
    log_evidence: tuple[float, ...]
    validation_nll: tuple[float, ...]
    prior_evidence: float
    prior_validation: float
    metrics: dict[str, dict[str, Any]]
    seconds: float


def is_classification(loss_fn: Any) -> bool:
    """Whether the section applies: a cross-entropy loss."""
    return isinstance(loss_fn, nn.CrossEntropyLoss) or loss_fn is nn.functional.cross_entropy


def _halves(held_out: Any, device: torch.device) -> tuple[list, list]:
    """(validation, test) batches: even and odd example positions of every held-out batch."""
    validation, test = [], []
    for batch in iterate_batches(held_out, device=device, max_batch_size=None, func="analyze"):
        for start, target in ((0, validation), (1, test)):
            index = torch.arange(start, batch.size, 2, device=device)
            if len(index):
                target.append((_take(batch.inputs, index), batch.targets[index]))
    return validation, test


def _take(inputs: Any, index: torch.Tensor) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, dict):
        return {key: _take(value, index) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_take(value, index) for value in inputs)
    return inputs


def _predict_all(predict: Any, batches: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    probs = [predict(inputs) for inputs, _ in batches]
    return torch.cat(probs), torch.cat([targets for _, targets in batches])


def analyze_uncertainty(
    model: nn.Module, loss_fn: Any, data: Any, held_out: Any, *, params: Any = None
) -> UncertaintyResult:
    """Fit, tune and judge a Laplace approximation (see the module docstring)."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    validation, test = _halves(held_out, device)
    structure = "kfac"
    chosen = "all" if params is None else list(params)
    la = LaplaceApproximation(model, loss_fn, data, structure=structure, subset=chosen)
    log_evidence = tuple(la.log_marginal_likelihood(delta) for delta in CURVE)
    validation_nll = tuple(la.validation_nll(validation, CURVE))
    prior_validation = CURVE[int(np.nanargmin(validation_nll))]
    prior_evidence = float(la.optimize_prior_precision("marglik"))
    metrics = {}
    with torch.no_grad():
        was = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            probs, targets = _predict_all(lambda x: torch.softmax(_call(model, x), 1), test)
        finally:
            for module, flag in was:
                module.training = flag
    metrics["trained"] = reliability(probs, targets)
    for key, prior in [
        ("laplace_evidence", prior_evidence),
        ("laplace_validation", prior_validation),
    ]:
        la.prior_precision = prior
        probs, targets = _predict_all(lambda x: la.predict(x, method="probit"), test)
        metrics[key] = reliability(probs, targets)
    return UncertaintyResult(
        structure=structure,
        subset="all" if params is None else "params",
        num_params=la.num_params,
        num_validation=_count(validation),
        num_test=_count(test),
        prior_grid=CURVE,
        log_evidence=log_evidence,
        validation_nll=validation_nll,
        prior_evidence=prior_evidence,
        prior_validation=prior_validation,
        metrics=metrics,
        seconds=time.perf_counter() - start,
    )


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _count(batches: Sequence) -> int:
    return sum(len(targets) for _, targets in batches)
