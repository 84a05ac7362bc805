"""hessian, batch_hessian and hessian_diagonal: examples, references, structures, chunks."""

import pytest
import torch
from torch.autograd.functional import hessian as reference_hessian

import curvscope
from curvscope.derivatives import hessians as hessian_module


def quadratic(x):
    return x[0] ** 2 + x[0] * x[1] + 3 * x[1] ** 2


def smooth_loss(x):
    weights = torch.linspace(-1.0, 2.0, x.numel()).reshape(x.shape)
    return torch.log1p((weights * x).sum() ** 2) + (torch.cos(x) * x**3).sum()


def test_example_hessian_and_product():
    x = torch.tensor([1.0, 2.0])
    matrix = curvscope.hessian(quadratic, x)
    assert torch.equal(matrix, torch.tensor([[2.0, 1.0], [1.0, 6.0]]))
    assert torch.equal(matrix @ torch.tensor([1.0, 0.5]), torch.tensor([2.5, 4.0]))
    assert torch.equal(curvscope.hessian_diagonal(quadratic, x), torch.tensor([2.0, 6.0]))


def test_sqrt_hessian_closed_form():
    x = torch.rand(2, 2, generator=torch.Generator().manual_seed(0)) + 0.5
    matrix = curvscope.hessian(lambda y: torch.sqrt(y).sum(), x)
    diagonal = -0.25 * x.reshape(-1) ** -1.5
    assert matrix.shape == (2, 2, 2, 2)
    torch.testing.assert_close(matrix.reshape(4, 4), torch.diag(diagonal))
    torch.testing.assert_close(
        curvscope.hessian_diagonal(lambda y: torch.sqrt(y).sum(), x), diagonal.reshape(2, 2)
    )


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 1, 3)])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 1000])
def test_matches_autograd_functional_and_is_symmetric(shape, chunk_size):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    matrix = curvscope.hessian(smooth_loss, x, chunk_size=chunk_size, flat=True)
    expected = reference_hessian(smooth_loss, x).reshape(x.numel(), x.numel())
    torch.testing.assert_close(matrix, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(matrix, matrix.T, rtol=1e-12, atol=1e-12)
    diagonal = curvscope.hessian_diagonal(smooth_loss, x, chunk_size=chunk_size)
    assert diagonal.shape == shape
    torch.testing.assert_close(diagonal.reshape(-1), torch.diagonal(expected))


def test_tuple_and_dict_inputs_nest_like_torch_func():
    def loss(inputs):
        a, b = inputs
        return (a**2).sum() * b.sum() + torch.sin(a @ b).sum()

    x = (torch.tensor([[1.0, -1.0], [0.5, 2.0]]), torch.tensor([0.3, -0.7]))
    expected = torch.func.hessian(loss)(x)
    result = curvscope.hessian(loss, x, chunk_size=2)
    assert result[0][1].shape == (2, 2, 2)
    torch.testing.assert_close(result, expected)

    def dict_loss(inputs):
        return loss((inputs["a"], inputs["b"]))

    named = {"a": x[0], "b": x[1]}
    result = curvscope.hessian(dict_loss, named)
    torch.testing.assert_close(result, torch.func.hessian(dict_loss)(named))
    diagonal = curvscope.hessian_diagonal(dict_loss, named, chunk_size=3)
    torch.testing.assert_close(
        diagonal["a"], torch.diagonal(result["a"]["a"].reshape(4, 4)).reshape(2, 2)
    )
    torch.testing.assert_close(diagonal["b"], torch.diagonal(result["b"]["b"]))


def test_flat_layout_follows_flatten_order():
    def loss(inputs):
        return (inputs["w"] ** 2).sum() * inputs["b"].sum() ** 3

    x = {"w": torch.randn(2, 2, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    vector, unflatten = curvscope.flatten(x)
    expected = reference_hessian(lambda v: loss(unflatten(v)), vector)
    torch.testing.assert_close(curvscope.hessian(loss, x, flat=True), expected)


@pytest.mark.parametrize("composition", ["forward-over-reverse", "reverse-over-reverse"])
def test_both_compositions_agree(monkeypatch, composition):
    monkeypatch.setattr(hessian_module, "COMPOSITION", composition)
    x = torch.randn(6, generator=torch.Generator().manual_seed(5))
    expected = reference_hessian(smooth_loss, x)
    torch.testing.assert_close(curvscope.hessian(smooth_loss, x, chunk_size=4), expected)
    torch.testing.assert_close(curvscope.hessian_diagonal(smooth_loss, x), torch.diagonal(expected))
    from test_derivatives_products import cube_sum

    expected = torch.diag(6 * torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(curvscope.hessian(cube_sum, torch.tensor([1.0, 2.0])), expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_batch_hessian_matches_loop(chunk_size):
    xs = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(6))
    result = curvscope.batch_hessian(smooth_loss, xs, chunk_size=chunk_size)
    assert result.shape == (4, 2, 3, 2, 3)
    torch.testing.assert_close(result, torch.stack([reference_hessian(smooth_loss, x) for x in xs]))


def test_batch_hessian_dict():
    def loss(inputs):
        return (inputs["a"] ** 3).sum() * inputs["b"]

    xs = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    result = curvscope.batch_hessian(loss, xs)
    assert result["a"]["b"].shape == (3, 2)
    for index in range(3):
        expected = torch.func.hessian(loss)({"a": xs["a"][index], "b": xs["b"][index]})
        torch.testing.assert_close(result["a"]["a"][index], expected["a"]["a"])
        torch.testing.assert_close(result["a"]["b"][index], expected["a"]["b"])


def test_model_parameters_as_a_dict():
    """The usual use: the Hessian of a loss w.r.t. a model's named parameters (requires_grad)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    inputs = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0, 1])
    params = dict(model.named_parameters())

    def loss(p):
        logits = torch.func.functional_call(model, p, (inputs,))
        return torch.nn.functional.cross_entropy(logits, labels)

    vector, unflatten = curvscope.flatten({k: v.detach() for k, v in params.items()})
    expected = reference_hessian(lambda v: loss(unflatten(v)), vector)
    torch.testing.assert_close(curvscope.hessian(loss, params, flat=True, chunk_size=7), expected)
    diagonal = curvscope.hessian_diagonal(loss, params, chunk_size=5)
    assert list(diagonal) == list(params)
    torch.testing.assert_close(curvscope.flatten(diagonal)[0], torch.diagonal(expected))
