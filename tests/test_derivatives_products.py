"""jvp, vjp and hvp: the issue's examples, dense references, the adjoint identity, modes."""

import pytest
import torch
from models import CubeWithoutForwardMode
from torch.autograd.functional import hvp as reference_hvp
from torch.autograd.functional import jvp as reference_jvp
from torch.autograd.functional import vjp as reference_vjp

import curvscope


def example_map(x):
    return torch.stack([x[0] + x[1], x[0] * x[1], x[0] ** 2])


def quadratic(x):
    return x[0] ** 2 + x[0] * x[1] + 3 * x[1] ** 2


def smooth_map(x):
    """A random-looking smooth map R^(3, 2) -> R^(4,) with fixed coefficients."""
    weights = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)
    return torch.tanh(weights @ x.reshape(-1)) + x.sum() ** 2


def smooth_loss(x):
    return (torch.sin(x) ** 2).sum() + x.prod() + (x.reshape(-1) @ x.reshape(-1)) ** 2


def test_jvp_example_is_first_column():
    out, tangent = curvscope.jvp(example_map, torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
    assert torch.equal(out, torch.tensor([5.0, 6.0, 4.0]))
    assert torch.equal(tangent, torch.tensor([1.0, 3.0, 4.0]))


def test_vjp_example():
    out, cotangent = curvscope.vjp(
        example_map, torch.tensor([2.0, 3.0]), torch.tensor([1.0, 10.0, 100.0])
    )
    assert torch.equal(out, torch.tensor([5.0, 6.0, 4.0]))
    assert torch.equal(cotangent, torch.tensor([431.0, 21.0]))


@pytest.mark.parametrize("mode", ["auto", "forward-over-reverse", "reverse-over-reverse"])
def test_hvp_example(mode):
    product = curvscope.hvp(
        quadratic, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.5]), mode=mode
    )
    assert torch.equal(product, torch.tensor([2.5, 4.0]))


def test_products_match_autograd_functional():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, generator=generator)
    v = torch.randn(3, 2, generator=generator)
    u = torch.randn(4, generator=generator)
    torch.testing.assert_close(curvscope.jvp(smooth_map, x, v), reference_jvp(smooth_map, x, v))
    torch.testing.assert_close(curvscope.vjp(smooth_map, x, u), reference_vjp(smooth_map, x, u))
    expected = reference_hvp(smooth_loss, x, v)[1]
    for mode in ["auto", "forward-over-reverse", "reverse-over-reverse"]:
        torch.testing.assert_close(curvscope.hvp(smooth_loss, x, v, mode=mode), expected)


def test_adjoint_identity():
    """<u, J v> = <J^T u, v>."""
    generator = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 2, generator=generator), torch.randn(3, 2, generator=generator)
    u = torch.randn(4, generator=generator)
    _, jv = curvscope.jvp(smooth_map, x, v)
    _, jtu = curvscope.vjp(smooth_map, x, u)
    torch.testing.assert_close(torch.dot(u, jv), (jtu * v).sum())


def test_structured_inputs_and_outputs():
    def f(inputs):
        a, b = inputs["a"], inputs["b"]
        return (a * b.sum(), {"c": torch.sin(a).sum()})

    x = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5, -1.0]])}
    v = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([[0.0, 2.0]])}
    out, tangent = curvscope.jvp(f, x, v)
    expected_out, expected_tangent = torch.func.jvp(f, (x,), (v,))
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(tangent, expected_tangent)
    u = (torch.tensor([1.0, -1.0]), {"c": torch.tensor(2.0)})
    _, cotangent = curvscope.vjp(f, x, u)
    assert set(cotangent) == {"a", "b"}
    torch.testing.assert_close(cotangent, torch.func.vjp(f, x)[1](u)[0])


def test_hvp_tuple_input_matches_torch_func():
    def f(inputs):
        a, b = inputs
        return (a**2 * b[0]).sum() + torch.exp(b).sum() * a.sum()

    x = (torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.1]))
    v = (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 1.0]))
    expected = torch.func.jvp(torch.func.grad(f), (x,), (v,))[1]
    for mode in ["auto", "forward-over-reverse", "reverse-over-reverse"]:
        product = curvscope.hvp(f, x, v, mode=mode)
        assert isinstance(product, tuple) and len(product) == 2
        torch.testing.assert_close(product, expected)


def cube_sum(x):
    return CubeWithoutForwardMode.apply(x).sum()


def test_hvp_auto_needs_no_forward_ad():
    x, v = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])
    with pytest.raises(NotImplementedError, match="jvp"):
        curvscope.hvp(cube_sum, x, v, mode="forward-over-reverse")
    assert torch.equal(curvscope.hvp(cube_sum, x, v), torch.tensor([6.0, 12.0]))


def test_scalar_of_shape_one_is_accepted():
    product = curvscope.hvp(lambda x: (x**3).sum().reshape(1), torch.tensor([2.0]), torch.ones(1))
    assert torch.equal(product, torch.tensor([12.0]))
