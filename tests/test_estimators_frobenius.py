"""curvscope.frobenius_norm against the dense norm."""

import numpy as np
import pytest
import torch

import curvscope


def test_frobenius_norm_within_interval():
    rng = np.random.default_rng(0)
    matrix = torch.as_tensor(rng.standard_normal((50, 50)))
    matrix = (matrix + matrix.T) / 2
    op = curvscope.DenseOperator(matrix)
    true = float(torch.linalg.matrix_norm(matrix))
    covered = 0
    for seed in range(100):
        result = curvscope.frobenius_norm(op, num_matvecs=20, seed=seed)
        covered += result.ci_low <= true <= result.ci_high
    assert covered >= 88
    assert result.value == pytest.approx(true, rel=0.2)
    assert result.num_matvecs == 20 and result.std_error > 0


def test_identity_is_exact():
    op = curvscope.DenseOperator(torch.eye(9))
    result = curvscope.frobenius_norm(op, num_matvecs=5)
    assert result.value == pytest.approx(3.0) and result.std_error == pytest.approx(0.0)
