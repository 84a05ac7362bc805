"""curvscope.solve against a dense solve, and honest failure reports."""

import numpy as np
import pytest
import torch
from models import MODEL_CASES, case_id

import curvscope


def spd(size=80, seed=0, low=0.1):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((size, size)))
    matrix = (basis * rng.uniform(low, 10, size)) @ basis.T
    return torch.as_tensor((matrix + matrix.T) / 2)


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_matches_dense_solve(damping):
    matrix = spd()
    b = torch.as_tensor(np.random.default_rng(1).standard_normal(80))
    result = curvscope.solve(curvscope.DenseOperator(matrix), b, damping=damping, tol=1e-10)
    expected = torch.linalg.solve(matrix + damping * torch.eye(80), b)
    assert result.converged and result.status == "converged"
    assert float((result.x - expected).norm() / expected.norm()) < 1e-6
    assert result.residual_norm <= 1e-10 * float(b.norm())
    assert result.num_matvecs == result.num_iterations + 1


def test_non_convergence_reported():
    matrix = spd(low=1e-4)
    b = torch.ones(80)
    result = curvscope.solve(curvscope.DenseOperator(matrix), b, max_matvecs=3)
    assert not result.converged and result.status == "max_matvecs"
    assert result.num_iterations == 3
    true = float((b - matrix @ result.x).norm())
    assert result.residual_norm == pytest.approx(true)


def test_indefinite_status():
    matrix = torch.diag(torch.tensor([3.0, 2.0, -1.0, 1.0]))
    result = curvscope.solve(curvscope.DenseOperator(matrix), torch.ones(4))
    assert result.status == "not positive definite" and not result.converged
    fixed = curvscope.solve(curvscope.DenseOperator(matrix), torch.ones(4), damping=2.0)
    assert fixed.converged


def test_dict_rhs_and_zero_rhs():
    op = curvscope.DenseOperator(spd(size=5))
    result = curvscope.solve(op, {"matrix": torch.ones(5)})
    assert set(result.x) == {"matrix"} and result.converged
    zero = curvscope.solve(op, torch.zeros(5))
    assert zero.converged and zero.num_matvecs == 0 and torch.all(zero.x == 0)


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_model_hessian_damped_solve(make_case):
    case = make_case()
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    dense = op.to_dense()
    damping = float(torch.linalg.eigvalsh(dense)[0].abs()) + 0.1
    b = torch.linspace(-1, 1, op.shape[0], dtype=op.dtype)
    result = curvscope.solve(op, b, damping=damping, tol=1e-10)
    expected = torch.linalg.solve(dense + damping * torch.eye(op.shape[0]), b)
    assert result.converged
    assert float((result.x - expected).norm() / expected.norm()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_is_true_at_a_million_parameters(dtype):
    # CG scalars and the final residual norm are float64-accumulated: a float32 BLAS dot or
    # vector_norm over 1M+ entries is off by up to 1e-3 relative
    values = torch.rand(1_200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    class FreeDiagonal:
        shape, device = (values.numel(), values.numel()), torch.device("cpu")

        def __init__(self):
            self.dtype = dtype

        def matmat(self, block):
            return values.to(dtype)[:, None] * block

    rhs = torch.ones(values.numel(), dtype=dtype)
    result = curvscope.solve(FreeDiagonal(), rhs, damping=0.5, tol=1e-5)
    true = torch.linalg.vector_norm(
        torch.ones(values.numel(), dtype=torch.float64) - (values + 0.5) * result.x.double()
    )
    assert 0.5 * float(true) <= result.residual_norm <= 2.0 * float(true)
    assert result.converged == (float(true) <= 1e-5 * values.numel() ** 0.5)
    assert result.status == "converged"
