"""Properties every operator in ``operator_cases.OPERATOR_CASES`` has, on the shared models:
symmetry, batching invariance, no side effects, dtype and device."""

import copy

import pytest
import torch
from models import cnn_batchnorm, dict_input, full_batch, mlp, transformer
from operator_cases import OPERATOR_CASES, operator_id
from test_side_effects import _assert_same, _exercise, _snapshot

MODELS = [mlp, cnn_batchnorm, dict_input, transformer]


def _vectors(size, count, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, count, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("op_case", OPERATOR_CASES, ids=operator_id)
@pytest.mark.parametrize("make_model", MODELS, ids=lambda f: f.__name__)
def test_symmetric(op_case, make_model):
    case = make_model()
    op = op_case.make(case.model, case.loss_fn, case.data)
    u, v = _vectors(op.shape[0], 2).T
    torch.testing.assert_close(u @ (op @ v), (op @ u) @ v, rtol=1e-10, atol=1e-12)
    block = _vectors(op.shape[0], 3, seed=1)
    product = op.matmat(block)
    torch.testing.assert_close(product.T @ block, block.T @ product, rtol=1e-10, atol=1e-12)
    columns = torch.stack([op @ column for column in block.T], dim=1)
    torch.testing.assert_close(product, columns, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "op_case", [c for c in OPERATOR_CASES if c.batching_invariant], ids=operator_id
)
@pytest.mark.parametrize("make_model", [mlp, dict_input], ids=lambda f: f.__name__)
def test_independent_of_batching(op_case, make_model):
    case = make_model()
    v = _vectors(sum(p.numel() for p in case.model.parameters() if p.requires_grad), 1)[:, 0]
    expected = op_case.make(case.model, case.loss_fn, full_batch(case.data)) @ v
    for data, options in [
        (case.data, {}),
        (case.data, {"max_batch_size": 1}),
        (case.data[::-1], {"max_batch_size": 3}),
    ]:
        op = op_case.make(case.model, case.loss_fn, data, **options)
        torch.testing.assert_close(op @ v, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op_case", OPERATOR_CASES, ids=operator_id)
def test_no_side_effects(op_case):
    case = cnn_batchnorm()
    model = case.model
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 3.0)
    torch.manual_seed(1234)
    before = _snapshot(model)
    for options in ({}, {"eval_mode": False}, {"max_batch_size": 2}):
        _exercise(op_case.make(model, case.loss_fn, case.data, **options))
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("op_case", OPERATOR_CASES, ids=operator_id)
def test_dtype_and_device_follow_the_model(op_case):
    case = mlp()
    model32 = copy.deepcopy(case.model).float()
    data32 = [(x.float(), y) for x, y in case.data]
    op = op_case.make(model32, case.loss_fn, data32)
    assert op.dtype == torch.float32 and op.device == torch.device("cpu")
    v = _vectors(op.shape[0], 2, dtype=torch.float32)
    product = op.matmat(v)
    assert product.dtype == torch.float32 and product.device == torch.device("cpu")
    reference = op_case.make(case.model, case.loss_fn, case.data).matmat(v.double())
    torch.testing.assert_close(product.double(), reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"dtype torch.float32"):
        op @ v[:, 0].double()
