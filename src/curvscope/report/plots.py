"""The report's figures. Draws only: every number comes from the Report (nothing is computed).

matplotlib is imported here and nowhere else, with the non-interactive Agg backend.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

DPI = 110
TOP, BOTTOM, MODEL, RANDOM = "#1f77b4", "#d62728", "#444444", "#2ca02c"


def render_figures(report: Any) -> dict[str, bytes]:
    """All figures of ``report`` as PNG bytes, by file name."""
    figures = {"eigenvalues.png": eigenvalue_figure(report)}
    if report.density_curve is not None:
        figures["density.png"] = density_figure(report)
    if report.landscape is not None:
        figures["landscape_1d.png"] = landscape_line_figure(report.landscape)
        if report.landscape.grid is not None:
            figures["landscape_2d.png"] = landscape_grid_figure(report.landscape.grid)
    if report.layers:
        figures["layers.png"] = layer_figure(report.layers)
    if report.diagonal is not None:
        figures["diagonal.png"] = diagonal_figure(report.diagonal)
    if getattr(report, "uncertainty", None) is not None:
        figures["evidence.png"] = evidence_figure(report.uncertainty)
        figures["reliability.png"] = reliability_figure(report.uncertainty)
    return figures


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return buffer.getvalue()


def _values(result: Any) -> list[float]:
    return [float(x) for x in result.values] if result is not None else []


def eigenvalue_figure(report: Any) -> bytes:
    """Stem plot of the largest and the smallest eigenvalues, by rank."""
    figure, axis = plt.subplots(figsize=(7.0, 3.2))
    top = sorted(_values(report.top), reverse=True)
    axis.stem(range(1, len(top) + 1), top, linefmt=TOP, markerfmt="o", basefmt=" ", label="largest")
    bottom = sorted(_values(report.bottom))
    if bottom:
        start = len(top) + 2
        ranks = range(start, start + len(bottom))
        markers = axis.stem(ranks, bottom, linefmt=BOTTOM, markerfmt="s", basefmt=" ")
        markers.set_label("smallest")
        axis.axvline(len(top) + 1, color="#bbbbbb", linestyle=":")
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks([])
    axis.set_xlabel("largest (left) … smallest (right)")
    axis.set_ylabel("eigenvalue")
    axis.legend(loc="upper right")
    axis.grid(alpha=0.3)
    return _png(figure)


def density_figure(report: Any) -> bytes:
    """The smoothed spectral density on a log scale, with the computed eigenvalues marked."""
    curve = report.density_curve
    figure, axis = plt.subplots(figsize=(7.0, 3.2))
    values = np.asarray(curve.values, dtype=float)
    floor = max(values.max(), 1e-300) * 1e-8
    axis.semilogy(curve.grid, np.maximum(values, floor), color=TOP, label="density")
    for index, value in enumerate(_values(report.top)):
        axis.axvline(value, color=TOP, alpha=0.5, linestyle="--", label=None if index else "top")
    for index, value in enumerate(_values(report.bottom)):
        label = None if index else "bottom"
        axis.axvline(value, color=BOTTOM, alpha=0.5, linestyle="--", label=label)
    axis.set_ylim(bottom=floor)
    axis.set_xlabel("eigenvalue")
    axis.set_ylabel("density (log scale)")
    axis.legend(loc="upper right")
    axis.grid(alpha=0.3)
    return _png(figure)


def landscape_line_figure(landscape: Any) -> bytes:
    """Loss along the top eigenvector and a random direction, each with its quadratic model."""
    figure, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    lines = (landscape.top, landscape.random)
    for axis, line, color in zip(axes, lines, (TOP, RANDOM), strict=True):
        axis.plot(line.t, line.loss, color=color, marker=".", label="loss")
        axis.plot(line.t, line.quadratic, color=MODEL, linestyle="--", label="quadratic model")
        if line.quadratic_radius > 0:
            axis.axvspan(-line.quadratic_radius, line.quadratic_radius, color=color, alpha=0.08)
        axis.set_title(f"{line.direction} (vᵀAv = {line.curvature:.3g})", fontsize=10)
        axis.set_xlabel("t")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("loss")
    axes[0].legend(loc="upper center")
    return _png(figure)


def landscape_grid_figure(grid: Any) -> bytes:
    """Loss contours over the top-two-eigenvector plane, quadratic model contours dashed."""
    figure, axis = plt.subplots(figsize=(5.6, 4.4))
    a, b = np.asarray(grid.a), np.asarray(grid.b)
    loss, model = np.asarray(grid.loss).T, np.asarray(grid.quadratic).T
    levels = np.linspace(min(loss.min(), model.min()), max(loss.max(), model.max()), 14)
    filled = axis.contourf(a, b, loss, levels=levels, cmap="viridis")
    axis.contour(a, b, model, levels=levels, colors="white", linestyles="--", linewidths=0.8)
    figure.colorbar(filled, ax=axis, label="loss")
    axis.plot([0], [0], marker="+", color="red", markersize=10)
    axis.set_xlabel(f"a: top eigenvector (λ₁ = {grid.curvatures[0]:.3g})")
    axis.set_ylabel(f"b: second eigenvector (λ₂ = {grid.curvatures[1]:.3g})")
    axis.set_title("loss (filled) and quadratic model (dashed)", fontsize=10)
    return _png(figure)


def layer_figure(layers: Any) -> bytes:
    """Per-layer top eigenvalue and trace (with its confidence interval) as bars."""
    names = [layer.name for layer in layers]
    tops = [float(layer.top_eigenvalue.values[0]) for layer in layers]
    traces = [float(layer.trace.value) for layer in layers]
    low = [t - float(layer.trace.ci_low) for t, layer in zip(traces, layers, strict=True)]
    high = [float(layer.trace.ci_high) - t for t, layer in zip(traces, layers, strict=True)]
    figure, axes = plt.subplots(1, 2, figsize=(8.0, 3.0))
    positions = np.arange(len(names))
    axes[0].bar(positions, tops, color=TOP)
    axes[0].set_title("top eigenvalue per layer", fontsize=10)
    axes[1].bar(positions, traces, color=RANDOM, yerr=[low, high], capsize=3)
    axes[1].set_title("trace per layer (with interval)", fontsize=10)
    for axis in axes:
        axis.set_xticks(positions, names, rotation=30 if len(names) > 6 else 0, fontsize=8)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.grid(alpha=0.3, axis="y")
    return _png(figure)


def diagonal_figure(diagonal: Any) -> bytes:
    """Histogram of the curvature diagonal (counts on a log scale)."""
    figure, axis = plt.subplots(figsize=(7.0, 3.0))
    edges = np.asarray(diagonal.edges)
    axis.stairs(np.maximum(np.asarray(diagonal.counts), 0.5), edges, fill=True, color=TOP)
    axis.set_yscale("log")
    axis.set_ylim(bottom=0.5)
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("diagonal entry")
    axis.set_ylabel("parameters (log scale)")
    axis.grid(alpha=0.3)
    return _png(figure)


#: Labels and colours of the predictors in the Uncertainty figures.
PREDICTORS = {
    "trained": ("trained model", MODEL),
    "laplace_evidence": ("Laplace, prior by evidence", BOTTOM),
    "laplace_validation": ("Laplace, prior by validation", TOP),
}


def evidence_figure(result: Any) -> bytes:
    """Log evidence and validation NLL over the prior precision, chosen priors marked."""
    figure, axis = plt.subplots(figsize=(7.0, 3.2))
    values = np.asarray(result.log_evidence, dtype=float)
    axis.plot(result.prior_grid, values - np.nanmax(values), color=BOTTOM, marker=".")
    axis.set_xscale("log")
    axis.set_yscale("symlog", linthresh=1.0)  # the optimum linear, the steep sides compressed
    axis.set_ylim(top=0.5)
    axis.axvline(result.prior_evidence, color=BOTTOM, linestyle="--", label="max evidence")
    axis.set_xlabel("prior precision δ")
    axis.set_ylabel("log evidence − its maximum", color=BOTTOM)
    other = axis.twinx()
    other.semilogx(result.prior_grid, result.validation_nll, color=TOP, marker=".")
    other.axvline(result.prior_validation, color=TOP, linestyle=":", label="min validation NLL")
    other.set_ylabel("validation NLL (probit)", color=TOP)
    lines = axis.get_legend_handles_labels()
    more = other.get_legend_handles_labels()
    axis.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    axis.grid(alpha=0.3)
    return _png(figure)


def reliability_figure(result: Any) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, for each predictor."""
    figure, axis = plt.subplots(figsize=(5.2, 4.4))
    axis.plot([0, 1], [0, 1], color="#bbbbbb", linestyle=":", label="perfect calibration")
    for key, (label, color) in PREDICTORS.items():
        found = result.metrics[key]
        pairs = [
            (conf, acc)
            for conf, acc in zip(found["bin_confidence"], found["bin_accuracy"], strict=True)
            if conf is not None
        ]
        if pairs:
            conf, acc = zip(*pairs, strict=True)
            text = f"{label} (NLL {found['nll']:.3g}, ECE {found['ece']:.3g})"
            axis.plot(conf, acc, color=color, marker="o", label=text)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("confidence")
    axis.set_ylabel("accuracy")
    axis.legend(loc="upper left", fontsize=7)
    axis.grid(alpha=0.3)
    return _png(figure)
