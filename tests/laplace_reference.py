"""Dense references for the Laplace tests: Jacobians by torch.func, the GGN of the summed
negative log-likelihood, the evidence formula and the probit predictive, all in float64."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from models import DTYPE
from torch import nn
from torch.func import functional_call, jacrev


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_mlp(outputs: int, seed: int) -> nn.Module:
    gen = _generator(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, outputs)).to(DTYPE)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.7 * torch.randn(param.shape, generator=gen, dtype=DTYPE))
    return model


def classification_problem(seed: int = 0, n: int = 24, classes: int = 3):
    gen = _generator(seed + 100)
    x = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=gen)
    return tiny_mlp(classes, seed), [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


def regression_problem(seed: int = 0, n: int = 20, outputs: int = 2):
    gen = _generator(seed + 200)
    x = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    y = torch.randn(n, outputs, generator=gen, dtype=DTYPE)
    return tiny_mlp(outputs, seed), [(x[:7], y[:7]), (x[7:], y[7:])]


def joined(data):
    return torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])


def jacobian(model: nn.Module, x: torch.Tensor, names: Sequence[str]):
    """(θ, outputs (N, K), J (N, K, P)) in eval mode, θ over ``names``."""
    named = dict(model.named_parameters())
    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    shapes = [named[n].shape for n in names]
    was_training = model.training
    model.eval()

    def output(t: torch.Tensor) -> torch.Tensor:
        pieces = t.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        return functional_call(model, params, (x,)).reshape(len(x), -1)

    out, jac = output(theta).detach(), jacrev(output)(theta).detach()
    model.train(was_training)
    return theta, out, jac


def ggn_of_sum(out: torch.Tensor, jac: torch.Tensor, kind: str, sigma: float = 1.0):
    """Σ_n J_nᵀ (∂²(−log p(y_n|f))/∂f²) J_n."""
    if kind == "classification":
        p = torch.softmax(out, dim=1)
        hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("nkp,nkl,nlq->pq", jac, hess, jac)
    return torch.einsum("nkp,nkq->pq", jac, jac) / sigma**2


def log_likelihood(out, y, kind: str, sigma: float = 1.0) -> float:
    if kind == "classification":
        return float(-nn.functional.cross_entropy(out, y, reduction="sum"))
    normal = torch.distributions.Normal(out, sigma)
    return float(normal.log_prob(y.reshape(out.shape)).sum())


def evidence(loglik: float, precision: torch.Tensor, prior: torch.Tensor, theta) -> float:
    """loglik − ½[log det Λ − Σ log δ] − ½ Σ δ θ² for a (P,) prior vector."""
    logdet = torch.linalg.slogdet(precision)[1]
    return float(loglik - 0.5 * (logdet - prior.log().sum()) - 0.5 * (prior * theta**2).sum())


def probit(out: torch.Tensor, jac: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    covariance = torch.einsum("nkp,pq,nlq->nkl", jac, torch.linalg.inv(precision), jac)
    variance = covariance.diagonal(dim1=1, dim2=2)
    return torch.softmax(out / torch.sqrt(1 + math.pi / 8 * variance), dim=1)
