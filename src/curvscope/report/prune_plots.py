"""The pruning report's figure: accuracy (and loss) against sparsity, one line per method.

Draws only: every number comes from the PruneSweep.
"""

from __future__ import annotations

from typing import Any

from .plots import _png, plt

COLORS = {"magnitude": "#7f7f7f", "obd": "#ff7f0e", "obs": "#1f77b4", "layer_obs": "#2ca02c"}
MARKERS = {"magnitude": "o", "obd": "s", "obs": "^", "layer_obs": "D"}


def _lines(sweep: Any) -> dict[str, list[Any]]:
    lines: dict[str, list[Any]] = {}
    for point in sweep.points:
        lines.setdefault(point.method, []).append(point)
    return {method: sorted(points, key=lambda p: p.sparsity) for method, points in lines.items()}


def accuracy_figure(sweep: Any) -> bytes:
    """Test accuracy (when known) and test loss against the achieved sparsity, per method."""
    has_accuracy = sweep.dense_test_accuracy is not None
    columns = 2 if has_accuracy else 1
    figure, axes = plt.subplots(1, columns, figsize=(4.6 * columns, 3.4))
    axes = list(axes) if has_accuracy else [axes]
    panels = [("test_accuracy", "test accuracy")] if has_accuracy else []
    panels.append(("test_loss", "test loss"))
    for axis, (key, label) in zip(axes, panels, strict=True):
        for method, points in _lines(sweep).items():
            axis.plot(
                [100 * p.achieved for p in points],
                [getattr(p, key) for p in points],
                color=COLORS.get(method),
                marker=MARKERS.get(method, "o"),
                label=method,
            )
        dense = sweep.dense_test_accuracy if key == "test_accuracy" else sweep.dense_test_loss
        axis.axhline(dense, color="black", linestyle=":", linewidth=1, label="dense")
        axis.set_xlabel("sparsity (%)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1].set_yscale("log")
    axes[0].legend(loc="lower left", fontsize=8)
    return _png(figure)
