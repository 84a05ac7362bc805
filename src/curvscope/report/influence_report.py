"""The influence report: which training examples helped and hurt some test predictions, and
which training examples look mislabelled. Everything is computed by
:class:`curvscope.InfluenceFunction`; this module only collects, saves and renders.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..influence import InfluenceFunction
from ..influence.gradients import eval_mode
from ._save import save_report
from .result import to_jsonable

#: Bumped whenever a key of ``InfluenceReport.to_dict()`` changes meaning or disappears.
SCHEMA_VERSION = 1
#: How many training examples the self-influence section lists.
SELF_INFLUENCE_SHOWN = 20


@dataclass(frozen=True)
class TrainingExample:
    """One training example in a list: its index, label, score and whether it was flipped."""

    index: int
    label: int | None
    score: float
    flipped: bool | None = None
    clean_label: int | None = None


@dataclass(frozen=True)
class TestExample:
    """One test example with its most helpful and most harmful training examples."""

    index: int
    label: int | None
    prediction: int | None
    loss: float
    helpful: list[TrainingExample]
    harmful: list[TrainingExample]


@dataclass(frozen=True)
class InfluenceReport:
    """What ``curvscope influence`` shows; ``to_dict()`` carries every number of the page.

    ``train_images``/``test_images`` (for the figures) are left out of the JSON.
    """

    model: str
    curvature: str
    solver: str
    damping: float
    num_params: int
    num_train: int
    seed: int
    seconds: float
    num_matvecs: int
    solver_status: dict[str, Any]  # SolveStatus.to_dict() of the scores and self-influence
    examples: list[TestExample]
    self_influence: list[TrainingExample]
    num_flipped: int | None = None
    flipped_found: list[int] | None = None  # flipped among the top-m by self-influence, m = 1..n
    flipped_auc: float | None = None
    train_images: torch.Tensor | None = field(default=None, repr=False)
    test_images: torch.Tensor | None = field(default=None, repr=False)
    schema_version: int = SCHEMA_VERSION

    def flipped_in_top(self, count: int) -> int | None:
        """How many of the ``count`` largest self-influences are flipped examples."""
        if self.flipped_found is None:
            return None
        return self.flipped_found[min(count, len(self.flipped_found)) - 1]

    def to_dict(self) -> dict[str, Any]:
        """Every number of the page, JSON-ready."""
        skip = {"train_images", "test_images"}
        out = {key: to_jsonable(value) for key, value in self.__dict__.items() if key not in skip}
        out["kind"] = "InfluenceReport"
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def figures(self) -> dict[str, bytes]:
        """The figures as PNG bytes, by file name (needs matplotlib)."""
        from .influence_plots import render_influence_figures

        return render_influence_figures(self)

    def to_html(self, *, figures: dict[str, bytes] | None = None) -> str:
        """The self-contained HTML page (images inline as base64 PNG; needs jinja2)."""
        from .html import _ENVIRONMENT

        figures = self.figures() if figures is None else figures
        images = {
            name.removesuffix(".png"): "data:image/png;base64," + base64.b64encode(png).decode()
            for name, png in figures.items()
        }
        template = _ENVIRONMENT.get_template("influence.html")
        return template.render(r=self, images=images)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``index.html``, ``results.json`` and the figures, atomically (like Report)."""
        return save_report(
            directory,
            figures=self.figures,
            to_json=self.to_json,
            to_html=lambda figures: self.to_html(figures=figures),
        )


def _batches(data: Any) -> list[tuple[Any, Any]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        return [(data[0], data[1])]
    return list(data)


def _labels(data: Any) -> list[int] | None:
    """Class labels when the targets are 1-D integer tensors, else None."""
    targets = [targets for _, targets in _batches(data)]
    if not all(t.ndim == 1 and not t.is_floating_point() for t in targets):
        return None
    return torch.cat(targets).tolist()


def _inputs(data: Any) -> torch.Tensor | None:
    inputs = [inputs for inputs, _ in _batches(data)]
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        return None
    return torch.cat([x.detach().to("cpu") for x in inputs])


def _predictions(model: nn.Module, loss_fn: Callable, data: Any) -> tuple[list, list]:
    """Per-example losses (``loss_fn`` on a batch of one) and class predictions (or None)."""
    losses, predictions = [], []
    with torch.no_grad(), eval_mode(model):
        for inputs, targets in _batches(data):
            output = model(inputs)
            for index in range(len(targets)):
                losses.append(float(loss_fn(output[index : index + 1], targets[index : index + 1])))
                is_class = output.ndim == 2 and output.shape[1] > 1
                predictions.append(int(output[index].argmax()) if is_class else None)
    return losses, predictions


def _training_list(indices, scores, labels, flipped, clean) -> list[TrainingExample]:
    out = []
    for index, score in zip(indices.tolist(), scores.tolist(), strict=True):
        out.append(
            TrainingExample(
                index=index,
                label=None if labels is None else labels[index],
                score=float(score),
                flipped=None if flipped is None else index in flipped,
                clean_label=None if clean is None else int(clean[index]),
            )
        )
    return out


def _auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive`` (Mann-Whitney U, ties averaged)."""
    ranks = torch.empty_like(scores, dtype=torch.float64)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique():  # average the ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    count = int(positive.sum())
    u = float(ranks[positive].sum()) - count * (count + 1) / 2
    return u / (count * (len(scores) - count))


def influence_report(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    train_data: Any,
    test_data: Any,
    *,
    curvature: str = "ggn",
    solver: str = "auto",
    damping: float | None = None,
    params: Sequence[str] | None = None,
    top: int = 5,
    flipped: torch.Tensor | None = None,
    clean_labels: torch.Tensor | None = None,
    max_batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> InfluenceReport:
    """Explain the predictions on ``test_data`` by the training data, and rank the training
    data by self-influence (the usual mislabel score); see :class:`InfluenceFunction`.

    Args:
        flipped: indices of training examples known to be mislabelled (the built-in example),
            to count how many the self-influence ranking finds.
        clean_labels: the training labels before flipping, shown beside the flipped ones.
        The other arguments are those of InfluenceFunction and ``top`` (k of ``.top``).
    """
    start = time.perf_counter()
    influence = InfluenceFunction(
        model, loss_fn, train_data, curvature=curvature, solver=solver, damping=damping,
        params=params, max_batch_size=max_batch_size, seed=seed, progress=progress,
    )  # fmt: skip
    best = influence.top(test_data, k=min(top, influence.num_train))
    statuses = {"scores": influence.solver_status.to_dict()}
    self_scores = influence.self_influence()
    statuses["self_influence"] = influence.solver_status.to_dict()
    seconds = time.perf_counter() - start
    labels, test_labels = _labels(train_data), _labels(test_data)
    flips = None if flipped is None else set(flipped.tolist())
    losses, predictions = _predictions(model, loss_fn, test_data)
    examples = []
    for row, loss in enumerate(losses):
        examples.append(
            TestExample(
                index=row,
                label=None if test_labels is None else test_labels[row],
                prediction=predictions[row],
                loss=loss,
                helpful=_training_list(
                    best.helpful_indices[row], best.helpful_scores[row], labels, flips, clean_labels
                ),
                harmful=_training_list(
                    best.harmful_indices[row], best.harmful_scores[row], labels, flips, clean_labels
                ),
            )
        )
    ranking = self_scores.argsort(descending=True).cpu()
    shown = ranking[: min(SELF_INFLUENCE_SHOWN, len(ranking))]
    found, auc = None, None
    if flipped is not None and 0 < len(flips) < len(ranking):
        is_flipped = torch.zeros(len(ranking), dtype=torch.bool)
        is_flipped[flipped.cpu()] = True
        found = torch.cumsum(is_flipped[ranking].long(), 0).tolist()
        auc = _auc(self_scores.detach().cpu().double(), is_flipped)
    return InfluenceReport(
        model=type(model).__name__,
        curvature=influence.curvature,
        solver=influence.solver,
        damping=influence.damping,
        num_params=influence.num_params,
        num_train=influence.num_train,
        seed=seed,
        seconds=seconds,
        num_matvecs=influence.num_matvecs,
        solver_status=statuses,
        examples=examples,
        self_influence=_training_list(shown, self_scores.cpu()[shown], labels, flips, clean_labels),
        num_flipped=None if flips is None else len(flips),
        flipped_found=found,
        flipped_auc=auc,
        train_images=_inputs(train_data),
        test_images=_inputs(test_data),
    )
