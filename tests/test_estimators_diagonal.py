"""curvscope.diagonal against the true diagonal."""

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


EIGS = np.r_[100.0 / np.arange(1, 11) ** 2, np.random.default_rng(0).uniform(0, 0.01, 70)]


def test_exact_is_exact_and_by_name():
    matrix = matrix_with_spectrum(EIGS)
    result = curvscope.diagonal(curvscope.DenseOperator(matrix), method="exact")
    assert torch.allclose(result.value, matrix.diagonal(), atol=1e-13)
    assert result.num_matvecs == 80 and torch.all(result.std_error == 0)
    assert torch.equal(result["matrix"], result.value)
    assert torch.equal(result.by_name(std_error=True)["matrix"], result.std_error)
    with pytest.raises(KeyError, match="no parameter named"):
        result["nope"]


@pytest.mark.parametrize("method", ["hutchinson", "xdiag"])
def test_estimates_within_their_errors(method):
    matrix = matrix_with_spectrum(EIGS)
    result = curvscope.diagonal(curvscope.DenseOperator(matrix), method=method, num_matvecs=60)
    z = (result.value - matrix.diagonal()) / result.std_error.clamp_min(1e-300)
    assert result.num_matvecs == 60
    assert (z.abs() <= 3).float().mean() > 0.9


def test_xdiag_beats_hutchinson_on_decaying_spectrum():
    matrix = matrix_with_spectrum(EIGS)
    op = curvscope.DenseOperator(matrix)
    errors = {
        method: float(
            (curvscope.diagonal(op, method=method, num_matvecs=40).value - matrix.diagonal()).norm()
        )
        for method in ("hutchinson", "xdiag")
    }
    assert errors["xdiag"] < errors["hutchinson"] / 10


def test_deterministic_and_untouched():
    matrix = matrix_with_spectrum(EIGS)
    op = curvscope.DenseOperator(matrix.clone())
    state = torch.random.get_rng_state()
    first = curvscope.diagonal(op, num_matvecs=10, seed=1)
    second = curvscope.diagonal(op, num_matvecs=10, seed=torch.Generator().manual_seed(1))
    assert torch.equal(first.value, second.value)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(op.to_dense(), matrix)


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_model_hessian_diagonal_by_name(make_case):
    case = make_case()
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    dense = op.to_dense()
    result = curvscope.diagonal(op, method="exact")
    assert torch.allclose(result.value, dense.diagonal(), atol=1e-10)
    parts = result.by_name()
    assert list(parts) == op.param_names
    for name, shape in op.param_shapes.items():
        assert parts[name].shape == shape
        assert torch.equal(result[name], op.unflatten(dense.diagonal())[name].to(parts[name]))
