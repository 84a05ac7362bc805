"""Render a Report as one self-contained HTML page (jinja2; images inline as base64 PNG)."""

from __future__ import annotations

import base64
from typing import Any

import jinja2

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("curvscope.report", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _number(value: Any, digits: int = 4) -> str:
    """Format a number for the page: 4 significant digits, '—' for missing."""
    if value is None:
        return "—"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{float(value):.{digits}g}"


_ENVIRONMENT.filters["num"] = _number


def render_html(report: Any, figures: dict[str, bytes], standalone: bool = True) -> str:
    """The HTML page for ``report`` with ``figures`` (PNG bytes by file name) inline.

    Args:
        report: a :class:`curvscope.Report`.
        figures: PNG bytes by file name, as from ``report.figures()``.
        standalone: a full ``<html>`` document (True) or a fragment for notebooks (False).

    Returns:
        The page as a string; it needs no network access.
    """
    images = {
        name.removesuffix(".png"): "data:image/png;base64," + base64.b64encode(png).decode()
        for name, png in figures.items()
    }
    template = _ENVIRONMENT.get_template("report.html")
    return template.render(r=report, images=images, standalone=standalone, rows=_summary(report))


def _summary(report: Any) -> list[tuple[str, str]]:
    """The summary table rows (label, formatted value)."""
    top = [float(x) for x in report.top.values]
    rows = [
        ("model", f"{report.model} — {report.num_params:,} parameters analysed"),
        ("data", f"{report.num_examples:,} examples"),
        ("curvature", f"{report.curvature} ({report.dtype}, {report.device})"),
        ("loss", _number(report.loss)),
        ("gradient norm", _number(report.gradient_norm)),
        (
            "largest eigenvalue",
            f"{_number(max(top))} (residual {_number(float(report.top.residual_norms[0]), 2)})",
        ),
    ]
    if report.bottom is not None:
        values = [float(x) for x in report.bottom.values]
        index = min(range(len(values)), key=lambda i: values[i])
        residual = float(report.bottom.residual_norms[index])
        rows.append(
            (
                "most negative eigenvalue",
                f"{_number(values[index])} (residual {_number(residual, 2)})",
            )
        )
    trace = report.trace
    rows.append(
        (
            "trace",
            f"{_number(trace.value)}, interval [{_number(trace.ci_low)}, {_number(trace.ci_high)}]",
        )
    )
    rows.append(("time and products", f"{report.seconds:.2f} s, {report.num_matvecs:,} products"))
    return rows


def render_track_html(report: Any, figures: dict[str, bytes]) -> str:
    """The self-contained HTML page of a ``curvscope track`` run (images inline)."""
    images = {
        name.removesuffix(".png"): "data:image/png;base64," + base64.b64encode(png).decode()
        for name, png in figures.items()
    }
    results = report.to_dict()
    late = results["late_sharpness_over_threshold"]
    rows = [
        ("model", f"{report.model} — {report.num_params:,} parameters"),
        ("data", f"{report.num_examples:,} examples (full batch)"),
        ("optimizer", f"{report.optimizer}, learning rate η = {_number(report.lr)}"),
        ("stability threshold", f"{_number(report.threshold)}"),
        ("steps", f"{report.steps:,} ({report.status}), sharpness every {report.every}"),
        ("loss", f"{_number(report.losses[0])} → {_number(report.losses[-1])}"),
        ("largest sharpness", _number(results["max_sharpness"])),
        ("late sharpness / threshold", _number(late, 3)),
        ("time and products", f"{report.seconds:.2f} s, {results['total_matvecs']:,} products"),
    ]
    template = _ENVIRONMENT.get_template("track.html")
    return template.render(r=report, images=images, rows=rows)
