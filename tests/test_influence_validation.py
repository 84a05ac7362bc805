"""InfluenceFunction against what it predicts: leave-one-out retraining, and mislabelled data."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score
from torch import nn

import curvscope
from curvscope.report.digits import digits_mlp, load_digits

L2 = 0.05  # the weight decay λ‖θ‖²/2 of the logistic regression
N_TRAIN, N_REMOVED, N_TEST = 400, 40, 8


class _Logits(nn.Module):
    """Logistic regression returning one logit per example."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(len(theta) - 1, 1).double()
        with torch.no_grad():
            self.linear.weight.copy_(theta[:-1][None])
            self.linear.bias.copy_(theta[-1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def _breast_cancer():
    bunch = load_breast_cancer()
    x = torch.tensor(bunch.data, dtype=torch.float64)
    y = torch.tensor(bunch.target, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:N_TRAIN], order[N_TRAIN:][:N_TEST]
    return (x[train], y[train]), (x[test], y[test])


def _fit(x, y, weights, theta):
    """argmin (1/n) Σ w_j ℓ_j + λ‖θ‖²/2 by Newton's method, to rounding (n fixed at N_TRAIN)."""
    features = torch.cat([x, torch.ones(len(y), 1, dtype=x.dtype)], dim=1)
    for _ in range(30):
        p = torch.sigmoid(features @ theta)
        gradient = features.T @ (weights * (p - y)) / N_TRAIN + L2 * theta
        if float(gradient.norm()) < 1e-14:
            break
        curvature = features.T @ (features * (weights * p * (1 - p))[:, None]) / N_TRAIN
        theta = theta - torch.linalg.solve(curvature + L2 * torch.eye(len(theta)), gradient)
    return theta


def _test_losses(theta, x, y):
    logits = x @ theta[:-1] + theta[-1]
    return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")


@pytest.fixture(scope="module")
def leave_one_out():
    """Actual changes of the test losses when each of 40 training points is removed."""
    with torch.random.fork_rng(devices=[]):
        torch.set_default_dtype(torch.float64)
        (x, y), test = _breast_cancer()
        theta = _fit(x, y, torch.ones(N_TRAIN), torch.zeros(x.shape[1] + 1))
        removed = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(1))[:N_REMOVED]
        base = _test_losses(theta, *test)
        changes = []
        for j in removed:
            weights = torch.ones(N_TRAIN)
            weights[j] = 0.0
            changes.append(_test_losses(_fit(x, y, weights, theta), *test) - base)
    return theta, (x, y), test, removed, torch.stack(changes, dim=1)


def test_scores_predict_leave_one_out_retraining(leave_one_out):
    theta, train, test, removed, actual = leave_one_out
    model, loss = _Logits(theta), nn.BCEWithLogitsLoss()
    scores = {}
    for solver in ("exact", "cg"):
        influence = curvscope.InfluenceFunction(
            model, loss, [train], curvature="hessian", damping=L2, solver=solver, tol=1e-12
        )
        scores[solver] = influence.scores(test)
        predicted = scores[solver][:, removed]
        rho = [spearmanr(predicted[i], actual[i]).statistic for i in range(N_TEST)]
        slope = float((predicted * actual).sum() / (predicted * predicted).sum())
        assert np.mean(rho) >= 0.99 and min(rho) >= 0.95, rho
        assert 0.9 <= slope <= 1.1, slope
    scale = float(scores["exact"].abs().max())
    assert float((scores["exact"] - scores["cg"]).abs().max()) <= 1e-6 * scale
    assert influence.solver_status.status == "converged"


@pytest.mark.slow
def test_self_influence_finds_flipped_labels_better_than_gradient_similarity():
    inputs, labels = load_digits(dtype=torch.float64)
    inputs, labels = inputs[:500], labels[:500]
    generator = torch.Generator().manual_seed(0)
    flipped = torch.randperm(500, generator=generator)[:50]
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + torch.randint(1, 10, (50,), generator=generator)) % 10
    model = digits_mlp(seed=0, hidden=16, dtype=torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), noisy).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    truth = torch.zeros(500)
    truth[flipped] = 1.0
    auc = {}
    for curvature in ("ggn", "identity"):
        influence = curvscope.InfluenceFunction(
            model, nn.CrossEntropyLoss(), [(inputs, noisy)], curvature=curvature
        )
        auc[curvature] = roc_auc_score(truth.numpy(), influence.self_influence().numpy())
    assert auc["ggn"] >= 0.95, auc
    assert auc["ggn"] >= auc["identity"], auc
