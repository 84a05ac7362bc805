"""The pruning report: accuracy against sparsity per method, as HTML, JSON and a PNG.

``PruneReport`` wraps a :class:`curvscope.PruneSweep` (computed in ``curvscope.prune``); this
module only draws, renders and saves it, atomically like the analysis report.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._save import save_report
from .result import to_jsonable

#: Bumped whenever a key of ``PruneReport.to_dict()`` changes meaning or disappears.
SCHEMA_VERSION = 1
FIGURE = "accuracy_vs_sparsity.png"


@dataclass(frozen=True)
class PruneReport:
    """A sweep with what the page says about it: a title and the data's description."""

    sweep: Any
    title: str
    data: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the dense numbers and accuracy and loss per method × sparsity."""
        out = {"schema_version": SCHEMA_VERSION, "title": self.title, "data": self.data}
        out.update(to_jsonable(self.sweep.to_dict()))
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def figures(self) -> dict[str, bytes]:
        """The figure as PNG bytes by file name (needs matplotlib)."""
        from .prune_plots import accuracy_figure

        return {FIGURE: accuracy_figure(self.sweep)}

    def to_html(self, *, figures: dict[str, bytes] | None = None) -> str:
        """The self-contained page (the image inline as base64 PNG; needs jinja2)."""
        from .html import _ENVIRONMENT

        figures = self.figures() if figures is None else figures
        image = "data:image/png;base64," + base64.b64encode(figures[FIGURE]).decode()
        template = _ENVIRONMENT.get_template("prune.html")
        return template.render(r=self, s=self.sweep, image=image, table=self._layer_table())

    def _layer_table(self) -> dict[str, Any]:
        """Columns (method, sparsity) and rows (layer, achieved sparsity per column)."""
        columns = [(p.method, p.sparsity) for p in self.sweep.points]
        rows = [
            (name, [p.per_layer.get(name) for p in self.sweep.points]) for name in self.sweep.layers
        ]
        return {"columns": columns, "rows": rows}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``index.html``, ``results.json`` and the PNG into ``directory``, atomically
        (built beside it and moved into place with one rename; an existing one is replaced)."""
        return save_report(
            directory,
            figures=self.figures,
            to_json=self.to_json,
            to_html=lambda figures: self.to_html(figures=figures),
        )
