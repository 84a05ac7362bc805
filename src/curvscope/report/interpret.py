"""One-line readings of the numbers: sharp or flat, minimum or saddle, where curvature lives.

The thresholds are rules of thumb, stated in each line so the reader can judge: gradient descent
with learning rate η is stable along an eigen-direction only if η < 2/λ (the classic stability
bound; Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability", ICLR 2021), so λ_max is read against common learning rates.
"""

from __future__ import annotations

import math
from typing import Any

#: λ_max above this is "sharp" (GD stable only for η < 0.1), below FLAT is "flat" (η > 1).
SHARP, FLAT = 20.0, 2.0


def sharpness(top: float) -> str:
    """Sharp or flat, from the largest eigenvalue.

    Example:
        >>> sharpness(100.0).split(":")[0]
        'sharp'
    """
    if not math.isfinite(top) or top <= 0:
        return f"no positive curvature found (largest eigenvalue {top:.4g})."
    bound = 2.0 / top
    if top > SHARP:
        word = "sharp"
    elif top < FLAT:
        word = "flat"
    else:
        word = "moderately sharp"
    return (
        f"{word}: λ_max = {top:.4g}, so plain gradient descent is stable along the sharpest "
        f"direction only for learning rates below 2/λ_max = {bound:.3g}."
    )


def stationarity(bottom: float | None, top: float, residual: float, curvature: str) -> str:
    """Minimum or saddle, from the most negative eigenvalue (and its residual)."""
    if bottom is None:
        return "smallest eigenvalues not computed (bottom_k=0)."
    if curvature != "hessian":
        return (
            f"the {curvature.upper()} is positive semi-definite by construction: it cannot show "
            f"a saddle (smallest eigenvalue {bottom:.3g}); analyse the Hessian for that."
        )
    threshold = max(abs(residual), 1e-3 * abs(top))
    if bottom >= -threshold:
        return (
            f"minimum: no significant negative curvature (λ_min = {bottom:.3g}, within "
            f"{threshold:.2g} of zero)."
        )
    ratio = abs(bottom) / top if top > 0 else math.inf
    if ratio < 0.01:
        return (
            f"near a minimum: only slight negative curvature, λ_min = {bottom:.3g} "
            f"({ratio:.2%} of λ_max)."
        )
    return (
        f"saddle: negative curvature λ_min = {bottom:.3g} ({ratio:.1%} of λ_max), so the loss "
        "still decreases along some directions."
    )


def gradient_reading(loss: float, gradient_norm: float, top: float) -> str:
    """Is the point stationary? Compare the quadratic-model decrease ‖g‖²/(2λ_max) with the loss."""
    if top <= 0 or not math.isfinite(top):
        return f"gradient norm {gradient_norm:.3g}."
    decrease = gradient_norm**2 / (2.0 * top)
    stationary = decrease < 0.01 * max(abs(loss), 1e-12)
    word = "near a stationary point" if stationary else "not stationary"
    return (
        f"{word}: a gradient step of size 1/λ_max would lower the loss by about "
        f"‖g‖²/(2λ_max) = {decrease:.3g} (loss {loss:.4g})."
    )


def trace_reading(trace: float, top: float, num_params: int) -> str:
    """How concentrated the curvature is: λ_max against the trace and the mean eigenvalue."""
    mean = trace / max(num_params, 1)
    if trace <= 0:
        return f"trace {trace:.4g} (mean eigenvalue {mean:.3g}): negative curvature dominates."
    share = top / trace
    return (
        f"mean eigenvalue trace/P = {mean:.3g}; the top eigenvalue alone is {share:.1%} of the "
        "trace, " + ("so curvature sits in few directions." if share > 0.1 else "spread widely.")
    )


def layer_reading(names: list[str], tops: list[float]) -> str:
    """Which layer is sharpest."""
    if not names:
        return "per-layer analysis not computed."
    best = max(range(len(names)), key=lambda i: tops[i])
    return f"sharpest block: layer '{names[best]}' (top eigenvalue {tops[best]:.4g})."


def landscape_reading(radius: float, quadratic_radius: float) -> str:
    """How far the local quadratic picture holds along the top eigenvector."""
    share = quadratic_radius / radius if radius > 0 else 0.0
    return (
        f"along the top eigenvector the quadratic model stays within 10% of the loss up to "
        f"|t| = {quadratic_radius:.3g} ({share:.0%} of the plotted range)."
    )


def readings(report: Any) -> dict[str, str]:
    """All one-line readings of a report, by section key."""
    top_values = [float(x) for x in report.top.values]
    top = max(top_values)
    lines = {
        "sharpness": sharpness(top),
        "gradient": gradient_reading(report.loss, report.gradient_norm, top),
        "trace": trace_reading(float(report.trace.value), top, report.num_params),
    }
    if report.bottom is not None:
        values = [float(x) for x in report.bottom.values]
        index = min(range(len(values)), key=lambda i: values[i])
        residual = float(report.bottom.residual_norms[index])
        lines["stationarity"] = stationarity(values[index], top, residual, report.curvature)
    else:
        lines["stationarity"] = stationarity(None, top, 0.0, report.curvature)
    if report.density_curve is not None:
        share = report.density_curve.fraction_negative
        lines["density"] = (
            f"{share:.1%} of the spectral mass lies below zero; the spectrum spans "
            f"[{report.density.lower:.3g}, {report.density.upper:.3g}]."
        )
    if report.landscape is not None:
        lines["landscape"] = landscape_reading(
            report.landscape.radius, report.landscape.top.quadratic_radius
        )
    tops = [float(layer.top_eigenvalue.values[0]) for layer in report.layers]
    lines["layers"] = layer_reading([layer.name for layer in report.layers], tops)
    return lines
