"""derivative: higher-order directional derivatives by nested forward mode."""

import math

import pytest
import torch

import curvscope


@pytest.mark.parametrize("order, expected", [(1, 27.0), (2, 18.0), (3, 6.0), (4, 0.0)])
def test_cube_at_three(order, expected):
    assert curvscope.derivative(lambda x: x**3, torch.tensor(3.0), order=order).item() == expected


def test_high_order_of_exponential_and_sine():
    x = torch.tensor(0.7)
    for order in range(1, 7):
        value = curvscope.derivative(torch.exp, x, order=order)
        torch.testing.assert_close(value, torch.exp(x))
        sine = curvscope.derivative(torch.sin, x, order=order)
        torch.testing.assert_close(sine, torch.sin(x + order * math.pi / 2))


def test_directional_second_derivative_is_quadratic_form():
    def f(x):
        return (torch.sin(x) * x.sum()).sum()

    x = torch.randn(4, generator=torch.Generator().manual_seed(0))
    v = torch.randn(4, generator=torch.Generator().manual_seed(1))
    second = curvscope.derivative(f, x, order=2, direction=v)
    torch.testing.assert_close(second, v @ curvscope.hessian(f, x) @ v)
    first = curvscope.derivative(f, x, order=1, direction=v)
    torch.testing.assert_close(first, curvscope.jvp(f, x, v)[1])


def test_third_order_matches_nested_jacobians():
    def f(x):
        return torch.exp(x[0]) * x[1] ** 2 + x[0] * x[1] ** 3

    x = torch.tensor([0.3, -0.8])
    v = torch.tensor([1.5, 0.5])
    tensor = torch.func.jacfwd(torch.func.jacfwd(torch.func.jacrev(f)))(x)
    expected = torch.einsum("ijk,i,j,k->", tensor, v, v, v)
    torch.testing.assert_close(curvscope.derivative(f, x, order=3, direction=v), expected)


def test_structured_input_and_output():
    def f(inputs):
        return {"p": inputs["a"] ** 2 * inputs["b"], "q": (inputs["b"] ** 3,)}

    x = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    v = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor(1.0)}
    result = curvscope.derivative(f, x, order=2, direction=v)
    # d2/dt2 (a+t v_a)^2 (b+t) = 2 v_a^2 b + 4 a v_a; d2/dt2 (b+t)^3 = 6 b
    torch.testing.assert_close(result["p"], torch.tensor([2 * 3.0 + 4 * 1.0, 0.0 + 0.0]))
    torch.testing.assert_close(result["q"][0], torch.tensor(18.0))


def test_operation_without_forward_mode_gets_a_clear_error():
    from models import CubeWithoutForwardMode

    pattern = r"curvscope\.derivative\(f=\.\.\.\): an operation inside f has no forward-mode .*hvp"
    for order in [1, 2]:
        with pytest.raises(NotImplementedError, match=pattern):
            curvscope.derivative(CubeWithoutForwardMode.apply, torch.tensor(2.0), order=order)
