"""``curvscope.analyze``: from a trained model and its data to a curvature report.

Built only from the public operators, estimators and applications: eigenvalues at both ends
(Lanczos), trace with a confidence interval (Hutch++), spectral density (stochastic Lanczos
quadrature), diagonal (Hutchinson), per-layer blocks, the loss landscape, and with held-out data
the Uncertainty section (a Laplace approximation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import estimators as _estimators
from .. import operators as _operators
from .._checks import check_choice, check_int, type_error
from ..derivatives.tree import join
from . import interpret
from .landscape import loss_landscape
from .progress import StepRunner, iterate
from .result import DensityCurve, DiagonalSummary, LayerResult, Report
from .uncertainty import analyze_uncertainty, is_classification

CURVATURES = ("hessian", "ggn", "fisher")
#: Product budget of the smallest eigenvalues (they cluster near zero and converge slowly; the
#: report shows their residuals and status).
BOTTOM_MAX_MATVECS = 100
#: Stochastic Lanczos quadrature settings of the density: probes x Lanczos steps products.
DENSITY_PROBES, DENSITY_STEPS = 4, 40
_FUNC = "analyze"


def analyze(
    model: nn.Module,
    loss_fn: Any,
    data: Iterable[Any],
    *,
    curvature: str = "hessian",
    params: Sequence[str] | None = None,
    top_k: int = 6,
    bottom_k: int = 3,
    trace_matvecs: int = 100,
    density: bool = True,
    per_layer: bool = True,
    landscape: bool = True,
    seed: int = 0,
    progress: bool = True,
    held_out: Iterable[Any] | None = None,
    uncertainty: bool = True,
) -> Report:
    """Analyse the curvature of ``loss_fn(model(x), y)`` over ``data`` at the current weights.

    Computes the ``top_k`` largest and ``bottom_k`` smallest eigenvalues, the trace with a
    confidence interval, the spectral density, the diagonal, one block per parameter-owning
    module (top eigenvalue and trace), the loss and gradient norm, and the loss along the top
    eigenvector, a random direction and over the top-two-eigenvector plane, each compared with
    its quadratic model L + t gᵀv + (t²/2) vᵀAv.

    Args:
        model: the trained network (not modified).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        data: an iterable of ``(inputs, targets)`` batches (iterated several times).
        curvature: "hessian", "ggn" or "fisher" (empirical Fisher).
        params: names of the parameters to analyse (default: all that require grad).
        top_k: number of largest eigenvalues (>= 1; >= 2 for the 2-D landscape).
        bottom_k: number of smallest eigenvalues (0 to skip).
        trace_matvecs: products for the trace and the diagonal (and for each block's trace).
        density: compute the spectral density.
        per_layer: analyse one block per parameter-owning module.
        landscape: evaluate the loss landscape (1-D slices and a 15x15 grid).
        seed: seed of every random probe.
        progress: show progress with time estimates on stderr.
        held_out: held-out ``(inputs, targets)`` batches (not in ``data``); with a
            cross-entropy loss they enable the Uncertainty section.
        uncertainty: compute the Uncertainty section (a Laplace approximation with its
            evidence curve, tuned priors and reliability on ``held_out``) when it applies.

    Returns:
        A :class:`Report`; ``report.save("curvscope-report")`` writes the HTML page.

    Example:
        >>> model, loss_fn, data = curvscope.digits_example(steps=50)  # doctest: +SKIP
        >>> report = curvscope.analyze(model, loss_fn, data, progress=False)  # doctest: +SKIP
        >>> report.top.values[0] > 0  # doctest: +SKIP
        True
    """
    _validate(model, curvature, top_k, bottom_k, trace_matvecs, seed)
    settings = {
        "curvature": curvature, "params": None if params is None else list(params),
        "top_k": top_k, "bottom_k": bottom_k, "trace_matvecs": trace_matvecs,
        "density": density, "per_layer": per_layer, "landscape": landscape, "seed": seed,
    }  # fmt: skip
    with_uncertainty = bool(uncertainty) and held_out is not None and is_classification(loss_fn)
    settings["uncertainty"] = with_uncertainty
    num_steps = 5 + (bottom_k > 0) + density + per_layer + landscape + with_uncertainty
    with StepRunner(num_steps, progress=progress) as runner:
        op = runner.run(
            "operator set-up", lambda: _operator(model, loss_fn, data, curvature, params)
        )
        runner.track(op)
        found = _spectrum(runner, op, settings)
        if per_layer:
            groups = layer_groups(op.param_names)
            found["layers"] = runner.run(
                "per-layer blocks",
                lambda advance: tuple(
                    _layer(runner, op, name, names, found["diagonal"], settings)
                    for name, names in iterate(groups.items(), advance)
                ),
                parts=len(groups),
            )
        if landscape:
            found["landscape"] = _landscape(runner, op, found, seed)
        if with_uncertainty:
            found["uncertainty"] = runner.run(
                "uncertainty (Laplace)",
                lambda: analyze_uncertainty(model, loss_fn, data, held_out, params=params),
            )
    return _report(model, op, settings, found, runner)


def _spectrum(runner: StepRunner, op: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Loss, gradient, both ends of the spectrum, trace, density and diagonal."""
    seed, budget, size = settings["seed"], settings["trace_matvecs"], op.shape[0]
    found: dict[str, Any] = {"bottom": None, "density": None, "density_curve": None}
    found["loss"], found["gradient"] = runner.run("loss and gradient", op.gradient)
    found["top"] = runner.run(
        "top eigenvalues",
        lambda: _estimators.eigenvalues(
            op, k=min(settings["top_k"], size), which="largest", seed=seed
        ),
    )
    if settings["bottom_k"] > 0:
        found["bottom"] = runner.run(
            "bottom eigenvalues",
            lambda: _estimators.eigenvalues(
                op,
                k=min(settings["bottom_k"], size),
                which="smallest",
                max_matvecs=max(BOTTOM_MAX_MATVECS, 4 * settings["bottom_k"]),
                seed=seed,
                return_eigenvectors=False,
            ),
        )
    found["trace"] = runner.run(
        "trace", lambda: _estimators.trace(op, num_matvecs=budget, seed=seed)
    )
    if settings["density"]:
        found["density"] = runner.run(
            "spectral density",
            lambda: _estimators.spectral_density(
                op, num_probes=DENSITY_PROBES, lanczos_steps=DENSITY_STEPS, seed=seed
            ),
        )
        found["density_curve"] = density_curve(found["density"], found["top"], found["bottom"])
    found["diagonal"] = runner.run(
        "diagonal",
        lambda: summarize_diagonal(_estimators.diagonal(op, num_matvecs=budget, seed=seed)),
    )
    return found


def _landscape(runner: StepRunner, op: Any, found: dict[str, Any], seed: int) -> Any:
    values = _as_tensor(found["top"].values)
    grid_size = 15 if len(values) >= 2 else 0
    return runner.run(
        "landscape",
        lambda advance: loss_landscape(
            op,
            loss=float(found["loss"]),
            gradient=found["gradient"],
            eigenvalues=values,
            eigenvectors=found["top"].vectors,
            seed=seed,
            grid_size=grid_size,
            advance=advance,
        ),
        parts=2 * 21 + grid_size**2,
        loss_evaluations=lambda result: result.num_loss_evaluations,
    )


def _validate(
    model: Any, curvature: Any, top_k: Any, bottom_k: Any, trace_matvecs: Any, seed: Any
) -> None:
    if not isinstance(model, nn.Module):
        raise type_error(_FUNC, "model", "a torch.nn.Module", model)
    check_choice(_FUNC, "curvature", curvature, CURVATURES)
    check_int(_FUNC, "top_k", top_k, minimum=1)
    check_int(_FUNC, "bottom_k", bottom_k, minimum=0)
    check_int(_FUNC, "trace_matvecs", trace_matvecs, minimum=3)
    check_int(_FUNC, "seed", seed)


def _operator(model: nn.Module, loss_fn: Any, data: Any, curvature: str, params: Any) -> Any:
    if curvature == "hessian":
        return _operators.HessianOperator(model, loss_fn, data, params=params)
    if curvature == "ggn":
        return _operators.GGNOperator(model, loss_fn, data, params=params)
    return _operators.FisherOperator(model, loss_fn, data, kind="empirical", params=params)


def layer_groups(param_names: Sequence[str]) -> dict[str, list[str]]:
    """Group parameter names by the module that owns them, in order.

    Example:
        >>> layer_groups(["0.weight", "0.bias", "2.weight", "scale"])
        {'0': ['0.weight', '0.bias'], '2': ['2.weight'], 'scale': ['scale']}
    """
    groups: dict[str, list[str]] = {}
    for name in param_names:
        owner = name.rpartition(".")[0] or name
        groups.setdefault(owner, []).append(name)
    return groups


def _layer(
    runner: StepRunner,
    op: Any,
    name: str,
    names: list[str],
    diagonal: DiagonalSummary,
    settings: dict[str, Any],
) -> LayerResult:
    block = runner.track(op.block(names))
    size, seed = block.shape[0], settings["seed"]
    top = _estimators.eigenvalues(block, k=1, which="largest", seed=seed, return_eigenvectors=False)
    budget = max(3, min(settings["trace_matvecs"], 3 * size))
    trace = _estimators.trace(block, num_matvecs=budget, seed=seed)
    by_name = diagonal.estimate.by_name()
    values = join([by_name[key] for key in names]).double().cpu()
    return LayerResult(
        name=name,
        param_names=tuple(names),
        num_params=size,
        top_eigenvalue=top,
        trace=trace,
        diagonal_mean=float(values.mean()),
        diagonal_abs_max=float(values.abs().max()),
    )


def summarize_diagonal(estimate: Any, *, bins: int = 50) -> DiagonalSummary:
    """Statistics and a histogram of a ``DiagonalEstimate``'s values."""
    values = _as_tensor(estimate.value).double().cpu().numpy()
    counts, edges = np.histogram(values, bins=bins)
    return DiagonalSummary(
        estimate=estimate,
        mean=float(values.mean()),
        std=float(values.std()),
        minimum=float(values.min()),
        median=float(np.median(values)),
        maximum=float(values.max()),
        fraction_negative=float((values < 0).mean()),
        edges=tuple(float(x) for x in edges),
        counts=tuple(int(x) for x in counts),
    )


def density_curve(spectrum: Any, top: Any, bottom: Any, *, points: int = 400) -> DensityCurve:
    """Evaluate the smoothed density on a grid covering the spectrum and the eigenvalues."""
    ends = [float(spectrum.lower), float(spectrum.upper)]
    for result in (top, bottom):
        if result is not None:
            ends.extend(float(x) for x in _as_tensor(result.values))
    low, high = min(ends), max(ends)
    width = max(high - low, 1e-12)
    sigma = width / 100.0
    grid = torch.linspace(low - 0.05 * width, high + 0.05 * width, points, dtype=torch.float64)
    values = _as_tensor(spectrum.density(grid, sigma=sigma)).double().cpu()
    step = float(grid[1] - grid[0])
    negative = float(values[grid < 0].sum() * step)
    total = float(values.sum() * step)
    return DensityCurve(
        grid=tuple(grid.tolist()),
        values=tuple(values.tolist()),
        sigma=sigma,
        fraction_negative=negative / total if total > 0 else 0.0,
    )


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _report(
    model: nn.Module, op: Any, settings: dict[str, Any], found: dict[str, Any], runner: Any
) -> Report:
    gradient_norm = float(found["gradient"].double().norm())
    report = Report(
        model=type(model).__name__,
        num_params=op.shape[0],
        num_examples=int(op.num_examples),
        curvature=settings["curvature"],
        dtype=str(op.dtype).replace("torch.", ""),
        device=str(op.device),
        param_names=tuple(op.param_names),
        seed=settings["seed"],
        settings=settings,
        loss=float(found["loss"]),
        gradient_norm=gradient_norm,
        top=found["top"],
        bottom=found["bottom"],
        trace=found["trace"],
        density=found["density"],
        density_curve=found["density_curve"],
        layers=found.get("layers", ()),
        diagonal=found["diagonal"],
        landscape=found.get("landscape"),
        steps=tuple(runner.steps),
        uncertainty=found.get("uncertainty"),
    )
    return _with_interpretation(report)


def _with_interpretation(report: Report) -> Report:
    return dataclasses.replace(report, interpretation=interpret.readings(report))
