"""Every reduction="mean" loss is the dataset loss as torch defines it, whatever the batching;
GGN and Fisher for every twice-differentiable torch loss; callables' reduction; Fisher scale.

References are dense float64 matrices of the loss over the whole data in ONE batch
(torch.autograd.functional), against operators on uneven batches and micro-batches.
"""

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian

import curvscope

F64 = torch.float64
N, C, T = 8, 3, 4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class _Sequence(nn.Module):
    """(N, 2, T) inputs -> (N, C, T) outputs: a pointwise layer, tanh, a width-3 convolution."""

    def __init__(self, last=None):
        super().__init__()
        self.first = nn.Conv1d(2, 4, 1)
        self.second = nn.Conv1d(4, C, 3, padding=1)
        self.last = last or nn.Identity()

    def forward(self, x):
        return self.last(self.second(torch.tanh(self.first(x))))


def _model(last=None, seed=0):
    model = _Sequence(last).double().eval()
    gen = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=gen, dtype=F64))
    return model


def _split(x, y, sizes):
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def _theta_fn(model, x):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def output(t):
        pieces = t.split([s.numel() for s in shapes])
        views = [v.view(s) for v, s in zip(pieces, shapes, strict=True)]
        params = dict(zip(names, views, strict=True))
        return torch.func.functional_call(model, params, (x,))

    return theta, output


def _references(model, loss_fn, x, y):
    """Dense Hessian and GGN of loss_fn over all the data in one batch."""
    theta, output = _theta_fn(model, x)
    dense_h = hessian(lambda t: loss_fn(output(t), y), theta)
    out = output(theta)
    jac = jacobian(output, theta).reshape(out.numel(), -1)
    loss_h = hessian(lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1))
    return dense_h, jac.T @ loss_h @ jac, loss_fn(out, y).item()


def _targets(kind, seed=1):
    gen = _gen(seed)
    y = torch.randint(0, C, (N, T), generator=gen)
    if kind == "ignore":
        y[torch.rand(N, T, generator=gen) < 0.3] = -100
        y[5] = -100  # example 5 is ignored entirely: its batch may count zero
    return y


CE_CASES = {
    "weight": (nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=F64)), "plain"),
    "label_smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), "plain"),
    "ignore_index": (nn.CrossEntropyLoss(), "ignore"),
    "weight_ignore_smoothing": (
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.5], dtype=F64), label_smoothing=0.1),
        "ignore",
    ),
    "weight_sum": (
        nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=F64), reduction="sum"),
        "ignore",
    ),
}


@pytest.mark.parametrize("name", list(CE_CASES))
def test_weighted_and_masked_cross_entropy_is_exact_for_any_batching(name):
    loss_fn, targets = CE_CASES[name]
    model = _model()
    x = torch.randn(N, 2, T, generator=_gen(2), dtype=F64)
    y = _targets(targets)
    dense_h, dense_g, value = _references(model, loss_fn, x, y)
    v = torch.randn(dense_h.shape[0], generator=_gen(3), dtype=F64)
    for data, size in [
        ((x, y), 1),
        ((x, y), 2),
        (_split(x, y, [3, 1, 4]), 3),
        (_split(x, y, [5, 1, 2]), None),  # batch 1 is example 5, every target ignored
    ]:
        hess = curvscope.HessianOperator(model, loss_fn, data, max_batch_size=size)
        torch.testing.assert_close(hess @ v, dense_h @ v, rtol=1e-10, atol=1e-12)
        ggn = curvscope.GGNOperator(model, loss_fn, data, max_batch_size=size)
        torch.testing.assert_close(ggn @ v, dense_g @ v, rtol=1e-10, atol=1e-12)
        assert abs(hess.loss() - value) <= 1e-12 * abs(value)
    torch.testing.assert_close(ggn.to_dense(), dense_g, rtol=1e-10, atol=1e-12)


def test_nll_loss_with_class_weights_is_exact_for_any_batching():
    loss_fn = nn.NLLLoss(weight=torch.tensor([0.3, 1.0, 2.5], dtype=F64))
    model = _model(nn.LogSoftmax(dim=1))
    x = torch.randn(N, 2, T, generator=_gen(4), dtype=F64)
    y = _targets("ignore", seed=5)
    dense_h, _, value = _references(model, loss_fn, x, y)
    theta, output = _theta_fn(model, x)
    for size in (1, 2, 3):
        op = curvscope.HessianOperator(model, loss_fn, _split(x, y, [3, 5]), max_batch_size=size)
        torch.testing.assert_close(op.to_dense(), dense_h, rtol=1e-10, atol=1e-12)
        assert abs(op.loss() - value) <= 1e-12 * abs(value)
        _, gradient = op.gradient()
        expected = torch.func.grad(lambda t: loss_fn(output(t), y))(theta)
        torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-13)


def test_all_targets_ignored_is_refused():
    model = _model()
    x = torch.randn(2, 2, T, generator=_gen(4), dtype=F64)
    op = curvscope.GGNOperator(model, nn.CrossEntropyLoss(), (x, torch.full((2, T), -100)))
    with pytest.raises(ValueError, match=r"GGNOperator\(data=...\): CrossEntropyLoss averages"):
        op.num_examples


# -- point 2: GGN and Fisher for every loss torch can differentiate twice -----------------------


def _flat_case(seed=0):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)).double().eval()
    gen = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    x = torch.randn(7, 3, generator=gen, dtype=F64)
    return model, x, gen


def _loss_cases():
    gen = _gen(10)
    floats = torch.randn(7, C, generator=gen, dtype=F64)
    probs = torch.rand(7, C, generator=gen, dtype=F64)
    signs = torch.where(torch.rand(7, C, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    return {
        "huber": (nn.HuberLoss(delta=0.5), floats),
        "smooth_l1": (nn.SmoothL1Loss(beta=0.7), floats),
        "soft_margin": (nn.SoftMarginLoss(), signs),
        "multilabel_soft_margin": (nn.MultiLabelSoftMarginLoss(), (probs > 0.5).to(F64)),
        "bce_with_logits": (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 0.5])), probs),
        "bce": (lambda o, y: nn.functional.binary_cross_entropy(torch.sigmoid(o), y), probs),
        "kl_div_batchmean": (
            lambda o, y: nn.KLDivLoss(reduction="batchmean")(o.log_softmax(1), y),
            probs / probs.sum(1, keepdim=True),
        ),
        "kl_div_linear": (nn.KLDivLoss(reduction="batchmean"), probs),  # linear in the output
        "poisson_nll": (nn.PoissonNLLLoss(), probs * 3),
        "l1": (nn.L1Loss(), floats),
        "mse_sum": (nn.MSELoss(reduction="sum"), floats),
    }


@pytest.mark.parametrize("name", list(_loss_cases()))
def test_ggn_and_empirical_fisher_for_any_twice_differentiable_loss(name):
    loss_fn, y = _loss_cases()[name]
    model, x, _ = _flat_case()
    reduction = "mean" if name in ("bce", "kl_div_batchmean") else None
    theta, output = _theta_fn(model, x)
    out = output(theta)
    jac = jacobian(output, theta).reshape(out.numel(), -1)
    loss_h = hessian(lambda o: loss_fn(o.reshape(out.shape), y), out.reshape(-1))
    expected_ggn = jac.T @ loss_h @ jac
    data = _split(x, y, [4, 3])
    ggn = curvscope.GGNOperator(model, loss_fn, data, max_batch_size=3, reduction=reduction)
    torch.testing.assert_close(ggn.to_dense(), expected_ggn, rtol=1e-10, atol=1e-12)
    v = torch.linspace(-1, 1, ggn.shape[0], dtype=F64)
    torch.testing.assert_close(ggn @ v, expected_ggn @ v, rtol=1e-10, atol=1e-12)
    # empirical Fisher: (1/Z) Σ_n g_n g_nᵀ, g_n the gradient of example n's summed terms
    leaf = out.detach().requires_grad_(True)
    summed_total = torch.autograd.grad(loss_fn(leaf, y), leaf)[0]  # (1/Z) ∂S/∂output
    z = _normaliser(name, y)
    per_example = torch.einsum("nc,ncp->np", summed_total * z, jac.reshape(7, C, -1))
    expected_fisher = per_example.T @ per_example / z
    fisher = curvscope.FisherOperator(model, loss_fn, data, reduction=reduction)
    torch.testing.assert_close(fisher.to_dense(), expected_fisher, rtol=1e-9, atol=1e-12)


def _normaliser(name, y):
    if name == "mse_sum":
        return 1.0
    if name in ("multilabel_soft_margin", "bce_linear", "kl_div_batchmean", "kl_div_linear"):
        return float(y.shape[0])
    if name == "bce":  # a callable: averaged over examples (its own mean over C is inside)
        return float(y.shape[0])
    return float(y.numel())


@pytest.mark.parametrize(
    "loss_fn", [nn.MultiMarginLoss(), nn.MultiMarginLoss(p=2)], ids=["p1", "p2"]
)
@pytest.mark.parametrize("cls", [curvscope.GGNOperator, curvscope.HessianOperator])
def test_losses_torch_cannot_differentiate_twice_name_the_loss(cls, loss_fn):
    model, x, gen = _flat_case()
    y = torch.randint(0, C, (7,), generator=gen)
    op = cls(model, loss_fn, (x, y))
    with pytest.raises(ValueError, match=r"\(loss_fn=...\): torch cannot take the second.*Multi"):
        op @ torch.ones(op.shape[0], dtype=F64)
    fisher = curvscope.FisherOperator(model, loss_fn, (x, y))  # first derivatives only
    assert torch.isfinite(fisher @ torch.ones(op.shape[0], dtype=F64)).all()


# -- point 3: a plain callable's reduction is detected, never guessed ---------------------------


def test_summing_callable_over_uneven_batches_is_detected():
    model, x, gen = _flat_case()
    y = torch.randn(7, C, generator=gen, dtype=F64)
    summed = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    averaged = lambda o, t: ((o - t) ** 2).sum(1).mean()  # noqa: E731
    theta, output = _theta_fn(model, x)
    for loss_fn, expected_reduction in [(summed, "sum"), (averaged, "mean")]:
        dense = hessian(lambda t: loss_fn(output(t), y), theta)  # noqa: B023
        op = curvscope.HessianOperator(model, loss_fn, _split(x, y, [5, 1, 1]))
        torch.testing.assert_close(op.to_dense(), dense, rtol=1e-10, atol=1e-12)
        assert op.reduction == expected_reduction


def test_callable_reduction_that_cannot_be_told_asks_for_reduction():
    model, x, gen = _flat_case()
    y = torch.randn(7, C, generator=gen, dtype=F64)
    curved = lambda o, t: ((o - t) ** 2).sum() ** 1.5  # noqa: E731
    op = curvscope.GGNOperator(model, curved, (x, y))
    with pytest.raises(ValueError, match=r"\(reduction=...\).*neither the sum.*reduction='sum'"):
        op.num_examples
    singles = _split(x, y, [1] * 7)
    op = curvscope.GGNOperator(model, lambda o, t: ((o - t) ** 2).sum(), singles)
    with pytest.raises(ValueError, match=r"\(reduction=...\).*No batch holds two examples"):
        op @ torch.ones(op.shape[0], dtype=F64)
    op = curvscope.GGNOperator(model, curved, singles, reduction="sum")
    assert op.num_examples == 7 and op.reduction == "sum"


# -- point 4: Fisher conventions --------------------------------------------------------------


@pytest.mark.slow
def test_fisher_kinds_agree_in_scale_with_the_ggn_on_sequences():
    """(N, C, T) cross-entropy: E[empirical Fisher at model-drawn labels] = GGN = E[MC Fisher]."""
    model = _model(seed=3)
    copies = 6000
    x = torch.randn(2, 2, T, generator=_gen(6), dtype=F64)
    loss_fn = nn.CrossEntropyLoss()
    ggn = curvscope.GGNOperator(model, loss_fn, (x, torch.zeros(2, T, dtype=torch.long)))
    dense = ggn.to_dense()
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).movedim(1, -1).reshape(-1, C)
    labels = torch.multinomial(probs, copies, replacement=True, generator=_gen(7))
    y = labels.T.reshape(copies, 2, T).reshape(-1, T)  # copy c of example n: row 2c + n
    xs = x.repeat(copies, 1, 1)
    empirical = curvscope.FisherOperator(model, loss_fn, (xs, y)).to_dense()
    mc = curvscope.FisherOperator(
        model, loss_fn, (x, y[:2]), kind="monte_carlo", num_samples=copies, seed=2
    ).to_dense()
    for fisher in (empirical, mc):
        assert ((fisher - dense).norm() / dense.norm()).item() < 0.08
    # the old convention (per-example mean over positions) would be GGN / T: far from this
    assert ((empirical / T - dense).norm() / dense.norm()).item() > 0.5
