"""The one progress helper (curvscope._progress) and every public entry point that uses it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import user_model

import curvscope
from curvscope._progress import Display, progress_bar

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def terminal(monkeypatch):
    """Make rich treat the captured stderr as a terminal, so transient bars are drawn."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")


def test_disabled_bar_does_nothing(capfd):
    with progress_bar(False, "trace", 10, unit="products") as bar:
        bar.update(3, std_error=0.1)
        bar.advance()
        bar()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_bar_shows_description_count_unit_and_fields(capsys):
    with progress_bar(True, "solve", 10, unit="products", transient=False) as bar:
        bar.update(4, residual=0.000123, note=None, method="cg")
    captured = capsys.readouterr()
    assert captured.out == ""
    for text in ("solve", "4/10", "products", "residual 0.000123", "method cg"):
        assert text in captured.err
    assert "note" not in captured.err


def test_bar_never_passes_its_total(capsys):
    with progress_bar(True, "x", 5, transient=False) as bar:
        bar.update(9)
        bar.advance(3)
    err = capsys.readouterr().err
    assert "5/5" in err and "9/5" not in err


def test_display_holds_several_bars_and_removes_one(capsys):
    with Display(True, eta=True, transient=False) as display:
        outer = display.add("outer", 2)
        inner = display.add("inner part", 3)
        inner.advance(3)
        display.remove(inner)
        inner.advance()  # a removed bar does nothing
        outer.update(1, description="outer renamed")
    err = capsys.readouterr().err
    assert "outer renamed" in err and "1/2" in err and "eta" in err and "inner part" not in err


def _case():
    return user_model.build_model(), torch.nn.CrossEntropyLoss(), user_model.build_data()


def _operator(kind, progress):
    model, loss_fn, data = _case()
    op = getattr(curvscope, kind)(model, loss_fn, data, progress=progress)
    return op @ torch.ones(op.shape[0], dtype=torch.float64)


def _estimator(name, progress):
    op = curvscope.DenseOperator(torch.diag(torch.linspace(-1.0, 3.0, 20, dtype=torch.float64)))
    calls = {
        "eigenvalues": lambda: curvscope.eigenvalues(op, k=1, progress=progress),
        "trace": lambda: curvscope.trace(op, num_matvecs=6, progress=progress),
        "solve": lambda: curvscope.solve(op, torch.ones(20), damping=2.0, progress=progress),
        "frobenius norm": lambda: curvscope.frobenius_norm(op, progress=progress),
        "diagonal": lambda: curvscope.diagonal(op, num_matvecs=4, progress=progress),
        "spectral density": lambda: curvscope.spectral_density(
            op, num_probes=2, lanczos_steps=5, progress=progress
        ),
    }
    return calls[name]()


def _analyze(progress):
    model, loss_fn, data = _case()
    return curvscope.analyze(
        model, loss_fn, data, top_k=2, bottom_k=1, trace_matvecs=6, density=False,
        landscape=False, progress=progress,
    )  # fmt: skip


ENTRY_POINTS = {
    **{
        kind: (lambda progress, kind=kind: _operator(kind, progress), f"{kind} product")
        for kind in ("HessianOperator", "GGNOperator", "FisherOperator")
    },
    **{
        name: (lambda progress, name=name: _estimator(name, progress), name)
        for name in ("eigenvalues", "trace", "solve", "frobenius norm", "diagonal")
    },
    "spectral density": (lambda progress: _estimator("spectral density", progress), "density"),
    "analyze": (_analyze, "curvscope: "),
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_entry_point_shows_a_bar_on_stderr_only_when_asked(name, capfd, terminal):
    call, text = ENTRY_POINTS[name]
    call(False)
    quiet = capfd.readouterr()
    assert quiet.err == "" and quiet.out == ""
    call(True)
    shown = capfd.readouterr()
    assert text in shown.err and shown.out == ""


def test_operator_bar_only_on_the_main_process(capfd, terminal, monkeypatch):
    monkeypatch.setattr("curvscope.operators._pass.is_main_process", lambda: False)
    _operator("HessianOperator", True)
    assert capfd.readouterr().err == ""


def test_rich_is_imported_only_when_a_bar_is_shown():
    script = (
        "import sys, torch, curvscope\n"
        "op = curvscope.DenseOperator(torch.eye(3, dtype=torch.float64))\n"
        "curvscope.trace(op, progress=False)\n"
        "print('rich' in sys.modules)\n"
        "curvscope.trace(op, progress=True)\n"
        "print('rich' in sys.modules)\n"
    )
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert out == ["False", "True"]
