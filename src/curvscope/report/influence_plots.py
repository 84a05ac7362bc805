"""The influence report's figures. Draws only: every number comes from the InfluenceReport.

Images are drawn when the inputs look like images: per example a tensor of shape (H, W),
(1, H, W), (3, H, W), or a flat vector whose length is a square (the 8x8 digits).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .plots import BOTTOM, RANDOM, TOP, _png, plt


def as_images(inputs: Any) -> np.ndarray | None:
    """(n, H, W) or (n, H, W, 3) arrays in [0, 1] for display, or None if not images."""
    if inputs is None or inputs.ndim < 2:
        return None
    array = inputs.detach().to("cpu").float().numpy()
    if array.ndim == 2:
        side = math.isqrt(array.shape[1])
        if side < 4 or side * side != array.shape[1]:
            return None
        array = array.reshape(-1, side, side)
    elif array.ndim == 4 and array.shape[1] in (1, 3):
        array = array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
    elif array.ndim != 3:
        return None
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def render_influence_figures(report: Any) -> dict[str, bytes]:
    """All figures of ``report`` as PNG bytes, by file name."""
    figures = {"scores.png": histogram_figure(report)}
    train, test = as_images(report.train_images), as_images(report.test_images)
    if train is not None and test is not None and report.examples:
        figures["examples.png"] = examples_figure(report, train, test)
    if train is not None and report.self_influence:
        figures["self_influence.png"] = self_influence_figure(report, train)
    if report.flipped_found is not None:
        figures["flipped_found.png"] = flipped_found_figure(report)
    return figures


def _show(axis: Any, image: np.ndarray, title: str, color: str = "black") -> None:
    axis.imshow(image, cmap="gray_r" if image.ndim == 2 else None, vmin=0.0, vmax=1.0)
    axis.set_title(title, fontsize=7, color=color)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(2.0 if color != "black" else 0.5)


def _caption(example: Any) -> str:
    label = "" if example.label is None else f"{example.label}"
    if example.flipped:
        label += f" (was {example.clean_label})"
    return f"#{example.index} {label}\n{example.score:+.2g}"


def examples_figure(report: Any, train: np.ndarray, test: np.ndarray) -> bytes:
    """One row per test example: the test image, its k most helpful and k most harmful."""
    rows, k = len(report.examples), len(report.examples[0].helpful)
    columns = 2 * k + 2
    size = (1.2 * columns, 1.3 * rows + 0.4)
    figure, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    for row, example in enumerate(report.examples):
        predicted = "" if example.prediction is None else f", pred {example.prediction}"
        _show(axes[row, 0], test[example.index], f"test {example.label}{predicted}", "#333333")
        axes[row, 1].axis("off")
        for column, item in enumerate(example.helpful):
            color = BOTTOM if item.flipped else TOP
            _show(axes[row, 2 + column], train[item.index], _caption(item), color)
        for column, item in enumerate(example.harmful):
            color = BOTTOM if item.flipped else RANDOM
            _show(axes[row, 2 + k + column], train[item.index], _caption(item), color)
    figure.suptitle(
        f"test example | its {k} most helpful training examples (blue) | its {k} most harmful "
        "(green); red: a flipped label",
        fontsize=9,
    )
    return _png(figure)


def self_influence_figure(report: Any, train: np.ndarray) -> bytes:
    """The training examples with the largest self-influence, flipped ones framed in red."""
    items = report.self_influence
    columns = min(10, len(items))
    rows = math.ceil(len(items) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for position, item in enumerate(items):
        axis = axes.flat[position]
        axis.axis("on")
        _show(axis, train[item.index], _caption(item), BOTTOM if item.flipped else "black")
    return _png(figure)


def flipped_found_figure(report: Any) -> bytes:
    """Flipped examples found against examples inspected, in self-influence order."""
    found = np.asarray(report.flipped_found, dtype=float)
    inspected = np.arange(1, len(found) + 1)
    total, n = report.num_flipped, len(found)
    figure, axis = plt.subplots(figsize=(6.0, 3.2))
    label = f"by self-influence (AUC {report.flipped_auc:.3f})"
    axis.plot(inspected, found, color=TOP, label=label)
    axis.plot(inspected, inspected * total / n, color="#888888", linestyle="--", label="random")
    axis.plot(inspected, np.minimum(inspected, total), color=RANDOM, linestyle=":", label="best")
    axis.set_xlabel("training examples inspected (largest self-influence first)")
    axis.set_ylabel("flipped labels found")
    axis.set_xlim(0, min(n, 4 * total))
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    return _png(figure)


def histogram_figure(report: Any) -> bytes:
    """Histograms of the most helpful and most harmful scores of the test examples."""
    figure, axis = plt.subplots(figsize=(6.0, 3.0))
    helpful = [item.score for ex in report.examples for item in ex.helpful]
    harmful = [item.score for ex in report.examples for item in ex.harmful]
    bins = 30
    if helpful:
        axis.hist(helpful, bins=bins, color=TOP, alpha=0.7, label="most helpful scores")
    if harmful:
        axis.hist(harmful, bins=bins, color=RANDOM, alpha=0.7, label="most harmful scores")
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_xlabel("score (predicted change of the test loss when removed)")
    axis.set_ylabel("count")
    axis.legend(loc="upper right")
    axis.grid(alpha=0.3)
    return _png(figure)
