"""Issue 5: `curvscope analyze` on the built-in example, step by step, against PyHessian."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import curvscope
from curvscope.report.digits import digits_example

from . import peers
from .harness import Config, Table


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _cli_seconds() -> tuple[float | None, str]:
    exe = shutil.which("curvscope", path=os.path.dirname(sys.executable))
    if exe is None:
        return None, "no curvscope executable in this environment"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run(
            [exe, "analyze", "--out", os.path.join(tmp, "report"), "--quiet"],
            capture_output=True,
            text=True,
            check=False,
        )
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        return None, f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    return seconds, ""


def analyze_cases(cfg: Config) -> list[Table]:
    table = Table(
        "`curvscope analyze` on the built-in example (digits MLP, 2,410 parameters, 1,797 "
        "examples), split by step, and the same analysis by hand with PyHessian",
        ["tool / step", "wall time (s)", "products"],
    )
    (model, loss_fn, batches), train_s = _timed(digits_example)
    table.add("curvscope: training (digits_example)", train_s, "-")
    if not hasattr(curvscope, "analyze"):
        table.notes.append("curvscope.analyze is not implemented yet")
        return [table]
    report, total = _timed(lambda: curvscope.analyze(model, loss_fn, batches, progress=False))
    for step in report.steps:
        table.add(f"curvscope: {step.name}", step.seconds, step.num_matvecs)
    with tempfile.TemporaryDirectory() as tmp:
        _, render_s = _timed(lambda: report.save(os.path.join(tmp, "report")))
    table.add("curvscope: rendering (Report.save: plots, HTML, JSON)", render_s, "-")
    table.add("curvscope.analyze total (without training and rendering)", total, report.num_matvecs)
    cli_s, why = _cli_seconds()
    table.add(
        "`curvscope analyze --quiet` as a command (start-up, training, analysis, report)",
        cli_s if cli_s is not None else f"failed: {why}",
        "-",
    )
    if peers.runnable("PyHessian"):
        _pyhessian_rows(table, model, loss_fn, batches, report)
    return [table]


def _pyhessian_rows(table: Table, model, loss_fn, batches, report) -> None:
    from .models import Problem

    problem = Problem("digits MLP", model, loss_fn, batches)
    top_k = len(report.top.values)
    torch.manual_seed(0)
    obj = peers.pyhessian_loader(problem)
    counted = peers.Counted(obj.dataloader_hv_product, problem.num_params)
    obj.dataloader_hv_product = counted
    total, products = 0.0, 0
    steps = [
        (f"eigenvalues(top_n={top_k})", lambda: obj.eigenvalues(top_n=top_k)),
        ("trace() (defaults)", obj.trace),
        ("density() (defaults: iter=100, n_v=1)", obj.density),
    ]
    for label, fn in steps:
        before = counted.count
        with peers.torch_eig_shim():
            _, seconds = _timed(fn)
        table.add(f"PyHessian (dataloader mode): {label}", seconds, counted.count - before)
        total += seconds
        products += counted.count - before
    table.add("PyHessian total", total, products)
    table.notes.append(
        "PyHessian gives only the largest eigenvalues (no smallest ones, no error bars, no "
        "per-layer results, landscape or report), so its total covers less than curvscope's."
    )
    for p in model.parameters():
        p.grad = None


CASES = [
    ("analyze/report", "Issue 5: curvscope analyze", analyze_cases, False),
]
