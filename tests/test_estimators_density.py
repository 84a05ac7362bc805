"""curvscope.spectral_density: exactness on small spectra and W1 accuracy."""

import numpy as np
import pytest
import scipy.stats
import torch
from models import MODEL_CASES, case_id

import curvscope


def matrix_with_spectrum(values, seed=0):
    values = np.asarray(values, dtype=np.float64)
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(values),) * 2))
    matrix = (basis * values) @ basis.T
    return torch.as_tensor((matrix + matrix.T) / 2)


def test_wasserstein_distance_small_with_defaults():
    rng = np.random.default_rng(0)
    eigs = np.r_[[40.0, 25.0, 10.0], rng.exponential(0.5, 500) - 0.2]
    op = curvscope.DenseOperator(matrix_with_spectrum(eigs))
    result = curvscope.spectral_density(op)
    nodes, weights = result.atoms()
    assert float(weights.sum()) == pytest.approx(1.0)
    distance = scipy.stats.wasserstein_distance(nodes.numpy(), eigs, u_weights=weights.numpy())
    assert distance <= 0.02 * (eigs.max() - eigs.min())
    assert result.lower <= eigs.min() + 1e-6 and result.upper >= eigs.max() - 1e-6
    assert result.num_matvecs == result.num_probes * result.lanczos_steps
    assert result.method == "slq" and result.nodes.shape == (result.num_probes, 48)


def test_density_integrates_to_one_and_small_spectrum_exact():
    op = curvscope.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    exact = curvscope.spectral_density(op, num_probes=3, lanczos_steps=10)
    assert exact.method == "exact" and exact.num_matvecs == 4
    assert exact.nodes.tolist() == [[1.0, 2.0, 3.0, 4.0]] and exact.weights.sum() == 1
    result = curvscope.spectral_density(op, num_probes=1, lanczos_steps=3)
    assert result.method == "slq" and result.nodes.shape == (1, 3) and result.num_matvecs == 3
    assert result.lower <= 1.0 and result.upper >= 4.0
    grid = np.linspace(-2, 7, 2001)
    curve = result.density(grid, sigma=0.1)
    assert isinstance(curve, np.ndarray)
    assert np.trapezoid(curve, grid) == pytest.approx(1.0, abs=1e-6)
    assert isinstance(result.density(torch.tensor([2.0])), torch.Tensor)


def test_breakdown_handled():
    # two distinct eigenvalues: Lanczos stops after two steps per probe
    op = curvscope.DenseOperator(torch.diag(torch.tensor([1.0] * 10 + [5.0] * 10)))
    result = curvscope.spectral_density(op, num_probes=2, lanczos_steps=8)
    nodes, weights = result.atoms()
    assert float(
        weights[(nodes - 1).abs() < 1e-9].sum() + weights[(nodes - 5).abs() < 1e-9].sum()
    ) == pytest.approx(1.0)
    assert result.num_matvecs <= 2 * 3


def test_deterministic_and_untouched():
    matrix = matrix_with_spectrum(np.linspace(-1, 1, 40))
    op = curvscope.DenseOperator(matrix.clone())
    state = torch.random.get_rng_state()
    first = curvscope.spectral_density(op, num_probes=2, lanczos_steps=10, seed=4)
    second = curvscope.spectral_density(op, num_probes=2, lanczos_steps=10, seed=4)
    assert torch.equal(first.nodes, second.nodes)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(op.to_dense(), matrix)


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_model_hessian_density_wasserstein(make_case):
    case = make_case()
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    eigs = np.linalg.eigvalsh(op.to_dense().numpy())
    nodes, weights = curvscope.spectral_density(op).atoms()
    distance = scipy.stats.wasserstein_distance(nodes.numpy(), eigs, u_weights=weights.numpy())
    assert distance <= 0.02 * (eigs.max() - eigs.min())
