"""Normalisation layers inside derivative and the batch forms: exact at every order.

torch's fused layer/batch/instance norm kernels have wrong nested forward-mode rules and backward
kernels that cannot be vmapped; curvscope computes them from elementary operations there.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import curvscope
from curvscope.derivatives._norms import composite_norms

NORMS = {
    "layer_norm": lambda: nn.LayerNorm(3),
    "layer_norm_2d_no_affine": lambda: nn.LayerNorm((2, 3), elementwise_affine=False),
    "batch_norm_train": lambda: nn.BatchNorm1d(2, track_running_stats=False),
    "batch_norm_eval": lambda: nn.BatchNorm1d(2).eval(),
    "instance_norm": lambda: nn.InstanceNorm1d(2, affine=True),
}


def _network(norm: str) -> tuple[nn.Module, torch.Tensor]:
    """Linear -> norm -> tanh on inputs of shape (4, 2, 3), with random (seeded) buffers."""
    generator = torch.Generator().manual_seed(0)
    layer = NORMS[norm]().double()
    model = nn.Sequential(nn.Linear(3, 3), layer, nn.Tanh()).double()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    return model, torch.randn(4, 2, 3, generator=generator, dtype=torch.float64)


def _loss(model: nn.Module, inputs: torch.Tensor):
    names = [name for name, _ in model.named_parameters()]

    def loss(vector):
        params = curvscope.flatten({n: p for n, p in model.named_parameters()})[1](vector)
        return (functional_call(model, params, (inputs,)) ** 3).sum()

    vector = curvscope.flatten({n: p.detach() for n, p in model.named_parameters()})[0]
    assert len(names) >= 2
    return loss, vector


@pytest.mark.parametrize("norm", NORMS)
def test_composite_values_equal_torch(norm):
    model, inputs = _network(norm)
    with torch.no_grad():
        expected = model(inputs)
        with composite_norms():
            result = model(inputs)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_second_and_third_directional_derivatives_are_exact(norm):
    """Order 2 is v^T H v (reverse over reverse); order 3 the difference quotient of order 2."""
    model, inputs = _network(norm)
    loss, w = _loss(model, inputs)
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = v / v.norm()

    def second(point):
        return v @ torch.autograd.functional.hessian(loss, point) @ v

    d2 = curvscope.derivative(loss, w, order=2, direction=v)
    torch.testing.assert_close(d2, second(w), rtol=1e-10, atol=1e-10)
    d3 = curvscope.derivative(loss, w, order=3, direction=v)

    def quotient(step):
        return (second(w + step * v) - second(w - step * v)) / (2 * step)

    richardson = (4 * quotient(5e-5) - quotient(1e-4)) / 3  # error O(step^4)
    torch.testing.assert_close(d3, richardson, rtol=1e-7, atol=1e-7)


def test_layer_norm_second_derivative_was_wrong_in_torch():
    """The reason for the composites: torch's nested JVP through F.layer_norm is off."""
    model, inputs = _network("layer_norm")
    loss, w = _loss(model, inputs)
    v = torch.ones_like(w)
    along = lambda point: torch.func.jvp(loss, (point,), (v,))[1]  # noqa: E731
    torch_nested = torch.func.jvp(along, (w,), (v,))[1]
    exact = curvscope.derivative(loss, w, order=2, direction=v)
    # if torch fixes pytorch/pytorch#196700 this fails: the composites may then be dropped
    assert not torch.allclose(torch_nested, exact, rtol=1e-6)


def _per_example(inputs):
    """f of one example (2, 3): a layer norm whose weight depends on the example."""
    weight = torch.linspace(0.5, 1.5, 9, dtype=torch.float64).reshape(3, 3)

    def f(x):
        h = x @ weight
        return nn.functional.layer_norm(h, (3,), x[0] + 1.0, x[1])

    return f


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
def test_batch_jacobian_through_layer_norm(mode):
    """First order, and the Jacobian of a gradient (second order, vmapped) through layer_norm."""
    xs = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    f = _per_example(xs)
    expected = torch.stack([torch.autograd.functional.jacobian(f, x) for x in xs])
    torch.testing.assert_close(curvscope.batch_jacobian(f, xs, mode=mode), expected)

    def loss(x):
        return (f(x) ** 3).sum()

    expected = torch.stack([torch.autograd.functional.hessian(loss, x) for x in xs])
    result = curvscope.batch_jacobian(torch.func.grad(loss), xs, mode=mode)
    torch.testing.assert_close(result, expected)


def test_batch_hessian_through_layer_and_batch_norm():
    xs = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f = _per_example(xs)

    def g(x):
        normalised = nn.functional.batch_norm(x, None, None, training=True)
        return (f(x) ** 3).sum() + (normalised**3).sum()

    expected = torch.stack([torch.autograd.functional.hessian(g, x) for x in xs])
    torch.testing.assert_close(curvscope.batch_hessian(g, xs), expected)


def test_batch_norm_updating_running_statistics_is_left_to_torch():
    layer, inputs = nn.BatchNorm1d(2).double(), torch.randn(4, 2, 3, dtype=torch.float64)
    twin = nn.BatchNorm1d(2).double()
    with torch.no_grad():
        expected = twin(inputs)
        with composite_norms():
            result = layer(inputs)
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    torch.testing.assert_close(layer.running_mean, twin.running_mean, rtol=0, atol=0)
    assert layer.num_batches_tracked.item() == 1
