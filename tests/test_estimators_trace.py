"""curvscope.trace: exact method, accuracy and honest confidence intervals."""

import numpy as np
import pytest
import torch
from models import MODEL_CASES, case_id

import curvscope


def matrix_with_spectrum(values, seed=0):
    values = np.asarray(values, dtype=np.float64)
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(values),) * 2))
    matrix = (basis * values) @ basis.T
    return torch.as_tensor((matrix + matrix.T) / 2)


rng = np.random.default_rng(2)
SPIKED = np.r_[[50.0, 40.0, 30.0, 20.0], rng.uniform(0, 1, 56)]
FLAT = rng.uniform(1, 2, 60)


def test_exact_is_exact():
    matrix = matrix_with_spectrum(SPIKED)
    result = curvscope.trace(curvscope.DenseOperator(matrix), method="exact")
    assert result.value == pytest.approx(SPIKED.sum(), rel=1e-12)
    assert result.std_error == 0 and result.ci_low == result.ci_high == result.value
    assert result.num_matvecs == 60


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("spectrum", [SPIKED, FLAT], ids=["spiked", "flat"])
def test_confidence_interval_coverage(method, spectrum):
    op = curvscope.DenseOperator(matrix_with_spectrum(spectrum))
    true = spectrum.sum()
    covered = 0
    for seed in range(200):
        result = curvscope.trace(op, method=method, num_matvecs=30, seed=seed)
        covered += result.ci_low <= true <= result.ci_high
        assert result.num_matvecs == 30
    assert 0.90 <= covered / 200 <= 0.99


def test_deflated_methods_beat_hutchinson_on_spiked_spectra():
    eigs = np.r_[100.0 / np.arange(1, 21) ** 1.5, rng.uniform(0, 0.05, 180)]
    op = curvscope.DenseOperator(matrix_with_spectrum(eigs))
    errors = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        values = [
            curvscope.trace(op, method=method, num_matvecs=60, seed=s).value for s in range(10)
        ]
        errors[method] = np.median(np.abs(np.array(values) - eigs.sum()))
    assert errors["hutch++"] < errors["hutchinson"] / 5
    assert errors["xtrace"] < errors["hutchinson"] / 5


def test_low_rank_is_exact_for_deflated_methods():
    eigs = np.r_[[5.0, 3.0, -2.0], np.zeros(37)]
    op = curvscope.DenseOperator(matrix_with_spectrum(eigs))
    for method in ("hutch++", "xtrace"):
        result = curvscope.trace(op, method=method, num_matvecs=30)
        assert result.value == pytest.approx(6.0, abs=1e-9)


def test_deterministic_rng_untouched_operator_untouched():
    matrix = matrix_with_spectrum(FLAT)
    op = curvscope.DenseOperator(matrix.clone())
    state = torch.random.get_rng_state()
    first = curvscope.trace(op, method="xtrace", num_matvecs=20, seed=3)
    second = curvscope.trace(
        op, method="xtrace", num_matvecs=20, seed=torch.Generator().manual_seed(3)
    )
    assert first == second or first.to_dict() == second.to_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(op.to_dense(), matrix)
    assert op.num_matvecs == 40


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_model_hessian_traces(make_case):
    case = make_case()
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    true = float(op.to_dense().trace())
    assert curvscope.trace(op, method="exact").value == pytest.approx(true, rel=1e-10, abs=1e-10)
    estimate = curvscope.trace(op, method="hutch++", num_matvecs=30, confidence=0.999)
    assert estimate.ci_low <= true <= estimate.ci_high
