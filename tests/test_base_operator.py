import numpy as np
import pytest
import torch

import curvscope


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T + n * torch.eye(n, dtype=torch.float64)


def test_dense_operator_products_match_matrix():
    a = _spd(5)
    op = curvscope.DenseOperator(a)
    v = torch.arange(5.0, dtype=torch.float64)
    torch.testing.assert_close(op @ v, a @ v)
    torch.testing.assert_close(op.matvec(v), a @ v)
    m = torch.ones(5, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(m), a @ m)
    assert op.num_matvecs == 5
    assert op.shape == (5, 5)
    assert op.param_names == ["matrix"]
    np.testing.assert_allclose(op.to_scipy() @ np.ones(5), a.numpy() @ np.ones(5))
    np.testing.assert_allclose(op.to_scipy().matmat(np.eye(5)), a.numpy())


def test_dict_vector_round_trip():
    op = curvscope.DenseOperator(_spd(4))
    out = op.matvec({"matrix": torch.ones(4, dtype=torch.float64)})
    assert set(out) == {"matrix"}
    torch.testing.assert_close(out["matrix"], op.to_dense() @ torch.ones(4, dtype=torch.float64))


def test_dense_operator_rejects_bad_input():
    with pytest.raises(TypeError, match=r"DenseOperator\(matrix=...\).*DenseOperator|as_tensor"):
        curvscope.DenseOperator([[1.0]])
    with pytest.raises(ValueError, match=r"square"):
        curvscope.DenseOperator(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"symmetric"):
        curvscope.DenseOperator(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    op = curvscope.DenseOperator(_spd(3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        op @ torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dtype torch.float64.*\.to\(torch.float64\)"):
        op @ torch.ones(3, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"matvec\(v=...\)"):
        op.matvec([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"Missing keys: \['matrix'\]"):
        op.matvec({"other": torch.ones(3)})
    with pytest.raises(ValueError, match=r"shape \(3, k\)"):
        op.matmat(torch.ones(2, 2))


def test_to_dense_refuses_large_with_memory_estimate():
    class Big(curvscope.LinearOperator):
        def __init__(self):
            self._param_shapes = {"w": torch.Size([20_000])}
            self._dtype = torch.float64
            self._device = torch.device("cpu")

    with pytest.raises(ValueError, match=r"2.98 GiB.*max_entries"):
        Big().to_dense()
