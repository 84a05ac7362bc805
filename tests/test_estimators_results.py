"""Every estimator result is a frozen dataclass with num_matvecs and a JSON-ready to_dict."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import curvscope


def make_op():
    values = torch.linspace(-1.0, 3.0, 40, dtype=torch.float64)
    return curvscope.DenseOperator(torch.diag(values))


RESULTS = {
    "EigenResult": lambda op: curvscope.eigenvalues(op, k=2),
    "TraceEstimate": lambda op: curvscope.trace(op, num_matvecs=3),
    "DiagonalEstimate": lambda op: curvscope.diagonal(op, method="xdiag", num_matvecs=4),
    "SpectralDensity": lambda op: curvscope.spectral_density(op, num_probes=2, lanczos_steps=5),
    "FrobeniusNormEstimate": lambda op: curvscope.frobenius_norm(op, num_matvecs=4),
    "SolveResult": lambda op: curvscope.solve(op, torch.ones(40), damping=2.0),
}


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_frozen_counted_and_json_ready(name):
    op = make_op()
    result = RESULTS[name](op)
    assert type(result).__name__ == name and name in curvscope.__all__
    assert getattr(curvscope, name) is type(result)
    assert dataclasses.is_dataclass(result)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.num_matvecs = 0
    assert result.num_matvecs == op.num_matvecs > 0
    out = result.to_dict()
    assert out["kind"] == name and out["num_matvecs"] == result.num_matvecs
    json.dumps(out, allow_nan=False)


STATUSES = {
    "EigenResult": {"converged", "max_matvecs", "stagnated"},
    "SolveResult": {"converged", "max_matvecs", "not positive definite", "stagnated"},
    "TraceEstimate": {"exact", "estimated", "no_error_estimate"},
    "DiagonalEstimate": {"exact", "estimated", "no_error_estimate"},
    "SpectralDensity": {"exact", "estimated"},
    "FrobeniusNormEstimate": {"estimated", "no_error_estimate"},
}


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_every_result_carries_a_documented_status(name):
    result = RESULTS[name](make_op())
    assert result.status in STATUSES[name]
    assert result.to_dict()["status"] == result.status
    assert "status:" in type(result).__doc__


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        (lambda op: curvscope.trace(op, method="exact"), "exact"),
        (lambda op: curvscope.trace(op, method="hutchinson", num_matvecs=10), "estimated"),
        (lambda op: curvscope.trace(op, method="hutch++", num_matvecs=3), "no_error_estimate"),
        (lambda op: curvscope.diagonal(op, method="exact"), "exact"),
        (lambda op: curvscope.diagonal(op, num_matvecs=10), "estimated"),
        (lambda op: curvscope.spectral_density(op, num_probes=1, lanczos_steps=40), "exact"),
        (lambda op: curvscope.spectral_density(op, num_probes=2, lanczos_steps=5), "estimated"),
        (lambda op: curvscope.frobenius_norm(op, num_matvecs=4), "estimated"),
        (lambda op: curvscope.eigenvalues(op, k=2, tol=1e-8), "converged"),
        (lambda op: curvscope.eigenvalues(op, k=2, tol=1e-12, max_matvecs=3), "max_matvecs"),
    ],
)
def test_status_values(run, expected):
    assert run(make_op()).status == expected


def test_infinite_error_becomes_none():
    result = curvscope.trace(make_op(), method="hutch++", num_matvecs=3)
    assert result.std_error == float("inf") and result.to_dict()["std_error"] is None


def test_progress_bar_writes_to_stderr(capsys):
    op = make_op()
    curvscope.eigenvalues(op, k=1, progress=True)
    curvscope.trace(op, progress=True)
    curvscope.solve(op, torch.ones(40), damping=2.0, progress=True)
    curvscope.frobenius_norm(op, progress=True)
    curvscope.diagonal(op, num_matvecs=4, progress=True)
    curvscope.spectral_density(op, num_probes=2, lanczos_steps=5, progress=True)
    captured = capsys.readouterr()
    for name in ("frobenius norm", "diagonal", "spectral density", "trace", "solve"):
        assert name in captured.err
    assert captured.out == "" and "eigenvalues" in captured.err and "products" in captured.err


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_estimators_work_under_inference_mode(name):
    reference = RESULTS[name](make_op())
    with torch.inference_mode():
        inside = RESULTS[name](make_op())
        made_inside = make_op()
    outside = RESULTS[name](made_inside)  # an operator built under inference_mode, used after
    for result in (inside, outside):
        assert result.status == reference.status
        for key, value in reference.to_dict().items():
            got = result.to_dict()[key]
            if isinstance(value, (str, bool, dict)) or value is None:
                assert got == value, key
            else:
                np.testing.assert_allclose(
                    np.asarray(got, dtype=float), np.asarray(value, dtype=float), 1e-10, 1e-12
                )
