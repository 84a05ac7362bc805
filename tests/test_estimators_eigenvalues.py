"""curvscope.eigenvalues against numpy's eigvalsh on dense matrices with known spectra."""

import numpy as np
import pytest
import torch
from models import MODEL_CASES, case_id

import curvscope


def matrix_with_spectrum(values, seed=0):
    """A dense symmetric float64 matrix Q diag(values) Q^T with a random orthogonal Q."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((len(values), len(values))))
    matrix = (basis * values) @ basis.T
    return torch.as_tensor((matrix + matrix.T) / 2)


rng = np.random.default_rng(1)
SPECTRA = {
    "clustered": np.r_[[3.0, 2.99, 2.98, 2.97], rng.uniform(0, 2.5, 116)],
    "spiked": np.r_[[100.0, 60.0, 30.0, 10.0], rng.uniform(-1, 1, 116)],
    "indefinite": rng.standard_normal(120),
    "repeated": np.r_[[5.0, 5.0, 3.0, -4.0, -4.0], rng.uniform(-2, 2, 115)],
}


def reference(eigs, which, k):
    eigs = np.sort(eigs)
    if which == "largest":
        return eigs[::-1][:k]
    if which == "smallest":
        return eigs[:k]
    if which == "magnitude":
        return eigs[np.argsort(-np.abs(eigs), kind="stable")][:k]
    return np.sort(np.r_[eigs[:k], eigs[::-1][:k]])


MISSED_COPY = pytest.mark.xfail(
    strict=True,
    reason="known limitation: a single-vector Krylov space holds one vector per eigenspace; here "
    "the wanted pairs converge (24 products) before rounding brings in the second copy of 5",
)
CASES = [
    pytest.param(
        name, which, marks=MISSED_COPY if (name, which) == ("repeated", "magnitude") else ()
    )
    for name in sorted(SPECTRA)
    for which in ["largest", "smallest", "magnitude", "both"]
]


@pytest.mark.parametrize(("name", "which"), CASES)
def test_values_match_eigvalsh_within_residuals(name, which):
    matrix = matrix_with_spectrum(SPECTRA[name])
    op = curvscope.DenseOperator(matrix)
    k = 3
    result = curvscope.eigenvalues(op, k=k, which=which, tol=1e-8, max_matvecs=3000)
    expected = reference(SPECTRA[name], which, k)
    assert result.values.shape == (2 * k if which == "both" else k,)
    assert result.all_converged and result.status == "converged"
    assert result.method == "lanczos"
    error = np.abs(result.values.numpy() - expected)
    assert np.all(error <= result.residual_norms.numpy() + 1e-12)
    # the reported residuals are the true ones, and the flags agree with them
    vectors = result.vectors
    true = torch.linalg.vector_norm(matrix @ vectors - vectors * result.values, dim=0)
    assert torch.all(true <= 1.01 * result.residual_norms + 1e-13)
    bound = 1e-8 * torch.clamp(result.values.abs(), min=1e-300)
    assert torch.equal(result.converged, result.residual_norms <= bound) or result.all_converged
    gram = vectors.T @ vectors
    assert torch.allclose(gram, torch.eye(len(expected)), atol=1e-8)


def test_order_of_values():
    eigs = np.r_[[9.0, 7.0, -8.0, -10.0], np.linspace(-1, 1, 60)]
    op = curvscope.DenseOperator(matrix_with_spectrum(eigs))
    largest = curvscope.eigenvalues(op, k=2, tol=1e-10).values.tolist()
    smallest = curvscope.eigenvalues(op, k=2, which="smallest", tol=1e-10).values.tolist()
    magnitude = curvscope.eigenvalues(op, k=3, which="magnitude", tol=1e-10).values.tolist()
    both = curvscope.eigenvalues(op, k=2, which="both", tol=1e-10).values.tolist()
    assert largest == pytest.approx([9.0, 7.0])
    assert smallest == pytest.approx([-10.0, -8.0])
    assert magnitude == pytest.approx([-10.0, 9.0, -8.0])
    assert both == pytest.approx([-10.0, -8.0, 7.0, 9.0])


def test_no_ghost_duplicates_after_many_restarts():
    # one dominant eigenvalue and a slowly converging rest: many restarts, no ghost copies
    eigs = np.r_[[10.0], 1.0 - np.geomspace(1e-3, 1, 199)]
    op = curvscope.DenseOperator(matrix_with_spectrum(eigs, seed=3))
    result = curvscope.eigenvalues(op, k=4, tol=1e-10, max_matvecs=2000)
    assert result.num_restarts > 0
    values = np.sort(result.values.numpy())
    gaps = np.diff(values)
    assert np.all(gaps > result.residual_norms.numpy().max())
    expected = np.sort(reference(eigs, "largest", 4))
    assert np.allclose(values, expected, atol=1e-8)


def test_non_convergence_is_reported():
    op = curvscope.DenseOperator(matrix_with_spectrum(SPECTRA["clustered"]))
    result = curvscope.eigenvalues(op, k=4, tol=1e-10, max_matvecs=6)
    assert result.num_matvecs == 6
    assert not result.all_converged and result.status == "max_matvecs"
    assert torch.equal(result.converged, result.residual_norms <= 1e-10 * result.values.abs())
    # each value still lies within its residual of some eigenvalue, and below its target
    eigs = SPECTRA["clustered"]
    distance = np.abs(result.values.numpy()[:, None] - eigs[None, :]).min(axis=1)
    assert np.all(distance <= result.residual_norms.numpy() + 1e-12)
    assert np.all(result.values.numpy() <= reference(eigs, "largest", 4) + 1e-12)


def test_relative_to_norm_converges_where_the_tail_clusters_near_zero():
    """The digits MLP's GGN in float32: its spectrum decays into a tail near 0, where rounding
    (10 eps ||A||) exceeds tol * |value| for the 100th eigenvalue, so it cannot converge
    relative to itself; relative to ||A|| it does, each value within tol * ||A|| of the exact
    (float64) one."""
    import copy

    from curvscope.report.digits import train_digits_mlp

    model, x, y = train_digits_mlp(steps=300)
    data = [(x[:1000], y[:1000])]
    op = curvscope.GGNOperator(model, torch.nn.CrossEntropyLoss(), data)
    wide = copy.deepcopy(model).double()
    exact_op = curvscope.GGNOperator(
        wide, torch.nn.CrossEntropyLoss(), [(x[:1000].double(), y[:1000])]
    )
    spectrum = torch.linalg.eigvalsh(exact_op.to_dense()).flip(0).numpy()
    strict = curvscope.eigenvalues(op, k=100, max_matvecs=400)
    assert not strict.all_converged and strict.status in ("max_matvecs", "stagnated")
    found = curvscope.eigenvalues(op, k=100, tol=2e-5, max_matvecs=400, relative_to="norm")
    assert found.all_converged and found.status == "converged" and found.num_matvecs < 400
    bound = 2e-5 * float(found.values.abs().max())
    assert torch.equal(found.converged, found.residual_norms <= bound)
    values = found.values.numpy()
    # each value lies within its residual of an eigenvalue; the leading ones are the exact
    # leading ones; deeper in the tail a single-vector Krylov space may still lack an
    # eigenvalue when the wanted pairs converge, but the i-th value never exceeds the i-th
    # eigenvalue (Cauchy interlacing)
    distance = np.abs(values[:, None] - spectrum[None, :]).min(axis=1)
    assert np.all(distance <= found.residual_norms.numpy() + 1e-7)
    np.testing.assert_allclose(values[:50], spectrum[:50], rtol=0, atol=bound)
    assert np.all(values <= spectrum[:100] + bound)
    with pytest.raises(ValueError, match=r"relative_to=.*one of 'value', 'norm', got 'eigenvalue'"):
        curvscope.eigenvalues(op, k=2, relative_to="eigenvalue")


def test_warm_start_uses_fewer_products():
    eigs = np.r_[[4.0, 3.9, 3.8], rng.uniform(0, 3.5, 150)]
    matrix = matrix_with_spectrum(eigs, seed=5)
    cold = curvscope.eigenvalues(curvscope.DenseOperator(matrix), k=3, tol=1e-8)
    noise = 1e-4 * matrix_with_spectrum(rng.standard_normal(153), seed=6)
    moved = curvscope.DenseOperator(matrix + noise)
    again = curvscope.eigenvalues(moved, k=3, tol=1e-8)
    warm = curvscope.eigenvalues(moved, k=3, tol=1e-8, v0=cold.vectors)
    assert warm.all_converged
    assert warm.num_matvecs < 0.6 * again.num_matvecs
    assert torch.allclose(warm.values, again.values, atol=1e-7)
    single = curvscope.eigenvalues(moved, k=1, tol=1e-8, v0=cold.vectors[:, 0])
    assert float(single.values[0]) == pytest.approx(float(again.values[0]), abs=1e-7)


def test_tiny_operator_uses_dense_path():
    eigs = [3.0, -1.0, 2.0, 0.5, 7.0]
    op = curvscope.DenseOperator(matrix_with_spectrum(eigs))
    result = curvscope.eigenvalues(op, k=2, which="both")
    assert result.method == "dense" and result.num_matvecs == 5
    assert result.values.tolist() == pytest.approx([-1.0, 0.5, 3.0, 7.0])


def test_deterministic_and_no_side_effects():
    matrix = matrix_with_spectrum(SPECTRA["indefinite"])
    op = curvscope.DenseOperator(matrix.clone())
    state = torch.random.get_rng_state()
    first = curvscope.eigenvalues(op, k=3, seed=7)
    second = curvscope.eigenvalues(op, k=3, seed=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first.values, second.values)
    assert torch.equal(first.vectors, second.vectors)
    assert torch.equal(op.to_dense(), matrix)
    assert op.num_matvecs == first.num_matvecs + second.num_matvecs


def test_float32_operator_and_duck_typing():
    matrix = matrix_with_spectrum(SPECTRA["spiked"])

    class Duck:
        shape, dtype, device = matrix.shape, torch.float32, torch.device("cpu")

        def matmat(self, block):
            return matrix.float() @ block

    result = curvscope.eigenvalues(Duck(), k=2, tol=1e-4)
    assert result.vectors.dtype == torch.float32
    assert result.values.tolist() == pytest.approx([100.0, 60.0], rel=1e-4)
    assert result.all_converged


def test_frozen_and_to_dict():
    op = curvscope.DenseOperator(matrix_with_spectrum(SPECTRA["spiked"]))
    result = curvscope.eigenvalues(op, k=2)
    with pytest.raises(AttributeError):
        result.num_matvecs = 3
    out = result.to_dict()
    assert out["kind"] == "EigenResult" and "vectors" not in out
    assert out["values"] == pytest.approx([100.0, 60.0]) and out["converged"] == [True, True]


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_model_hessians_match_eigvalsh(make_case):
    case = make_case()
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    eigs = np.linalg.eigvalsh(op.to_dense().numpy())
    k = min(2, op.shape[0] // 2)
    result = curvscope.eigenvalues(op, k=k, which="both", tol=1e-8, max_matvecs=2000)
    assert result.all_converged
    error = np.abs(result.values.numpy() - reference(eigs, "both", k))
    assert np.all(error <= result.residual_norms.numpy() + 1e-10)


class FreeDiagonal:
    """A free operator (an elementwise product) with a known spectrum, of any size."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values
        self.shape = (values.numel(), values.numel())
        self.dtype, self.device = values.dtype, values.device

    def matmat(self, block):
        return self.values[:, None] * block


def known_spectrum(size: int, dtype) -> torch.Tensor:
    values = torch.rand(size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values[:4] = torch.tensor([10.0, 9.0, 8.0, 7.0], dtype=torch.float64)
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("tol", "max_matvecs"), [(1e-4, None), (1e-4, 8), (1e-9, 40)])
def test_residuals_are_true_at_a_million_parameters(dtype, tol, max_matvecs):
    # float32 BLAS dots and norms over 1M+ entries are off by up to 1e-3: the residuals used
    # to come out 60x below the true ones, flagged converged
    values = known_spectrum(1_200_000, dtype)
    result = curvscope.eigenvalues(FreeDiagonal(values), k=3, tol=tol, max_matvecs=max_matvecs)
    exact = values.double()
    vectors = result.vectors.double()
    true = torch.linalg.vector_norm(exact[:, None] * vectors - vectors * result.values, dim=0)
    assert torch.all(result.residual_norms >= 0.5 * true)
    assert torch.all(result.residual_norms <= 2.0 * true)
    assert torch.equal(result.converged, true <= tol * result.values.abs())
    error = (result.values - torch.tensor([10.0, 9.0, 8.0], dtype=torch.float64)).abs()
    assert torch.all(error <= result.residual_norms)
    assert result.num_matvecs <= (max_matvecs or 30)
    # 1e-9 relative is below float32 rounding: never claimed; float64 gets there
    reachable = max_matvecs is None or (tol < 1e-6 and dtype == torch.float64)
    assert result.all_converged == reachable
    assert result.status == ("converged" if reachable else "max_matvecs")


def test_residuals_stay_true_when_the_recurrence_lies(monkeypatch):
    # simulate the old float32 failure: Gram-Schmidt leaves 1e-3 of the basis in each new
    # vector, so |beta s_last| is no longer a residual; the explicit check must catch it
    from curvscope.estimators import _lanczos

    exact = _lanczos.orthogonalise

    def sloppy(basis, vector):
        coeffs = exact(basis, vector)
        vector.add_(basis.sum(dim=0), alpha=1e-3 * float(vector.norm()))
        return coeffs

    monkeypatch.setattr(_lanczos, "orthogonalise", sloppy)
    matrix = matrix_with_spectrum(SPECTRA["spiked"])
    result = curvscope.eigenvalues(curvscope.DenseOperator(matrix), k=3, tol=1e-8)
    vectors = result.vectors
    true = torch.linalg.vector_norm(matrix @ vectors - vectors * result.values, dim=0)
    assert torch.all(result.residual_norms >= 0.5 * true)
    assert torch.all(result.residual_norms <= 2.0 * true)
    assert torch.equal(result.converged, true <= 1e-8 * result.values.abs())
    assert result.status == "stagnated" and not result.all_converged
    assert result.num_matvecs < 100  # gave up after three contradicted claims, not the budget
