"""HessianFree: Newton-CG against scipy, Martens' HF on the digits MLP, state, bad input."""

import itertools
import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer

import curvscope
from curvscope.optim import HessianFree, StepResult
from curvscope.optim._cg import damped_cg
from curvscope.report.digits import digits_mlp, load_digits

ALPHA = 1e-2  # the L2 penalty inside the loss


def _cancer():
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x), torch.tensor(y, dtype=torch.float64)


class _Regularised(torch.nn.Module):
    """Logistic regression whose output also carries the weights, so that the loss can hold
    the L2 penalty (loss_fn only sees the output)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(30, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        weights = torch.cat([self.linear.weight.reshape(-1), self.linear.bias])
        return torch.cat([self.linear(x), weights.expand(len(x), -1)], dim=1)


def _regularised_loss(output, targets):
    data = F.binary_cross_entropy_with_logits(output[:, 0], targets)
    return data + 0.5 * ALPHA * (output[0, 1:] ** 2).sum()


def _scipy_trust_ncg(x, y):
    def loss_and_graph(w):
        w = torch.tensor(w, requires_grad=True)
        value = F.binary_cross_entropy_with_logits(x @ w[:30] + w[30], y)
        return value + 0.5 * ALPHA * (w**2).sum(), w

    def fun(w):
        value, leaf = loss_and_graph(w)
        return value.item(), torch.autograd.grad(value, leaf)[0].numpy()

    calls = [0]

    def hessp(w, p):
        calls[0] += 1
        value, leaf = loss_and_graph(w)
        (grad,) = torch.autograd.grad(value, leaf, create_graph=True)
        return torch.autograd.grad(grad @ torch.tensor(p), leaf)[0].numpy()

    found = scipy.optimize.minimize(
        fun, np.zeros(31), jac=True, hessp=hessp, method="trust-ncg", options={"gtol": 1e-10}
    )
    assert found.success
    return found.fun, calls[0]


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_newton_cg_reaches_scipy_optimum_with_no_more_products(damping):
    x, y = _cancer()
    best, scipy_products = _scipy_trust_ncg(x, y)
    model = _Regularised()
    opt = HessianFree(model, _regularised_loss, curvature="hessian", damping=damping)
    products, relative, steps = 0, math.inf, 0
    while steps < 15:
        steps += 1
        result = opt.step((x, y))
        products += result.num_matvecs
        relative = (result.new_loss - best) / best
        if relative < 1e-8:
            break
    assert relative < 1e-8 and steps <= 15
    assert products <= 1.2 * scipy_products, (products, scipy_products)
    assert abs(_regularised_loss(model(x), y).item() - result.new_loss) < 1e-12


def _digits(n=400):
    x, y = load_digits(dtype=torch.float64)
    return x[:n], y[:n]


def test_hessian_free_on_digits_lowers_the_loss_and_adapts_damping():
    x, y = _digits()
    model = digits_mlp(seed=0, hidden=16, dtype=torch.float64)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = HessianFree(model, loss_fn, damping=1e-4, max_cg_iters=30)  # too small at first
    results, batches = [], [(x[i : i + 100], y[i : i + 100]) for i in range(0, 400, 100)]
    for step in range(12):
        batch = batches[step % 4]
        before = [p.detach().clone() for p in model.parameters()]
        result = opt.step(batch)
        assert isinstance(result, StepResult)
        with torch.no_grad():
            after = loss_fn(model(batch[0]), batch[1]).item()
        if result.status == "rejected":
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
            assert after == pytest.approx(result.loss, rel=1e-12)
        else:
            assert after < result.loss
            assert after == pytest.approx(result.new_loss, rel=1e-10)
        assert result.num_matvecs >= result.cg_iters >= 1
        results.append(result)
    moves = {"down": 0, "up": 0}
    for now, nxt in itertools.pairwise(results):
        rho = now.reduction_ratio
        if now.status != "rejected" and rho > 0.75:
            assert nxt.damping == pytest.approx(now.damping * 2 / 3)
            moves["down"] += 1
        elif now.status == "rejected" or not rho >= 0.25:
            assert nxt.damping == pytest.approx(now.damping * 1.5)
            moves["up"] += 1
        else:
            assert nxt.damping == now.damping
    assert moves["down"] >= 1 and moves["up"] >= 1, moves
    with torch.no_grad():
        assert loss_fn(model(x), y).item() < 0.5 * math.log(10)


def test_gauss_newton_step_solves_least_squares_and_rejects_at_the_optimum():
    model = torch.nn.Linear(2, 1, bias=False)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([[1.0], [2.0], [0.5]])
    opt = HessianFree(model, torch.nn.MSELoss(), damping=0.0)
    assert opt.step((x, y)).status == "accepted"
    exact = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(model.weight.detach(), exact, rtol=1e-10, atol=1e-12)
    second = opt.step((x, y))  # at the optimum: nothing but rounding is left to gain
    assert second.new_loss >= second.loss * (1 - 1e-12)
    torch.testing.assert_close(model.weight.detach(), exact, rtol=1e-10, atol=1e-12)


def test_a_step_that_cannot_lower_the_loss_is_rejected_and_changes_nothing():
    model = torch.nn.Linear(2, 1)
    x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0], [2.0]])
    l1 = torch.nn.L1Loss()  # piecewise linear: zero curvature, so the damped step is -g/λ
    opt = HessianFree(model, l1, damping=1e-9)
    before = [p.detach().clone() for p in model.parameters()]
    result = opt.step((x, y))
    assert result.status == "rejected" and result.new_loss == result.loss
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert opt.damping == pytest.approx(1.5e-9)


def test_state_dict_round_trip_resumes_exactly():
    x, y = _digits(200)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(x[:100], y[:100]), (x[100:], y[100:])]
    model = digits_mlp(seed=1, hidden=8, dtype=torch.float64)
    opt = HessianFree(model, loss_fn, max_cg_iters=15)
    for step in range(3):
        opt.step(batches[step % 2])
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    expected = [opt.step(batches[step % 2]) for step in range(3, 5)]
    final = [p.detach().clone() for p in model.parameters()]

    resumed = digits_mlp(seed=99, hidden=8, dtype=torch.float64)
    resumed.load_state_dict(saved_model)
    opt2 = HessianFree(resumed, loss_fn, max_cg_iters=15)
    opt2.load_state_dict(saved)
    again = [opt2.step(batches[step % 2]) for step in range(3, 5)]
    assert [r.to_dict() for r in again] == [r.to_dict() for r in expected]
    assert all(torch.equal(a, b) for a, b in zip(final, resumed.parameters(), strict=True))
    assert opt2.num_steps == 5


def test_cg_matches_a_dense_solve_and_keeps_geometric_iterates():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 40, generator=gen))[0]
    matrix = basis @ torch.diag(torch.logspace(-2, 1, 40)) @ basis.T
    gradient = torch.randn(40, generator=gen)
    run = damped_cg(lambda v: matrix @ v, gradient, 0.1, x0=None, max_iters=200, tol=0.0)
    exact = torch.linalg.solve(matrix + 0.1 * torch.eye(40), -gradient)
    torch.testing.assert_close(run.iterates[-1].x, exact, rtol=1e-8, atol=1e-10)
    iterations = [it.iteration for it in run.iterates]
    assert iterations[:6] == [1, 2, 3, 4, 5, 7] and iterations == sorted(set(iterations))
    for it in run.iterates:  # the model value carried along is exact
        phi = 0.5 * it.x @ (matrix + 0.1 * torch.eye(40)) @ it.x + gradient @ it.x
        assert it.phi == pytest.approx(phi.item(), rel=1e-9)
    warm = damped_cg(lambda v: matrix @ v, gradient, 0.1, x0=exact, max_iters=50, tol=5e-4)
    best = 0.5 * gradient @ exact
    assert warm.iterates[0].phi == pytest.approx(best.item(), rel=1e-12)
    torch.testing.assert_close(warm.iterates[-1].x, exact, rtol=1e-9, atol=1e-10)
    bad_start = damped_cg(lambda v: matrix @ v, gradient, 0.1, x0=-exact, max_iters=3, tol=5e-4)
    assert bad_start.iterates[0].phi < 0  # a warm start worse than zero is dropped


def test_public_names():
    assert curvscope.optim.HessianFree is HessianFree
    import curvscope.optim as optim

    assert {"HessianFree", "KFACPreconditioner", "StepResult"} <= set(optim.__all__)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"damping": -1.0}, "optim.HessianFree(damping=...): expected a number >= 0.0, got -1.0"),
        ({"max_cg_iters": 0}, "optim.HessianFree(max_cg_iters=...): expected an integer >= 1"),
        ({"cg_tol": 0.0}, "optim.HessianFree(cg_tol=...): expected a number > 0.0"),
        ({"curvature": "fisher"}, "optim.HessianFree(curvature=...): expected one of 'ggn'"),
        ({"adapt_damping": 1}, "optim.HessianFree(adapt_damping=...): expected True or False"),
    ],
)
def test_bad_input(kwargs, text):
    with pytest.raises((TypeError, ValueError), match=r"^curvscope\." + _escape(text)):
        HessianFree(torch.nn.Linear(2, 1), torch.nn.MSELoss(), **kwargs)


def test_bad_model_and_state():
    with pytest.raises(TypeError, match=r"optim.HessianFree\(model=...\): expected a torch.nn"):
        HessianFree(lambda x: x, torch.nn.MSELoss())
    opt = HessianFree(torch.nn.Linear(2, 1), torch.nn.MSELoss())
    with pytest.raises(TypeError, match=r"load_state_dict\(state=...\): expected a dict"):
        opt.load_state_dict({"damping": 1.0})
    state = opt.state_dict() | {"direction": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"expected None or a \(3,\) tensor"):
        opt.load_state_dict(state)


def _escape(text):
    import re

    return re.escape(text)


@pytest.mark.parametrize("name", ["curvscope.optim.hessian_free", "curvscope.optim.kfac"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_step_touches_parameters_only():
    x, y = _digits(100)
    model = digits_mlp(seed=0, hidden=8, dtype=torch.float64).train()
    buffers_before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    HessianFree(model, torch.nn.CrossEntropyLoss()).step((x, y))
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert any(not torch.equal(buffers_before[k], v) for k, v in model.state_dict().items())
