"""The analysis report: frozen result objects, JSON, atomic saving and notebook display.

A ``Report`` holds every result object of :func:`curvscope.analyze` (the estimators' own results
for eigenvalues, trace, diagonal and spectral density, plus the per-layer, landscape and timing
summaries defined here). ``Report.to_dict()`` is JSON-ready and carries every number the HTML
page shows; ``Report.save(directory)`` writes ``index.html``, ``results.json`` and the figures as
PNG files, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ._save import save_report

#: Bumped whenever a key of ``Report.to_dict()`` changes meaning or disappears.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Step:
    """One timed step of the analysis: wall-clock seconds and curvature products used."""

    name: str
    seconds: float
    num_matvecs: int
    num_loss_evaluations: int = 0


@dataclass(frozen=True)
class LayerResult:
    """The diagonal block of one parameter-owning module: top eigenvalue, trace, diagonal.

    ``top_eigenvalue`` and ``trace`` are the estimators' own result objects for the block.
    """

    name: str
    param_names: tuple[str, ...]
    num_params: int
    top_eigenvalue: Any
    trace: Any
    diagonal_mean: float
    diagonal_abs_max: float


@dataclass(frozen=True)
class DiagonalSummary:
    """Statistics of the estimated curvature diagonal, and its histogram.

    ``estimate`` is the estimator's result (values of shape (P,)); the histogram has
    ``len(edges) == len(counts) + 1``.
    """

    estimate: Any
    mean: float
    std: float
    minimum: float
    median: float
    maximum: float
    fraction_negative: float
    edges: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class DensityCurve:
    """The smoothed spectral density evaluated on a grid (what the density plot draws)."""

    grid: tuple[float, ...]
    values: tuple[float, ...]
    sigma: float
    fraction_negative: float


@dataclass(frozen=True)
class LandscapeLine:
    """Loss along ``theta + t * v`` for a unit direction ``v``, and its quadratic model.

    quadratic(t) = loss(0) + slope * t + curvature * t**2 / 2, slope = g^T v, curvature = v^T A v.
    ``quadratic_radius`` is the largest |t| up to which the model stays within 10% of the loss
    change.
    """

    direction: str
    t: tuple[float, ...]
    loss: tuple[float, ...]
    quadratic: tuple[float, ...]
    slope: float
    curvature: float
    quadratic_radius: float


@dataclass(frozen=True)
class LandscapeGrid:
    """Loss on ``theta + a v1 + b v2`` over the top two eigenvectors, and its quadratic model.

    ``loss[i][j]`` is at ``(a[i], b[j])``.
    """

    a: tuple[float, ...]
    b: tuple[float, ...]
    loss: tuple[tuple[float, ...], ...]
    quadratic: tuple[tuple[float, ...], ...]
    curvatures: tuple[float, float]


@dataclass(frozen=True)
class Landscape:
    """1-D slices along the top eigenvector and a random direction, and the 2-D grid."""

    radius: float
    top: LandscapeLine
    random: LandscapeLine
    grid: LandscapeGrid | None
    num_loss_evaluations: int


@dataclass(frozen=True)
class Report:
    """Everything :func:`curvscope.analyze` found, with JSON export, saving and HTML display.

    ``top`` and ``bottom`` are ``EigenResult`` objects (largest and smallest eigenvalues),
    ``trace`` a ``TraceEstimate``, ``density`` a ``SpectralDensity`` (or None), ``diagonal`` a
    :class:`DiagonalSummary` wrapping a ``DiagonalEstimate``, ``uncertainty`` an
    ``UncertaintyResult`` (or None: no held-out data, not a classification loss, or turned off).
    """

    schema_version: ClassVar[int] = SCHEMA_VERSION

    model: str
    num_params: int
    num_examples: int
    curvature: str
    dtype: str
    device: str
    param_names: tuple[str, ...]
    seed: int
    settings: dict[str, Any]
    loss: float
    gradient_norm: float
    top: Any
    bottom: Any | None
    trace: Any
    density: Any | None
    density_curve: DensityCurve | None
    layers: tuple[LayerResult, ...]
    diagonal: DiagonalSummary | None
    landscape: Landscape | None
    steps: tuple[Step, ...]
    interpretation: dict[str, str] = field(default_factory=dict)
    uncertainty: Any | None = None

    @property
    def seconds(self) -> float:
        """Total wall-clock seconds of the analysis."""
        return float(sum(step.seconds for step in self.steps))

    @property
    def num_matvecs(self) -> int:
        """Total curvature-vector products of the analysis."""
        return int(sum(step.num_matvecs for step in self.steps))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every number in the report (eigenvectors left out).

        Non-finite floats become ``None``; tensors become lists.
        """
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for item in dataclasses.fields(self):
            out[item.name] = to_jsonable(getattr(self, item.name))
        out["seconds"] = self.seconds
        out["num_matvecs"] = self.num_matvecs
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """``to_dict()`` as strict JSON text."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def figures(self) -> dict[str, bytes]:
        """The report's figures as PNG bytes, by file name (needs matplotlib)."""
        from .plots import render_figures

        return render_figures(self)

    def to_html(self, *, figures: dict[str, bytes] | None = None, standalone: bool = True) -> str:
        """The self-contained HTML page (images inline as base64 PNG; needs jinja2)."""
        from .html import render_html

        return render_html(self, self.figures() if figures is None else figures, standalone)

    def _repr_html_(self) -> str:
        return self.to_html(standalone=False)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``index.html``, ``results.json`` and the PNG figures into ``directory``.

        The report is built in a temporary directory beside the target and moved into place
        with one rename, so a failed or interrupted save leaves no half-written report. An
        existing report directory is replaced.

        Args:
            directory: where the report goes (created; its parent must exist or is created).

        Returns:
            The report directory as a ``Path``.
        """
        return save_report(
            directory,
            figures=self.figures,
            to_json=self.to_json,
            to_html=lambda figures: self.to_html(figures=figures),
        )


def to_jsonable(value: Any) -> Any:
    """Convert results, dataclasses, tensors and arrays into JSON-ready Python values."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray | np.generic):
        return to_jsonable(value.tolist())
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items() if key != "vectors"}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return to_jsonable(value.to_dict())
    if dataclasses.is_dataclass(value):
        return {
            item.name: to_jsonable(getattr(value, item.name))
            for item in dataclasses.fields(value)
            if item.name != "vectors"
        }
    return str(value)
