"""Hessian, GGN and Fisher operators against dense float64 references built with torch.func."""

import copy

import numpy as np
import pytest
import torch
from models import (
    MODEL_CASES,
    CubeWithoutForwardMode,
    ModelCase,
    case_id,
    cnn_batchnorm,
    dict_input,
    mlp,
    reference_loss,
    reference_output,
    shared,
    trainable_names,
)
from torch.func import hessian, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvscope

F64 = torch.float64


def _dense_ggn(case, names=None):
    theta, output, targets = reference_output(case, names)
    out = output(theta)
    jac = jacrev(output)(theta).reshape(out.numel(), -1)
    loss_hess = hessian(lambda o: case.loss_fn(o, targets))(out).reshape(out.numel(), -1)
    return jac.T @ loss_hess @ jac


def _per_example_gradients(case):
    theta, output, targets = reference_output(case)

    def losses(t):
        out = output(t)
        return vmap(lambda o, y: case.loss_fn(o[None], y[None]))(out, targets)

    return jacrev(losses)(theta)


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_hessian_equals_torch_func_hessian_of_full_data_loss(make_case):
    case = make_case()
    theta, loss = reference_loss(case)
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    dense = op.to_dense()
    if case.name == "transformer":
        # torch.func.hessian (jacfwd over jacrev) is wrong for this model in torch 2.13: jvp of a
        # vmapped vjp gives a non-symmetric matrix off from finite differences, while jvp of
        # grad, torch.autograd.functional.hessian and finite differences all agree.
        expected = torch.autograd.functional.hessian(loss, theta)
    else:
        expected = hessian(loss)(theta)
    torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-10)
    assert op.shape == (theta.numel(), theta.numel())
    assert op.param_names == trainable_names(case.model)
    assert op.dtype == torch.float64 and op.num_matvecs == theta.numel()
    assert op.num_examples == sum(t.shape[0] for _, t in case.data)


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_ggn_equals_explicit_jacobian_sandwich(make_case):
    case = make_case()
    op = curvscope.GGNOperator(case.model, case.loss_fn, case.data)
    torch.testing.assert_close(op.to_dense(), _dense_ggn(case), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_empirical_fisher_equals_sum_of_gradient_outer_products(make_case):
    """F = (1/Z) Σ_n g_n g_nᵀ with g_n the gradient of example n's summed loss terms and Z the
    number of terms the mean averages over (N·D for MSE on (N, D) outputs)."""
    case = make_case()
    grads = _per_example_gradients(case)  # of each example's loss_fn value (its mean)
    expected = grads.T @ grads
    if case.loss_fn.reduction == "mean":
        _, output, _ = reference_output(case)
        terms = output(reference_output(case)[0])[0].numel() if case.name == "dict_input" else 1
        expected = expected * terms**2 / (grads.shape[0] * terms)
    op = curvscope.FisherOperator(case.model, case.loss_fn, case.data)
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-10, atol=1e-10)


def test_empirical_fisher_autograd_path_matches_closed_form():
    case = mlp()
    closed = curvscope.FisherOperator(case.model, case.loss_fn, case.data).to_dense()
    plain = lambda out, y: torch.nn.functional.cross_entropy(out, y)  # noqa: E731
    autograd = curvscope.FisherOperator(case.model, plain, case.data).to_dense()
    torch.testing.assert_close(autograd, closed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_loss_and_gradient_match_full_data_loss(make_case):
    case = make_case()
    theta, loss = reference_loss(case)
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    value, gradient = op.gradient()
    np.testing.assert_allclose(value, loss(theta).item(), rtol=1e-12)
    torch.testing.assert_close(gradient, torch.func.grad(loss)(theta), rtol=1e-10, atol=1e-12)
    delta = 0.1 * torch.linspace(-1, 1, theta.numel(), dtype=torch.float64)
    np.testing.assert_allclose(op.loss(delta), loss(theta + delta).item(), rtol=1e-12)
    np.testing.assert_allclose(op.loss(op.unflatten(delta)), op.loss(delta), rtol=1e-14)
    np.testing.assert_allclose(op.loss(), value, rtol=1e-14)


@pytest.mark.parametrize(
    "loss_fn",
    [
        torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=F64)),
        torch.nn.CrossEntropyLoss(ignore_index=1),
        torch.nn.CrossEntropyLoss(label_smoothing=0.1),
        torch.nn.CrossEntropyLoss(reduction="sum", weight=torch.tensor([1.0, 3.0, 0.2], dtype=F64)),
        torch.nn.functional.cross_entropy,
        lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="sum") ** 1.5,
    ],
    ids=["weight", "ignore_index", "label_smoothing", "sum_weight", "functional", "callable"],
)
def test_ggn_closed_form_and_autograd_loss_hessians(loss_fn):
    # one batch: with class weights or ignored targets, "mean" divides each batch by its own
    # total weight, so only a single batch equals loss_fn over all the data at once
    case = mlp()
    case.loss_fn, case.data = loss_fn, case.data[:1]
    reduction = "sum" if getattr(loss_fn, "__name__", "") == "<lambda>" else None
    op = curvscope.GGNOperator(case.model, loss_fn, case.data, reduction=reduction)
    dense = _dense_ggn(case)
    torch.testing.assert_close(op.to_dense(), dense, rtol=1e-10, atol=1e-10)
    v = torch.linspace(-1, 1, op.shape[0], dtype=F64)  # one column: the dual-number pass
    torch.testing.assert_close(op @ v, dense @ v, rtol=1e-10, atol=1e-10)


def test_mse_ggn_scaling_with_multi_dimensional_outputs():
    model = torch.nn.Linear(3, 4).double()
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for reduction, divisor in [("mean", 20.0), ("sum", 1.0)]:
        op = curvscope.GGNOperator(model, torch.nn.MSELoss(reduction=reduction), (x, y))
        gram = torch.cat([x, torch.ones(5, 1)], dim=1)
        # for a linear model the GGN is the Hessian: 2/divisor Σ_n [x_n;1][x_n;1]^T per output
        expected_bias = 2.0 * 5 / divisor * torch.eye(4)
        dense = op.to_dense()
        torch.testing.assert_close(dense[12:, 12:], expected_bias)
        expected_weight = torch.kron(torch.eye(4), 2.0 / divisor * gram[:, :3].T @ gram[:, :3])
        torch.testing.assert_close(dense[:12, :12], expected_weight)
        hess = curvscope.HessianOperator(model, torch.nn.MSELoss(reduction=reduction), (x, y))
        torch.testing.assert_close(hess.to_dense(), dense)


def test_monte_carlo_fisher_converges_to_ggn_for_cross_entropy():
    case = mlp()
    ggn = curvscope.GGNOperator(case.model, case.loss_fn, case.data).to_dense()
    errors = []
    for num_samples in (10, 2000):
        op = curvscope.FisherOperator(
            case.model, case.loss_fn, case.data, kind="monte_carlo", num_samples=num_samples
        )
        errors.append(((op.to_dense() - ggn).norm() / ggn.norm()).item())
    assert errors[1] < 0.06
    assert errors[1] < errors[0] / 3


def test_monte_carlo_fisher_converges_to_ggn_for_mse():
    case = dict_input()
    ggn = curvscope.GGNOperator(case.model, case.loss_fn, case.data).to_dense()
    op = curvscope.FisherOperator(
        case.model, case.loss_fn, case.data, kind="monte_carlo", num_samples=3000
    )
    assert ((op.to_dense() - ggn).norm() / ggn.norm()).item() < 0.06


def test_monte_carlo_fisher_is_deterministic_per_seed():
    case = mlp()
    make = lambda seed: curvscope.FisherOperator(  # noqa: E731
        case.model, case.loss_fn, case.data, kind="monte_carlo", num_samples=3, seed=seed
    )
    op = make(0)
    v = torch.linspace(-1, 1, op.shape[0], dtype=torch.float64)
    first = op @ v
    torch.testing.assert_close(op @ v, first, rtol=0, atol=0)
    torch.testing.assert_close(make(0) @ v, first, rtol=0, atol=0)
    assert not torch.allclose(make(1) @ v, first)
    assert op.kind == "monte_carlo"


def test_hvp_modes_agree():
    case = mlp()
    ops = {
        mode: curvscope.HessianOperator(case.model, case.loss_fn, case.data, hvp_mode=mode)
        for mode in ("forward-over-reverse", "reverse-over-reverse", "auto")
    }
    v = torch.linspace(-1, 1, ops["auto"].shape[0], dtype=torch.float64)
    results = {mode: op @ v for mode, op in ops.items()}
    for result in results.values():
        torch.testing.assert_close(result, results["forward-over-reverse"], rtol=1e-12, atol=1e-14)
    assert ops["auto"].hvp_mode in ("forward-over-reverse", "reverse-over-reverse")


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_matmat_matvec_dict_and_scipy_agree(kind):
    case = mlp()
    cls = {
        "hessian": curvscope.HessianOperator,
        "ggn": curvscope.GGNOperator,
        "fisher": curvscope.FisherOperator,
    }[kind]
    op = cls(case.model, case.loss_fn, case.data)
    block = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0))
    product = op.matmat(block)
    for j in range(3):
        torch.testing.assert_close(op.matvec(block[:, j]), product[:, j], rtol=1e-12, atol=1e-14)
    as_dict = op.matvec(op.unflatten(block[:, 0]))
    assert list(as_dict) == op.param_names
    torch.testing.assert_close(op.flatten_dict(as_dict), product[:, 0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(op.to_scipy() @ block[:, 1].numpy(), product[:, 1].numpy())
    torch.testing.assert_close(product.T @ block, block.T @ product)  # symmetric


def test_block_restricts_to_parameter_subset():
    case = mlp()
    names = ["2.weight", "2.bias"]
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    block = op.block(names)
    assert isinstance(block, curvscope.HessianOperator) and block.param_names == names
    full = op.to_dense()
    torch.testing.assert_close(block.to_dense(), full[-18:, -18:], rtol=1e-12, atol=1e-14)
    theta, loss = reference_loss(case, names)
    torch.testing.assert_close(block.to_dense(), hessian(loss)(theta), rtol=1e-10, atol=1e-12)
    ggn_block = curvscope.GGNOperator(case.model, case.loss_fn, case.data, params=names[::-1])
    assert ggn_block.param_names == names  # model order, whatever order they were given in


def test_shared_parameter_counted_once():
    case = shared()
    op = curvscope.GGNOperator(case.model, case.loss_fn, case.data)
    assert "second.weight" not in op.param_names and "first.weight" in op.param_names
    assert op.shape[0] == sum(p.numel() for p in case.model.parameters())


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_gradient_matches_plain_backward_including_shared_weights(make_case):
    case = make_case()
    model = copy.deepcopy(case.model).eval()
    for batch_inputs, targets in case.data:
        n = targets.shape[0]
        args, kwargs = (
            ((), batch_inputs) if isinstance(batch_inputs, dict) else ((batch_inputs,), {})
        )
        with sdpa_kernel([SDPBackend.MATH]):
            loss = case.loss_fn(model(*args, **kwargs), targets)
        if case.loss_fn.reduction == "mean":
            loss = loss * n / sum(t.shape[0] for _, t in case.data)
        loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    _, gradient = curvscope.GGNOperator(case.model, case.loss_fn, case.data).gradient()
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)


class _Cubed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.outer = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.outer(CubeWithoutForwardMode.apply(self.inner(x)))


@pytest.mark.parametrize(
    "body", [torch.nn.SiLU, torch.nn.Mish, None], ids=["silu", "mish", "no-forward-mode"]
)
def test_ggn_works_where_forward_mode_is_missing(body):
    """silu and mish lack a forward-mode derivative of their backward (the one-column dual pass
    must not need it); a custom op may lack forward mode entirely (J V from a double VJP)."""
    torch.manual_seed(0)
    if body is None:
        model = _Cubed().double()
    else:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), body(), torch.nn.Linear(4, 2)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=gen, dtype=F64), torch.randint(0, 2, (5,), generator=gen)
    case = ModelCase("no_forward_mode", model, torch.nn.CrossEntropyLoss(), [(x, y)])
    expected = _dense_ggn(case)
    op = curvscope.GGNOperator(model, torch.nn.CrossEntropyLoss(), [(x, y)])
    v = torch.linspace(-1, 1, op.shape[0], dtype=F64)
    torch.testing.assert_close(op @ v, expected @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batched", [True, False])
def test_hessian_block_products_vmapped_or_looped_agree(batched):
    """Blocks of columns share one backward pass; their double backward passes are vmapped or
    looped (whichever was faster when timed), with the same result."""
    case = cnn_batchnorm()
    op = curvscope.HessianOperator(
        case.model, case.loss_fn, case.data, hvp_mode="reverse-over-reverse"
    )
    op._batched = batched  # skip the timing: force one path
    block = torch.linspace(-1, 1, 3 * op.shape[0], dtype=F64).reshape(-1, 3)
    expected = torch.stack([op @ column for column in block.T], dim=1)
    torch.testing.assert_close(op.matmat(block), expected, rtol=1e-10, atol=1e-12)


def test_hessian_block_path_is_chosen_once():
    case = mlp()
    op = curvscope.HessianOperator(
        case.model, case.loss_fn, case.data, hvp_mode="reverse-over-reverse"
    )
    assert op._batched is None
    op.matmat(torch.ones(op.shape[0], 2, dtype=F64))
    assert op._batched in (True, False)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_output_space_block_products_vmapped_or_looped_agree(kind, batched):
    case = cnn_batchnorm()
    if kind == "ggn":
        op = curvscope.GGNOperator(case.model, case.loss_fn, case.data)
    else:
        op = curvscope.FisherOperator(case.model, case.loss_fn, case.data, kind=kind)
    op._batched = batched  # skip the timing: force one path
    block = torch.linspace(-1, 1, 3 * op.shape[0], dtype=F64).reshape(-1, 3)
    expected = torch.stack([op @ column for column in block.T], dim=1)
    torch.testing.assert_close(op.matmat(block), expected, rtol=1e-10, atol=1e-12)


def test_monte_carlo_fisher_block_uses_the_same_samples_as_single_products():
    case = mlp()
    op = curvscope.FisherOperator(case.model, case.loss_fn, case.data, kind="monte_carlo", seed=3)
    block = torch.linspace(-1, 1, 3 * op.shape[0], dtype=F64).reshape(-1, 3)
    expected = torch.stack([op @ column for column in block.T], dim=1)
    torch.testing.assert_close(op.matmat(block), expected, rtol=1e-10, atol=1e-12)
    dense = op.to_dense()
    torch.testing.assert_close(dense, dense.T, rtol=1e-10, atol=1e-12)


def test_hessian_auto_mode_falls_back_where_forward_mode_is_missing():
    torch.manual_seed(0)
    model = _Cubed().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=gen, dtype=F64), torch.randint(0, 2, (5,), generator=gen)
    case = ModelCase("no_forward_mode", model, torch.nn.CrossEntropyLoss(), [(x, y)])
    theta, loss = reference_loss(case)
    op = curvscope.HessianOperator(model, torch.nn.CrossEntropyLoss(), [(x, y)])
    torch.testing.assert_close(
        op.to_dense(), torch.autograd.functional.hessian(loss, theta),
        rtol=1e-10, atol=1e-12,
    )  # fmt: skip
    assert op.hvp_mode == "reverse-over-reverse"
