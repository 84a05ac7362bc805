"""Predictive distributions and posterior samples of LaplaceApproximation."""

import math

import numpy as np
import pytest
import torch
from laplace_reference import (
    classification_problem,
    ggn_of_sum,
    jacobian,
    joined,
    probit,
    regression_problem,
)
from models import cnn_batchnorm, transformer
from torch import nn

import curvscope

STRUCTURES = ["full", "diag", "lowrank"]


def _classifier(structure="full", prior=1.0, seed=0):
    model, data = classification_problem(seed=seed)
    la = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), data, structure=structure, prior_precision=prior, rank=38
    )
    return model, data, la


def _precision(model, data, la, kind="classification", sigma=1.0):
    x, _ = joined(data)
    _theta, out, jac = jacobian(model, x, la.param_names)
    ggn = ggn_of_sum(out, jac, kind, sigma)
    if la.structure == "diag":
        ggn = torch.diag(ggn.diagonal())
    prior = la.posterior_precision.prior
    return ggn + torch.diag(prior)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_probit_equals_its_closed_form(structure):
    model, data, la = _classifier(structure, prior={"0": 0.5, "2": 2.0})
    precision = _precision(model, data, la)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    _, out, jac = jacobian(model, x, la.param_names)
    expected = probit(out, jac, precision)
    got = la.predict(x, method="probit")
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert got.shape == (5, 3)


@pytest.mark.parametrize("prior", [0.7, {"0": 0.5, "2": 2.0}], ids=["scalar", "per-layer"])
def test_kfac_probit_and_validation_nll_equal_the_dense_posterior(prior):
    """KFAC's predictive variances come from one rotation into its eigenbasis: they equal
    diag(J Λ⁻¹ Jᵀ) with Λ the posterior precision's dense matrix, for every prior."""
    model, _data, la = _classifier("kfac", prior=prior)
    precision = la.posterior_precision.to_dense()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    _, out, jac = jacobian(model, x, la.param_names)
    torch.testing.assert_close(la.predict(x), probit(out, jac, precision), rtol=1e-8, atol=1e-10)
    y = torch.tensor([0, 2, 1, 1, 0])
    priors = [0.3, 3.0]  # the validation curve is over scalar priors
    got = la.validation_nll([(x, y)], priors)
    for value, nll in zip(priors, got, strict=True):
        la.prior_precision = value
        probs = probit(out, jac, la.posterior_precision.to_dense())
        assert nll == pytest.approx(float(-probs[torch.arange(5), y].log().mean()), rel=1e-10)


def test_probit_on_batchnorm_cnn_and_transformer_equals_closed_form():
    for make in (cnn_batchnorm, transformer):
        case = make()
        la = curvscope.LaplaceApproximation(case.model, case.loss_fn, case.data, structure="full")
        x, y = case.data[0]
        from models import reference_output

        theta, output, _ = reference_output(case)
        _xs, _ = joined(case.data)
        out_all = output(theta).detach()
        jac_all = torch.func.jacrev(output)(theta).detach()
        ggn = ggn_of_sum(out_all, jac_all, "classification")
        precision = ggn + torch.eye(len(theta))
        n = len(y)
        expected = probit(out_all[:n], jac_all[:n], precision)
        torch.testing.assert_close(la.predict(x), expected, rtol=1e-7, atol=1e-9)
        assert case.model.training


def test_glm_converges_to_the_exact_gaussian_integral_and_probit_is_close():
    model, data, la = _classifier("full", prior=20.0)
    precision = _precision(model, data, la)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    _, out, jac = jacobian(model, x, la.param_names)
    covariance = torch.einsum("nkp,pq,nlq->nkl", jac, torch.linalg.inv(precision), jac)
    gen = np.random.default_rng(0)
    draws = np.stack(
        [gen.multivariate_normal(out[i].numpy(), covariance[i].numpy(), 200_000) for i in range(4)]
    )
    exact = torch.softmax(torch.as_tensor(draws), dim=-1).mean(dim=1)  # (4, C), error ~1e-3
    samples = 4000
    glm = la.predict(x, method="glm", n_samples=samples, seed=3)
    spread = torch.softmax(torch.as_tensor(draws[:, :samples]), dim=-1).std(dim=1)
    assert ((glm - exact).abs() <= 5 * spread / math.sqrt(samples) + 2e-3).all()
    assert (la.predict(x, method="probit") - exact).abs().max() < 0.02  # probit's own error
    torch.testing.assert_close(glm.sum(dim=1), torch.ones(4))


def test_mc_equals_glm_for_a_model_linear_in_its_parameters():
    gen = torch.Generator().manual_seed(4)
    model = nn.Linear(3, 3).double()
    x = torch.randn(20, 3, generator=gen)
    y = torch.randint(0, 3, (20,), generator=gen)
    la = curvscope.LaplaceApproximation(model, nn.CrossEntropyLoss(), (x, y), structure="full")
    mc = la.predict(x[:5], method="mc", n_samples=50, seed=7)
    glm = la.predict(x[:5], method="glm", n_samples=50, seed=7)
    torch.testing.assert_close(mc, glm, rtol=1e-10, atol=1e-12)


def test_mc_converges_to_glm_for_small_posterior_variance():
    _model, _data, la = _classifier("full", prior=1e4)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    mc = la.predict(x, method="mc", n_samples=500, seed=1)
    glm = la.predict(x, method="glm", n_samples=500, seed=1)
    assert (mc - glm).abs().max() < 1e-3


@pytest.mark.parametrize("structure", STRUCTURES)
def test_regression_predictive_mean_and_variance(structure):
    model, data = regression_problem(seed=6)
    la = curvscope.LaplaceApproximation(
        model, nn.MSELoss(), data, structure=structure, sigma_noise=0.4, rank=37
    )
    precision = _precision(model, data, la, "regression", sigma=0.4)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))
    _, out, jac = jacobian(model, x, la.param_names)
    f_var = torch.einsum("nkp,pq,nkq->nk", jac, torch.linalg.inv(precision), jac)
    mean, variance = la.predict(x, method="probit")
    torch.testing.assert_close(mean, out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance, f_var + 0.16, rtol=1e-8, atol=1e-10)
    samples = 20_000
    glm_mean, glm_var = la.predict(x, method="glm", n_samples=samples, seed=1)
    assert ((glm_mean - out).abs() <= 5 * (f_var / samples).sqrt()).all()
    relative = (glm_var - 0.16 - f_var).abs() / f_var
    assert (relative <= 5 * math.sqrt(2 / samples)).all()


@pytest.mark.parametrize("structure", [*STRUCTURES, "structured"])
def test_samples_have_mean_theta_map_and_covariance_inverse_precision(structure):
    model, data = classification_problem(seed=8)
    names = [n for n, _ in model.named_parameters()]
    x, _ = joined(data)
    theta, out, jac = jacobian(model, x, names)
    ggn = ggn_of_sum(out, jac, "classification")
    if structure == "structured":
        from test_laplace_evidence import _StructuredDense

        chosen = _StructuredDense(ggn / 24)
    else:
        chosen = structure
    la = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), data, structure=chosen, rank=38,
        prior_precision={"0": 0.5, "2": 2.0} if structure != "structured" else 0.8,
    )  # fmt: skip
    reference = torch.linalg.inv(_precision(model, data, la))
    n = 6000
    samples = la.sample(n, seed=11)
    assert samples.shape == (n, len(theta))
    standard = (reference.diagonal() / n).sqrt()
    assert ((samples.mean(dim=0) - theta).abs() <= 5 * standard).all()
    error = (torch.cov(samples.T) - reference).norm()
    expected = ((reference.trace() ** 2 + reference.norm() ** 2) / n).sqrt()
    assert error < 2 * expected


def test_same_seed_same_samples_and_the_global_rng_is_untouched():
    _, _, la = _classifier("diag")
    state = torch.random.get_rng_state()
    first, again = la.sample(5, seed=3), la.sample(5, seed=3)
    assert torch.equal(first, again)
    assert not torch.equal(first, la.sample(5, seed=4))
    x = torch.zeros(2, 3)
    assert torch.equal(la.predict(x, "glm", 10, seed=1), la.predict(x, "glm", 10, seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_reliability_metrics():
    from curvscope.laplace.predictive import reliability

    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    targets = torch.tensor([0, 1, 1, 1])
    found = reliability(probs, targets, bins=10)
    assert found["accuracy"] == 0.75
    expected_nll = -(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.7)) / 4
    assert found["nll"] == pytest.approx(expected_nll)
    # bins: 0.9 -> [0.9,1] correct; 0.8 -> [0.8,0.9) wrong; 0.6 -> correct; 0.7 -> correct
    assert found["ece"] == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)
    assert sum(found["bin_counts"]) == 4
