"""``curvscope track``'s computation and report: full-batch training with a SharpnessTracker.

``train_and_track`` trains a model by full-batch gradient descent and records the sharpness;
``TrackReport.save`` writes ``index.html`` (self-contained), ``results.json`` and
``sharpness.png`` atomically, like ``Report.save``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._progress import progress_bar
from ..operators.data import model_arguments
from ..tracking import SharpnessRecord, SharpnessTracker
from ._save import save_report

SCHEMA_VERSION = 1
OPTIMIZERS = {"gd": 0.0, "momentum": 0.9}  # heavy-ball coefficient β


@dataclass
class TrackReport:
    """A sharpness trajectory and the training run behind it (see ``train_and_track``)."""

    model: str
    optimizer: str
    lr: float
    steps: int
    every: int
    num_params: int
    num_examples: int
    records: list[SharpnessRecord]
    losses: list[float]
    seconds: float
    status: str = "completed"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        """The stability threshold of the quadratic model: 2/η for GD, (2 + 2β)/η with
        heavy-ball momentum β (Cohen et al., 2021)."""
        return (2.0 + 2.0 * OPTIMIZERS[self.optimizer]) / self.lr

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready results; ``steps`` and ``sharpness`` are aligned lists."""
        sharpness = [r.sharpness for r in self.records]
        tail = sharpness[len(sharpness) * 3 // 4 :] or sharpness
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "track",
            "model": self.model,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "threshold": self.threshold,
            "num_steps": self.steps,
            "every": self.every,
            "num_params": self.num_params,
            "num_examples": self.num_examples,
            "status": self.status,
            "dtype": self.dtype,
            "seconds": self.seconds,
            "steps": [r.step for r in self.records],
            "sharpness": sharpness,
            "eigenvalues": [r.eigenvalues.tolist() for r in self.records],
            "residual_norms": [r.residual_norms.tolist() for r in self.records],
            "num_matvecs": [r.num_matvecs for r in self.records],
            "total_matvecs": sum(r.num_matvecs for r in self.records),
            "max_sharpness": max(sharpness) if sharpness else None,
            "late_sharpness_over_threshold": (sum(tail) / len(tail) / self.threshold)
            if tail
            else None,
            "losses": [v if math.isfinite(v) else None for v in self.losses],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def figure(self) -> Any:
        from .tracking_plots import sharpness_figure

        losses = list(enumerate(self.losses))
        figure = sharpness_figure(self.records, lr=None, losses=losses)
        ax = figure.axes[0]
        label = "2/η" if self.optimizer == "gd" else "(2 + 2β)/η"
        ax.axhline(self.threshold, color="#d62728", ls="--", lw=1.2, label=label)
        ax.legend(loc="best", fontsize=8)
        return figure

    def save(self, directory: str | Path) -> Path:
        """Write ``index.html``, ``results.json`` and ``sharpness.png``, atomically."""
        from .html import render_track_html

        return save_report(
            directory,
            figures=self._figures,
            to_json=self.to_json,
            to_html=lambda figures: render_track_html(self, figures),
        )

    def _figures(self) -> dict[str, bytes]:
        import io

        import matplotlib.pyplot as plt

        figure = self.figure()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        return {"sharpness.png": buffer.getvalue()}


def _full_batch_loss(model: nn.Module, loss_fn: Callable, data: Sequence, total: int) -> float:
    """Accumulate the gradient of the mean loss over all batches; return that loss."""
    value = 0.0
    for inputs, targets in data:
        args, kwargs = model_arguments(inputs)
        weight = len(targets) / total if getattr(loss_fn, "reduction", "mean") == "mean" else 1
        loss = loss_fn(model(*args, **kwargs), targets) * weight
        loss.backward()
        value += float(loss.detach())
    return value


def train_and_track(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Sequence[tuple[Any, Any]],
    *,
    lr: float,
    steps: int,
    every: int,
    optimizer: str = "gd",
    k: int = 1,
    seed: int = 0,
    progress: bool = False,
    name: str = "model",
) -> TrackReport:
    """Full-batch gradient descent (or heavy ball) on ``data``; sharpness every ``every`` steps.

    Stops early (status ``"diverged"``) if the loss becomes non-finite.
    """
    total = sum(len(targets) for _, targets in data)
    momentum = OPTIMIZERS[optimizer]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    tracker = SharpnessTracker(model, loss_fn, data, k=k, every=every, seed=seed)
    losses: list[float] = []
    status, start, sharpness = "completed", time.perf_counter(), None
    with progress_bar(progress, "training + sharpness", steps + 1, unit="steps") as bar:
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            losses.append(_full_batch_loss(model, loss_fn, data, total))
            if not math.isfinite(losses[-1]):
                status = "diverged"
                break
            record = tracker.update(step)
            if step < steps:
                opt.step()
            sharpness = sharpness if record is None else record.sharpness
            bar.update(step + 1, loss=losses[-1], sharpness=sharpness)
    model.zero_grad(set_to_none=True)
    return TrackReport(
        model=name,
        optimizer=optimizer,
        lr=lr,
        steps=steps,
        every=every,
        num_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        num_examples=total,
        records=tracker.history,
        losses=losses,
        seconds=time.perf_counter() - start,
        status=status,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
