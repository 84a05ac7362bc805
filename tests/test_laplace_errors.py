"""Bad input to LaplaceApproximation, side effects, and prior tuning on the digits MLP."""

import copy

import numpy as np
import pytest
import torch
from laplace_reference import classification_problem, joined, regression_problem
from torch import nn

import curvscope
from curvscope.laplace.predictive import reliability


@pytest.fixture
def problem():
    return classification_problem(seed=0)


def _make(model, data, **kwargs):
    kwargs.setdefault("structure", "diag")
    return curvscope.LaplaceApproximation(model, nn.CrossEntropyLoss(), data, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prior_precision": 0.0}, ValueError, r"prior_precision=\.\.\.\): expected a prior "),
        ({"prior_precision": -1.0}, ValueError, r"precision > 0"),
        ({"prior_precision": "1"}, TypeError, r"prior_precision=\.\.\.\)"),
        ({"prior_precision": {"0": 1.0}}, ValueError, r"exactly the layers \['0', '2'\]"),
        ({"prior_precision": {"0": 1.0, "2": 0.0}}, ValueError, r"prior_precision\['2'\]"),
        ({"structure": "block"}, ValueError, r"structure=\.\.\.\): expected one of 'kfac', 'full'"),
        ({"structure": torch.eye(3)}, ValueError, r"structure=\.\.\.\)"),
        ({"subset": ["0.weight", "nope"]}, ValueError, r"Unknown names: \['nope'\]"),
        ({"subset": "first_layer"}, TypeError, r"'all', 'last_layer' or a list"),
        ({"subset": []}, ValueError, r"non-empty list"),
        ({"sigma_noise": 0.0}, ValueError, r"sigma_noise=\.\.\.\): expected a number > 0"),
        ({"rank": 0}, ValueError, r"rank=\.\.\.\): expected an integer >= 1"),
        ({"seed": 1.5}, TypeError, r"seed=\.\.\.\)"),
        ({"progress": 1}, TypeError, r"progress=\.\.\.\): expected True or False"),
    ],
)
def test_bad_arguments_raise_clear_errors(problem, kwargs, error, match):
    model, data = problem
    with pytest.raises(error, match=match) as info:
        _make(model, data, **kwargs)
    assert str(info.value).startswith("curvscope.LaplaceApproximation(")


def test_bad_operator_size_and_unsupported_losses(problem):
    model, data = problem
    with pytest.raises(ValueError, match=r"structure=\.\.\.\): expected an operator of shape"):
        _make(model, data, structure=curvscope.DenseOperator(torch.eye(3)))
    for loss in (nn.L1Loss(), nn.NLLLoss(), lambda out, y: out.sum()):
        with pytest.raises(ValueError, match=r"nn\.CrossEntropyLoss \(classification\) or "):
            curvscope.LaplaceApproximation(model, loss, data, structure="diag")
    weighted = nn.CrossEntropyLoss(weight=torch.ones(3))
    with pytest.raises(ValueError, match="without class weights or label smoothing"):
        curvscope.LaplaceApproximation(model, weighted, data, structure="diag")
    with pytest.raises(TypeError, match=r"model=\.\.\.\): expected a torch\.nn\.Module"):
        curvscope.LaplaceApproximation(lambda x: x, nn.CrossEntropyLoss(), data)
    with pytest.raises(TypeError, match=r"data=\.\.\.\)"):
        curvscope.LaplaceApproximation(model, nn.CrossEntropyLoss(), iter(data))


def test_bad_method_arguments(problem):
    model, data = problem
    la = _make(model, data)
    x = joined(data)[0][:3]
    with pytest.raises(ValueError, match=r"predict\(method=\.\.\.\): expected one of 'probit'"):
        la.predict(x, method="laplace")
    with pytest.raises(ValueError, match=r"predict\(n_samples=\.\.\.\)"):
        la.predict(x, method="mc", n_samples=0)
    with pytest.raises(TypeError, match=r"predict\(x=\.\.\.\): expected model inputs"):
        la.predict("images")
    with pytest.raises(ValueError, match=r"optimize_prior_precision\(method=\.\.\.\)"):
        la.optimize_prior_precision("evidence")
    with pytest.raises(ValueError, match=r"optimize_prior_precision\(val_data=\.\.\.\)"):
        la.optimize_prior_precision("gridsearch")
    with pytest.raises(ValueError, match=r"optimize_prior_precision\(grid=\.\.\.\)"):
        la.optimize_prior_precision("gridsearch", val_data=data, grid=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"sample\(n=\.\.\.\)"):
        la.sample(0)
    with pytest.raises(ValueError, match=r"sigma_noise=\.\.\.\)"):
        la.log_marginal_likelihood(sigma_noise=-1.0)
    with pytest.raises(ValueError, match=r"prior_precision=\.\.\.\)"):
        la.log_marginal_likelihood(prior_precision=0.0)
    with pytest.raises(ValueError, match=r"prior_precision=\.\.\.\)"):
        la.prior_precision = -2.0


def test_indefinite_curvature_is_reported():
    model, data = classification_problem(seed=1)
    hessian = curvscope.HessianOperator(model, nn.CrossEntropyLoss(), data)
    la = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), data, structure=hessian, prior_precision=1e-6
    )
    with pytest.raises(ValueError, match="not positive definite"):
        la.log_marginal_likelihood()


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(m, m.training) for m in model.modules()],
        [(p.grad, p.requires_grad) for p in model.parameters()],
    )


@pytest.mark.parametrize("structure", ["full", "diag", "lowrank"])
def test_the_model_is_untouched(structure):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    model.train()
    _, data = classification_problem(seed=2)
    state, flags, grads = _snapshot(model)
    la = _make(model, data, structure=structure, rank=5)
    la.optimize_prior_precision()
    la.optimize_prior_precision("gridsearch", val_data=data, grid=[0.1, 1.0])
    x = joined(data)[0]
    for method in ("probit", "glm", "mc"):
        la.predict(x, method=method, n_samples=3)
    la.sample(2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(m.training == flag for m, flag in flags)
    assert all(
        p.grad is grad and p.requires_grad == req
        for p, (grad, req) in zip(model.parameters(), grads, strict=True)
    )


def _regression_nll(la, data, delta):
    x, y = joined(data)
    la.prior_precision = delta
    mean, variance = la.predict(x)
    return float(0.5 * (torch.log(2 * torch.pi * variance) + (y - mean) ** 2 / variance).mean())


def test_regression_gridsearch_picks_the_best_validation_nll():
    model, data = regression_problem(seed=3)
    la = curvscope.LaplaceApproximation(model, nn.MSELoss(), data, structure="full")
    grid = [0.01, 1.0, 100.0]
    chosen = la.optimize_prior_precision("gridsearch", val_data=data, grid=grid, refine=False)
    scores = [_regression_nll(la, data, delta) for delta in grid]
    best = scores.index(min(scores))
    assert chosen == grid[best]
    # refine: a 17-point grid between the best point's neighbours, never worse than the grid
    refined = la.optimize_prior_precision("gridsearch", val_data=data, grid=grid)
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fine = np.geomspace(low, high, 17)
    fine_scores = [_regression_nll(la, data, float(delta)) for delta in fine]
    expected = float(fine[int(np.argmin(fine_scores))])
    if min(fine_scores) >= scores[best]:
        expected = grid[best]
    assert refined == pytest.approx(expected, rel=1e-12)
    assert _regression_nll(la, data, refined) <= scores[best]


def test_default_grid_extends_towards_the_map_limit_when_still_falling(monkeypatch):
    from curvscope.laplace import approximation

    model, data = regression_problem(seed=3)
    la = curvscope.LaplaceApproximation(model, nn.MSELoss(), data, structure="full")
    passes = []

    def curve(val_data, values, predictive, func):  # falls until 1e6, rises after
        passes.append(list(values))
        return [abs(np.log10(v) - 6.0) for v in values]

    monkeypatch.setattr(la, "_validation_nll", curve)
    chosen = la.optimize_prior_precision("gridsearch", val_data=data, refine=False)
    assert chosen == pytest.approx(1e6, rel=1e-12)
    assert passes == [list(approximation.DEFAULT_GRID), list(approximation.EXTENDED_GRID)]
    # a user's grid is searched as given; an interior optimum needs no extension
    passes.clear()
    assert la.optimize_prior_precision("gridsearch", val_data=data, grid=[1.0, 1e4]) == 1e4
    assert passes[0] == [1.0, 1e4] and len(passes) == 2  # the grid, then its refinement
    monkeypatch.setattr(
        la, "_validation_nll", lambda v, values, p, f: [abs(np.log10(x)) for x in values]
    )
    passes.clear()
    assert la.optimize_prior_precision("gridsearch", val_data=data, refine=False) == 1.0


@pytest.mark.slow
def test_gridsearch_on_digits_validation_is_no_worse_than_the_trained_model():
    from curvscope.report.digits import digits_mlp, load_digits

    x, y = load_digits(dtype=torch.float64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val, test = order[:1000], order[1000:1400], order[1400:]
    model = digits_mlp(seed=0, dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[train]), y[train]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    before = copy.deepcopy(model.state_dict())
    la = curvscope.LaplaceApproximation(
        model, nn.CrossEntropyLoss(), [(x[train], y[train])], structure="full", subset="last_layer"
    )
    la.optimize_prior_precision("gridsearch", val_data=[(x[val], y[val])])
    with torch.no_grad():
        trained = reliability(torch.softmax(model(x[test]), dim=1), y[test])["nll"]
    laplace = reliability(la.predict(x[test]), y[test])["nll"]
    assert laplace <= trained
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_docstring_examples():
    import doctest
    import importlib

    for name in ("curvscope.laplace.approximation", "curvscope.report.digits"):
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, name
