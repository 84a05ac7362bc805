"""jacobian and batch_jacobian: the issue's examples, references, structures, modes, chunks."""

import pytest
import torch
from torch.autograd.functional import jacobian as reference_jacobian

import curvscope

MODES = ["auto", "forward", "reverse"]


def example_map(x):
    return torch.stack([x[0] + x[1], x[0] * x[1], x[0] ** 2])


def tall(x):
    """R^3 -> R^(2, 5): more outputs than inputs."""
    scales = torch.arange(1.0, 11.0).reshape(2, 5, 1) / 10
    return torch.tanh((scales * x).sum(-1)) * x.sum()


def wide(x):
    """R^(4, 3) -> R^2: more inputs than outputs."""
    return torch.stack([torch.sin(x).sum(), (x**2 * torch.arange(12.0).reshape(4, 3)).sum()])


@pytest.mark.parametrize("mode", MODES)
def test_example_jacobian(mode):
    jac = curvscope.jacobian(example_map, torch.tensor([2.0, 3.0]), mode=mode)
    assert torch.equal(jac, torch.tensor([[1.0, 1.0], [3.0, 2.0], [4.0, 0.0]]))


@pytest.mark.parametrize("mode", MODES)
def test_log_jacobian_is_diagonal_of_reciprocals(mode):
    x = torch.rand(2, 2, generator=torch.Generator().manual_seed(0)) + 0.5
    jac = curvscope.jacobian(torch.log, x, mode=mode)
    expected = torch.diag((1 / x).reshape(-1)).reshape(2, 2, 2, 2)
    assert jac.shape == (2, 2, 2, 2)
    torch.testing.assert_close(jac, expected)
    torch.testing.assert_close(
        curvscope.jacobian(torch.log, x, mode=mode, flat=True), torch.diag(1 / x.reshape(-1))
    )


@pytest.mark.parametrize("function, shape", [(tall, (3,)), (wide, (4, 3))])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5, 100])
def test_matches_autograd_functional(function, shape, mode, chunk_size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    jac = curvscope.jacobian(function, x, mode=mode, chunk_size=chunk_size)
    torch.testing.assert_close(jac, reference_jacobian(function, x), rtol=1e-12, atol=1e-12)


def test_flat_layout_follows_flatten_order():
    def f(inputs):
        return {"p": inputs["w"] @ inputs["b"], "q": inputs["b"].sum() * inputs["w"][0]}

    x = {"w": torch.randn(2, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    vector, unflatten = curvscope.flatten(x)

    def flat_f(v):
        out = f(unflatten(v))
        return torch.cat([out["p"].reshape(-1), out["q"].reshape(-1)])

    expected = reference_jacobian(flat_f, vector)
    for mode in MODES:
        matrix = curvscope.jacobian(f, x, mode=mode, flat=True)
        assert matrix.shape == (5, 9)
        torch.testing.assert_close(matrix, expected)


def test_tuple_input_gives_tuple_of_blocks():
    def f(inputs):
        a, b = inputs
        return a * b.sum() + a**2

    x = (torch.tensor([1.0, 2.0]), torch.tensor([[0.5, -1.0, 3.0]]))
    expected = torch.func.jacrev(f)(x)
    for mode in MODES:
        jac = curvscope.jacobian(f, x, mode=mode)
        assert isinstance(jac, tuple) and [b.shape for b in jac] == [(2, 2), (2, 1, 3)]
        torch.testing.assert_close(jac, expected)


def test_structured_output_and_dict_input_nest_like_jacrev():
    def f(inputs):
        return (inputs["a"].sum() * inputs["b"], {"c": inputs["a"] ** 3})

    x = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([-1.0, 0.5])}
    expected = torch.func.jacrev(f)(x)
    for mode in MODES:
        jac = curvscope.jacobian(f, x, mode=mode, chunk_size=2)
        assert jac[1]["c"]["b"].shape == (3, 2)
        torch.testing.assert_close(jac, expected)


def test_auto_falls_back_to_reverse_without_forward_ad():
    from models import CubeWithoutForwardMode

    x = torch.tensor([1.0, 2.0])

    def f(y):
        # 2 inputs, 6 outputs: auto prefers forward
        return CubeWithoutForwardMode.apply(y).repeat(3)

    with pytest.raises(NotImplementedError):
        curvscope.jacobian(f, x, mode="forward")
    torch.testing.assert_close(curvscope.jacobian(f, x), reference_jacobian(f, x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_batch_jacobian_matches_loop(mode, chunk_size):
    xs = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    jacs = curvscope.batch_jacobian(tall, xs, mode=mode, chunk_size=chunk_size)
    assert jacs.shape == (5, 2, 5, 3)
    torch.testing.assert_close(jacs, torch.stack([reference_jacobian(tall, x) for x in xs]))


def test_batch_jacobian_structured():
    def f(inputs):
        a, b = inputs
        return {"out": a * b.sum()}

    xs = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    jacs = curvscope.batch_jacobian(f, xs)
    for index in range(4):
        expected = torch.func.jacrev(f)((xs[0][index], xs[1][index]))
        torch.testing.assert_close(jacs["out"][0][index], expected["out"][0])
        torch.testing.assert_close(jacs["out"][1][index], expected["out"][1])


@pytest.mark.parametrize("mode", MODES)
def test_complex_function_split_with_view_as_real_is_exact_in_every_mode(mode):
    """The fix the complex-output error suggests: the Jacobian of rfft is the DFT matrix."""
    import numpy as np

    x = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25])
    result = curvscope.jacobian(lambda y: torch.view_as_real(torch.fft.rfft(y)), x, mode=mode)
    dft = torch.from_numpy(np.fft.rfft(np.eye(5), axis=0))  # (3 frequencies, 5 inputs)
    assert result.shape == (3, 2, 5)
    torch.testing.assert_close(result[:, 0], dft.real, rtol=0, atol=1e-14)
    torch.testing.assert_close(result[:, 1], dft.imag, rtol=0, atol=1e-14)
