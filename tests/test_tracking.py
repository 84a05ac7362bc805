"""SharpnessTracker: eigenvalues against dense references, warm starts, the edge of stability."""

import re

import matplotlib
import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvscope
from curvscope import SharpnessRecord, SharpnessTracker
from curvscope.report.digits import digits_mlp, load_digits

matplotlib.use("Agg")


def _digits(n, *, mse=False):
    x, y = load_digits(dtype=torch.float64)
    x, y = x[:n], y[:n]
    if mse:
        return x, nn.functional.one_hot(y, 10).double(), nn.MSELoss()
    return x, y, nn.CrossEntropyLoss()


def _dense_hessian(model, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        pieces = flat.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        return loss_fn(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, theta, vectorize=True)


def _gd(model, loss_fn, x, y, lr):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def test_records_match_the_dense_hessian_within_their_residuals():
    x, y, loss_fn = _digits(120)
    model = digits_mlp(seed=0, hidden=4, dtype=torch.float64)  # 310 parameters
    tracker = SharpnessTracker(model, loss_fn, (x, y), k=2, every=10, tol=1e-6, trace=60)
    step = _gd(model, loss_fn, x, y, lr=0.5)
    for t in range(31):
        record = tracker.update(t)
        if t % 10:
            assert record is None
            step()
            continue
        assert isinstance(record, SharpnessRecord) and record.step == t
        exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, x, y))
        top = exact.flip(0)[:2]
        assert torch.all((record.eigenvalues - top).abs() <= record.residual_norms + 1e-12)
        assert record.sharpness == pytest.approx(top[0].item(), rel=1e-8)
        assert record.status == "converged"
        low, high = record.trace_interval
        assert low <= exact.sum().item() <= high
        step()
    assert [r.step for r in tracker.history] == [0, 10, 20, 30]
    assert tracker.history[-1].to_dict()["kind"] == "SharpnessRecord"


def _trajectory_products(warm_start, steps=100):
    """Progressive sharpening (GD at lr 0.5, sharpness well below 2/lr), a record every 5 steps."""
    x, y, loss_fn = _digits(300, mse=True)
    model = digits_mlp(seed=0, hidden=32, dtype=torch.float64)
    tracker = SharpnessTracker(model, loss_fn, (x, y), every=5, warm_start=warm_start)
    step = _gd(model, loss_fn, x, y, lr=0.5)
    for t in range(steps + 1):
        tracker.update(t)
        step()
    return [r.num_matvecs for r in tracker.history], [r.sharpness for r in tracker.history]


def test_warm_start_needs_at_most_half_the_products_of_cold_starts():
    warm, warm_values = _trajectory_products(True)
    cold, cold_values = _trajectory_products(False)
    assert warm[0] == cold[0]  # the first record starts cold either way
    assert sum(warm) <= 0.5 * sum(cold), (warm, cold)
    torch.testing.assert_close(
        torch.tensor(warm_values), torch.tensor(cold_values), rtol=1e-3, atol=0
    )


@pytest.mark.slow
def test_edge_of_stability_sharpness_rises_to_two_over_lr_and_hovers():
    """Cohen et al. 2021 at small scale: full-batch GD, MSE, a 64-32-10 tanh MLP, 500 digits."""
    x, y, loss_fn = _digits(500, mse=True)
    curves = {}
    for lr, steps in ((0.5, 400), (0.8, 800)):
        model = digits_mlp(seed=0, hidden=32, dtype=torch.float64)
        tracker = SharpnessTracker(model, loss_fn, (x, y), every=20)
        step = _gd(model, loss_fn, x, y, lr=lr)
        losses = []
        for t in range(steps + 1):
            tracker.update(t)
            losses.append(step())
        curves[lr] = torch.tensor([r.sharpness for r in tracker.history])
        assert losses[-1] < 0.5 * losses[0]  # still training, non-monotonically at the edge
    edge, threshold = curves[0.8], 2.0 / 0.8
    assert edge[0] < 0.8 * threshold and edge.max() >= 0.95 * threshold  # rises to 2/η ...
    late = edge[-12:]  # steps 580-800
    assert torch.all((late > 0.9 * threshold) & (late < 1.2 * threshold))  # ... and hovers
    assert curves[0.5].max() < 0.75 * (2.0 / 0.5)  # at a smaller rate, far below its 2/η


def test_plot_draws_the_sharpness_and_the_two_over_lr_line():
    x, y, loss_fn = _digits(50)
    model = digits_mlp(seed=0, hidden=4, dtype=torch.float64)
    tracker = SharpnessTracker(model, loss_fn, (x, y), every=1, k=2)
    for t in range(3):
        tracker.update(t)
    figure = tracker.plot(lr=0.25)
    assert isinstance(figure, matplotlib.figure.Figure)
    ax = figure.axes[0]
    assert any(list(line.get_ydata()) == [8.0, 8.0] for line in ax.get_lines())
    no_line = tracker.plot()
    assert not any(list(line.get_ydata()) == [8.0, 8.0] for line in no_line.axes[0].get_lines())
    matplotlib.pyplot.close("all")


def test_history_is_a_copy_and_off_steps_give_none():
    x, y, loss_fn = _digits(30)
    model = digits_mlp(seed=0, hidden=4, dtype=torch.float64)
    tracker = curvscope.SharpnessTracker(model, loss_fn, (x, y), every=3)
    assert [tracker.update(t) is None for t in range(4)] == [False, True, True, False]
    history = tracker.history
    history.clear()
    assert len(tracker.history) == 2


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"every": 0}, "SharpnessTracker(every=...): expected an integer >= 1, got 0"),
        ({"k": 0}, "SharpnessTracker(k=...): expected an integer >= 1, got 0"),
        ({"tol": 0.0}, "SharpnessTracker(tol=...): expected a number in (0.0, 1.0), got 0.0"),
        ({"trace": 2}, "SharpnessTracker(trace=...): expected an integer >= 3, got 2"),
        ({"trace": "yes"}, "SharpnessTracker(trace=...): expected True, False or a number"),
        ({"warm_start": None}, "SharpnessTracker(warm_start=...): expected True or False"),
    ],
)
def test_bad_input(kwargs, text):
    x, y, loss_fn = _digits(10)
    with pytest.raises((TypeError, ValueError), match="^curvscope." + re.escape(text)):
        SharpnessTracker(digits_mlp(hidden=2), loss_fn, (x.float(), y), **kwargs)


def test_bad_step_and_lr():
    x, y, loss_fn = _digits(10)
    tracker = SharpnessTracker(digits_mlp(hidden=2, dtype=torch.float64), loss_fn, (x, y))
    with pytest.raises(ValueError, match=r"SharpnessTracker.update\(step=...\): expected an"):
        tracker.update(-1)
    with pytest.raises(ValueError, match=r"SharpnessTracker.plot\(lr=...\): expected a number > 0"):
        tracker.plot(lr=0.0)


def test_docstring_example():
    import doctest

    import curvscope.tracking

    result = doctest.testmod(curvscope.tracking)
    assert result.attempted > 0 and result.failed == 0
