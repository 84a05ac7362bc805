"""The sharpness-against-step figure of ``SharpnessTracker.plot`` and ``curvscope track``.

Draws only: every number comes from the tracker's records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

SHARPNESS, THRESHOLD, TRACE = "#1f77b4", "#d62728", "#2ca02c"


def sharpness_figure(
    records: Sequence[Any], *, lr: float | None = None, losses: Sequence[tuple] | None = None
) -> Any:
    """Sharpness (with residual bars) against the step; the 2/lr line; optional loss panel."""
    panels = 2 if losses else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.0), squeeze=False)
    ax = axes[0, 0]
    steps = [r.step for r in records]
    top = [float(r.eigenvalues[0]) for r in records]
    errors = [float(r.residual_norms[0]) for r in records]
    ax.errorbar(steps, top, yerr=errors, color=SHARPNESS, marker=".", lw=1.2, label="λ_max(H)")
    for j in range(1, min(len(records[0].eigenvalues), 6) if records else 1):
        ax.plot(
            steps,
            [float(r.eigenvalues[j]) for r in records],
            color=SHARPNESS,
            lw=0.6,
            alpha=0.5,
            label="next eigenvalues" if j == 1 else None,
        )
    if lr is not None:
        ax.axhline(2.0 / lr, color=THRESHOLD, ls="--", lw=1.2, label=f"2/η = {2.0 / lr:.3g}")
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness")
    ax.set_title("Sharpness during training")
    ax.legend(loc="best", fontsize=8)
    if losses:
        right = axes[0, 1]
        right.plot([s for s, _ in losses], [v for _, v in losses], color="#444444", lw=1.2)
        right.set_xlabel("step")
        right.set_ylabel("training loss")
        right.set_yscale("log")
        right.set_title("Training loss")
    figure.tight_layout()
    return figure
