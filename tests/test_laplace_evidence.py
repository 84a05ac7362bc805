"""The evidence of LaplaceApproximation against the dense formula, for every structure."""

import copy

import pytest
import torch
from laplace_reference import (
    classification_problem,
    evidence,
    ggn_of_sum,
    jacobian,
    joined,
    log_likelihood,
    probit,
    regression_problem,
)
from models import MODEL_CASES, case_id, full_batch, reference_output, trainable_names
from torch import nn

import curvscope

TOL = 1e-6
PRIORS = [0.1, 1.0, 10.0]
SIGMAS = [0.3, 1.0, 2.0]


def _reference(model, data, kind, names=None, sigma=1.0):
    names = names or [n for n, p in model.named_parameters() if p.requires_grad]
    x, y = joined(data)
    theta, out, jac = jacobian(model, x, names)
    return theta, ggn_of_sum(out, jac, kind, sigma), log_likelihood(out, y, kind, sigma)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_full_evidence_equals_dense_formula_classification(reduction):
    model, data = classification_problem()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    la = curvscope.LaplaceApproximation(model, loss_fn, data, structure="full")
    theta, ggn, loglik = _reference(model, data, "classification")
    eye = torch.eye(len(theta))
    for delta in PRIORS:
        expected = evidence(loglik, ggn + delta * eye, torch.full_like(theta, delta), theta)
        assert la.log_marginal_likelihood(prior_precision=delta) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_full_evidence_equals_dense_formula_regression(reduction):
    model, data = regression_problem()
    la = curvscope.LaplaceApproximation(
        model, nn.MSELoss(reduction=reduction), data, structure="full"
    )
    for sigma in SIGMAS:
        theta, ggn, loglik = _reference(model, data, "regression", sigma=sigma)
        for delta in PRIORS:
            prior = torch.full_like(theta, delta)
            expected = evidence(loglik, ggn + torch.diag(prior), prior, theta)
            got = la.log_marginal_likelihood(prior_precision=delta, sigma_noise=sigma)
            assert got == pytest.approx(expected, abs=TOL)


def test_current_values_are_the_defaults_and_precision_operator_is_dense_lambda():
    model, data = regression_problem(seed=1)
    la = curvscope.LaplaceApproximation(
        model, nn.MSELoss(), data, structure="full", prior_precision=2.0, sigma_noise=0.5
    )
    theta, ggn, _ = _reference(model, data, "regression", sigma=0.5)
    assert la.log_marginal_likelihood() == la.log_marginal_likelihood(2.0, 0.5)
    dense = la.posterior_precision.to_dense()
    torch.testing.assert_close(dense, ggn + 2.0 * torch.eye(len(theta)), rtol=1e-9, atol=1e-9)
    assert la.posterior_precision.logdet() == pytest.approx(float(torch.logdet(dense)), abs=TOL)
    assert la.num_params == len(theta) and la.num_examples == 20
    assert la.prior_precision == 2.0 and la.sigma_noise == 0.5


def test_per_layer_prior_equals_dense_formula():
    model, data = classification_problem(seed=2)
    la = curvscope.LaplaceApproximation(model, nn.CrossEntropyLoss(), data, structure="full")
    assert la.layer_names == ["0", "2"]
    theta, ggn, loglik = _reference(model, data, "classification")
    prior = torch.cat([torch.full((20,), 0.3), torch.full((18,), 4.0)])
    expected = evidence(loglik, ggn + torch.diag(prior), prior, theta)
    got = la.log_marginal_likelihood(prior_precision={"0": 0.3, "2": 4.0})
    assert got == pytest.approx(expected, abs=TOL)


def test_last_layer_equals_full_computation_restricted_to_last_layer():
    model, data = classification_problem(seed=3)
    la = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), data, structure="full", subset="last_layer"
    )
    names = ["2.weight", "2.bias"]
    assert la.param_names == names
    theta, ggn, loglik = _reference(model, data, "classification", names)
    for delta in PRIORS:
        prior = torch.full_like(theta, delta)
        expected = evidence(loglik, ggn + torch.diag(prior), prior, theta)
        assert la.log_marginal_likelihood(delta) == pytest.approx(expected, abs=TOL)
    named = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), data, structure="full", subset=names
    )
    assert named.log_marginal_likelihood(0.7) == pytest.approx(la.log_marginal_likelihood(0.7))


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_diag_equals_dense_counterpart_from_the_ggn_diagonal(kind):
    model, data = classification_problem(4) if kind == "classification" else regression_problem(4)
    loss_fn = nn.CrossEntropyLoss() if kind == "classification" else nn.MSELoss()
    la = curvscope.LaplaceApproximation(model, loss_fn, data, structure="diag", sigma_noise=0.8)
    theta, ggn, loglik = _reference(model, data, kind, sigma=0.8)
    for delta in PRIORS:
        prior = torch.full_like(theta, delta)
        expected = evidence(loglik, torch.diag(ggn.diagonal() + prior), prior, theta)
        assert la.log_marginal_likelihood(delta) == pytest.approx(expected, abs=TOL)
    prior = {"0": 0.5, "2": 3.0}
    vector = torch.cat([torch.full((20,), 0.5), torch.full((len(theta) - 20,), 3.0)])
    expected = evidence(loglik, torch.diag(ggn.diagonal() + vector), vector, theta)
    assert la.log_marginal_likelihood(prior) == pytest.approx(expected, abs=TOL)


def test_lowrank_equals_dense_counterpart_from_the_top_eigenpairs():
    model, data = classification_problem(seed=5)
    theta, ggn, loglik = _reference(model, data, "classification")
    values, vectors = torch.linalg.eigh(ggn)
    for rank in (6, len(theta)):
        la = curvscope.LaplaceApproximation(
            model, nn.CrossEntropyLoss(), data, structure="lowrank", rank=rank
        )
        top = (vectors[:, -rank:] * values[-rank:].clamp_min(0)) @ vectors[:, -rank:].T
        for prior_value in (0.5, {"0": 0.2, "2": 2.0}):
            if isinstance(prior_value, dict):
                prior = torch.cat([torch.full((20,), 0.2), torch.full((18,), 2.0)])
            else:
                prior = torch.full_like(theta, prior_value)
            expected = evidence(loglik, top + torch.diag(prior), prior, theta)
            got = la.log_marginal_likelihood(prior_value)
            assert got == pytest.approx(expected, abs=1e-5)


class _StructuredDense(curvscope.DenseOperator):
    """A dense matrix with the structured-operator extras (exact logdet and inverse)."""

    def logdet(self, damping=0.0):
        eye = torch.eye(self.shape[0], dtype=self.dtype)
        return float(torch.logdet(self._matrix + damping * eye))

    def inverse(self, damping=0.0):
        eye = torch.eye(self.shape[0], dtype=self.dtype)
        return curvscope.DenseOperator(torch.linalg.inv(self._matrix + damping * eye))


@pytest.mark.parametrize("wrap", [curvscope.DenseOperator, _StructuredDense])
def test_any_operator_is_used_as_the_curvature_of_loss_fn(wrap):
    model, data = classification_problem(seed=6)
    theta, ggn, loglik = _reference(model, data, "classification")
    n = 24  # CrossEntropyLoss(mean): the operator is the GGN of the mean loss
    la = curvscope.LaplaceApproximation(model, nn.CrossEntropyLoss(), data, structure=wrap(ggn / n))
    assert la.structure == "operator"
    for delta in PRIORS:
        prior = torch.full_like(theta, delta)
        expected = evidence(loglik, ggn + torch.diag(prior), prior, theta)
        assert la.log_marginal_likelihood(delta) == pytest.approx(expected, abs=TOL)
    names = ["2.weight", "2.bias"]
    block = curvscope.GGNOperator(model, nn.CrossEntropyLoss(), data, params=names)
    by_op = curvscope.LaplaceApproximation(model, nn.CrossEntropyLoss(), data, structure=block)
    by_subset = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), data, structure="full", subset=names
    )
    assert by_op.param_names == names
    expected = by_subset.log_marginal_likelihood(2.0)
    assert by_op.log_marginal_likelihood(2.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    "make_case", [c for c in MODEL_CASES if c.__name__ != "frozen"], ids=case_id
)
def test_full_evidence_on_the_model_zoo(make_case):
    case = make_case()
    kind = "classification" if isinstance(case.loss_fn, nn.CrossEntropyLoss) else "regression"
    before = copy.deepcopy(case.model.state_dict())
    la = curvscope.LaplaceApproximation(case.model, case.loss_fn, case.data, structure="full")
    theta, output, targets = reference_output(case)
    jac = torch.func.jacrev(output)(theta).reshape(len(targets), -1, len(theta))
    out = output(theta).detach().reshape(len(targets), -1)
    ggn = ggn_of_sum(out, jac, kind)
    loglik = log_likelihood(out, targets, kind)
    prior = torch.full_like(theta, 0.5)
    expected = evidence(loglik, ggn + torch.diag(prior), prior, theta)
    assert la.log_marginal_likelihood(0.5) == pytest.approx(expected, abs=TOL)
    assert la.param_names == trainable_names(case.model)
    for key, value in case.model.state_dict().items():
        assert torch.equal(value, before[key])
    assert case.model.training  # the zoo's models are in train mode; still are


def test_frozen_parameters_are_left_out():
    case = next(c for c in MODEL_CASES if c.__name__ == "frozen")()
    la = curvscope.LaplaceApproximation(case.model, case.loss_fn, case.data, structure="full")
    assert la.param_names == ["2.weight", "2.bias"]
    x, y = full_batch(case.data)
    theta, out, jac = jacobian(case.model, x, la.param_names)
    prior = torch.full_like(theta, 1.5)
    ggn = ggn_of_sum(out, jac, "regression")
    expected = evidence(log_likelihood(out, y, "regression"), ggn + torch.diag(prior), prior, theta)
    assert la.log_marginal_likelihood(1.5) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("structure", ["full", "diag", "lowrank"])
def test_marglik_returns_a_local_maximum(structure):
    model, data = classification_problem(seed=7)
    la = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), data, structure=structure, rank=8
    )
    best = la.optimize_prior_precision("marglik")
    assert la.prior_precision == best
    top = la.log_marginal_likelihood(best)
    for factor in (0.99, 1.01, 0.5, 2.0):
        assert la.log_marginal_likelihood(best * factor) <= top + 1e-10
    per_layer = la.optimize_prior_precision("marglik", per_layer=True)
    assert set(per_layer) == {"0", "2"}
    top_layers = la.log_marginal_likelihood(per_layer)
    assert top_layers >= top - 1e-9  # more freedom never lowers the maximum
    for layer in per_layer:
        for factor in (0.98, 1.02):
            moved = dict(per_layer, **{layer: per_layer[layer] * factor})
            assert la.log_marginal_likelihood(moved) <= top_layers + 1e-9


def test_marglik_matches_mackay_fixed_point_on_a_dense_problem():
    model, data = regression_problem(seed=8)
    la = curvscope.LaplaceApproximation(model, nn.MSELoss(), data, structure="full")
    delta = la.optimize_prior_precision()
    theta, ggn, _ = _reference(model, data, "regression")
    values = torch.linalg.eigvalsh(ggn).clamp_min(0)
    gamma = float((values / (values + delta)).sum())  # effective number of parameters
    assert delta == pytest.approx(gamma / float(theta @ theta), rel=1e-4)


@pytest.mark.parametrize("per_layer", [False, True])
def test_kfac_equals_dense_counterpart_from_the_kfac_matrix(per_layer):
    model, data = classification_problem(seed=9)
    loss_fn = nn.CrossEntropyLoss()
    la = curvscope.LaplaceApproximation(model, loss_fn, data)  # the default structure
    assert la.structure == "kfac"
    kfac = curvscope.KFACOperator(model, loss_fn, data, fisher="ggn").to_dense()
    x, y = joined(data)
    theta, out, _ = jacobian(model, x, la.param_names)
    loglik = log_likelihood(out, y, "classification")
    if per_layer:
        value = {"0": 0.4, "2": 3.0}
        prior = torch.cat([torch.full((20,), 0.4), torch.full((18,), 3.0)])
    else:
        value, prior = 0.7, torch.full_like(theta, 0.7)
    expected = evidence(loglik, 24 * kfac + torch.diag(prior), prior, theta)
    assert la.log_marginal_likelihood(value) == pytest.approx(expected, abs=TOL)
    la.prior_precision = value
    precision = 24 * kfac + torch.diag(prior)
    samples = la.sample(4000, seed=0)
    covariance = torch.cov(samples.T)
    reference = torch.linalg.inv(precision)
    error = (covariance - reference).norm() / reference.norm()
    expected_error = ((reference.trace() ** 2 + reference.norm() ** 2) / 4000).sqrt()
    assert error < 3 * expected_error / reference.norm()


class _FakeKFAC(curvscope.LinearOperator):
    """Stands in for KFACOperator (same API): the GGN's exact layer blocks, with exact extras."""

    def __init__(self, model, loss_fn, data, *, params=None, fisher="ggn", seed=0, progress=False):
        assert fisher == "ggn"
        ggn = curvscope.GGNOperator(model, loss_fn, data, params=params)
        self._param_shapes, self._dtype, self._device = ggn.param_shapes, ggn.dtype, ggn.device
        dense, start = torch.zeros(ggn.shape), 0
        full = ggn.to_dense()
        sizes = {}
        for name, shape in self._param_shapes.items():
            sizes.setdefault(name.rpartition(".")[0], []).append(shape.numel())
        for group in sizes.values():
            stop = start + sum(group)
            dense[start:stop, start:stop] = full[start:stop, start:stop]
            start = stop
        self.matrix, self._num_matvecs = dense, 0

    def _matmat(self, matrix):
        return self.matrix @ matrix

    def logdet(self, damping=0.0):
        return float(torch.logdet(self.matrix + damping * torch.eye(self.shape[0])))

    def inverse(self, damping=0.0):
        return curvscope.DenseOperator(
            torch.linalg.inv(self.matrix + damping * torch.eye(len(self.matrix)))
        )

    def diagonal(self):
        return self.unflatten(self.matrix.diagonal())


@pytest.mark.parametrize("per_layer", [False, True])
def test_kfac_path_with_a_stand_in_operator(monkeypatch, per_layer):
    monkeypatch.setattr(curvscope.laplace.structures, "KFACOperator", _FakeKFAC)
    model, data = classification_problem(seed=10)
    la = curvscope.LaplaceApproximation(model, nn.CrossEntropyLoss(), data)
    assert la.structure == "kfac"
    theta, ggn, loglik = _reference(model, data, "classification")
    blocks = torch.zeros_like(ggn)
    blocks[:20, :20], blocks[20:, 20:] = ggn[:20, :20], ggn[20:, 20:]
    if per_layer:
        value = {"0": 0.4, "2": 3.0}
        prior = torch.cat([torch.full((20,), 0.4), torch.full((18,), 3.0)])
    else:
        value, prior = 0.7, torch.full_like(theta, 0.7)
    precision = blocks + torch.diag(prior)
    assert la.log_marginal_likelihood(value) == pytest.approx(
        evidence(loglik, precision, prior, theta), abs=TOL
    )
    best = la.optimize_prior_precision(per_layer=per_layer)
    top = la.log_marginal_likelihood(best)
    scaled = {k: v * 1.02 for k, v in best.items()} if per_layer else best * 1.02
    assert la.log_marginal_likelihood(scaled) <= top + 1e-9
    la.prior_precision = value
    reference = torch.linalg.inv(precision)
    torch.testing.assert_close(
        la.posterior_precision.inverse_diagonal(), reference.diagonal(), rtol=1e-8, atol=1e-10
    )
    x, _ = joined(data)
    _, out, jac = jacobian(model, x[:4], la.param_names)

    torch.testing.assert_close(
        la.predict(x[:4]), probit(out, jac, precision), rtol=1e-8, atol=1e-10
    )
    samples = la.sample(3000, seed=1)
    error = (torch.cov(samples.T) - reference).norm()
    assert error < 2 * ((reference.trace() ** 2 + reference.norm() ** 2) / 3000).sqrt()


class _LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("structure", ["diag", "lowrank"])
def test_lstm_with_diag_and_lowrank(structure):
    gen = torch.Generator().manual_seed(12)
    model = _LSTMClassifier().double()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    x = torch.randn(8, 4, 2, generator=gen)
    y = torch.randint(0, 2, (8,), generator=gen)
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    size = sum(p.numel() for p in model.parameters())
    la = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), data, structure=structure, rank=size, prior_precision=0.8
    )
    theta, ggn, loglik = _reference(model, data, "classification")
    curvature = torch.diag(ggn.diagonal()) if structure == "diag" else ggn
    prior = torch.full_like(theta, 0.8)
    expected = evidence(loglik, curvature + torch.diag(prior), prior, theta)
    assert la.log_marginal_likelihood(0.8) == pytest.approx(expected, abs=1e-5)
    probs = la.predict(x[:3])
    _, out, jac = jacobian(model, x[:3], la.param_names)
    expected_probs = probit(out, jac, curvature + torch.diag(prior))
    torch.testing.assert_close(probs, expected_probs, rtol=1e-6, atol=1e-8)


def test_operator_route_equals_jacobian_route(monkeypatch):
    from curvscope.laplace import structures

    structure = "full"  # "diag" has one route, GGNDiagonalOperator

    model, data = regression_problem(seed=13)
    by_jacobians = curvscope.LaplaceApproximation(model, nn.MSELoss(), data, structure=structure)
    monkeypatch.setattr(structures, "applies", lambda *args: False)  # e.g. sequence outputs
    monkeypatch.setattr(structures, "BLOCK_COLUMNS", 7)
    by_products = curvscope.LaplaceApproximation(model, nn.MSELoss(), data, structure=structure)
    for delta in PRIORS:
        expected = by_jacobians.log_marginal_likelihood(delta)
        assert by_products.log_marginal_likelihood(delta) == pytest.approx(expected, abs=TOL)


def test_per_layer_prior_on_a_large_float32_curvature_stays_positive_definite():
    # s·C in float32 with s·λ_max ~ 1e9: its round-off (~1e2) swamps a small per-layer δ;
    # the Cholesky factor is taken in float64, where s·C + diag(δ) stays positive definite.
    from curvscope.laplace.posterior import DenseStructure

    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))[0]
    values = torch.cat([torch.logspace(6, 0, 20, dtype=torch.float64), torch.zeros(20)])
    matrix = (basis * values) @ basis.T
    structure = DenseStructure(matrix.float(), psd=True)
    prior = torch.cat([torch.full((25,), 1e-3), torch.full((15,), 1e-2)]).float()
    scale = 1000.0
    stored = matrix.float().double()  # what the structure holds, its eigenvalues clamped at 0
    values64, vectors64 = torch.linalg.eigh((stored + stored.T) / 2)
    clamped = (vectors64 * values64.clamp_min(0)) @ vectors64.T
    exact = torch.linalg.slogdet(scale * clamped + torch.diag(prior.double()))[1]
    assert structure.logdet(scale, prior) == pytest.approx(float(exact), rel=1e-6)
    solution = structure.solve(scale, prior, torch.ones(40, 1, dtype=torch.float32))
    assert solution.dtype == torch.float32 and torch.isfinite(solution).all()
