"""Operators leave the model, its gradients, its modes and the global RNG exactly as they were."""

import pytest
import torch
from models import MODEL_CASES, case_id

import curvscope


def _named(model):
    return model.named_parameters()


def _snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "param_ids": [id(p) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": {n: p.grad if p.grad is None else p.grad.clone() for n, p in _named(model)},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
        "fastpath": torch.backends.mha.get_fastpath_enabled(),
    }


def _assert_same(before, after):
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, dict):
            assert value.keys() == after[key].keys(), key
            for name, tensor in value.items():
                if tensor is None:
                    assert after[key][name] is None, (key, name)
                else:
                    assert torch.equal(tensor, after[key][name]), (key, name)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def _exercise(op):
    v = torch.linspace(-1, 1, op.shape[0], dtype=op.dtype)
    op @ v
    op.matmat(torch.stack([v, -v], dim=1))
    op.matvec(op.unflatten(v))
    if hasattr(op, "loss"):  # model operators (a block diagonal of one has no loss)
        op.loss(0.01 * v)
        op.gradient()


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_no_side_effects_on_model_grads_modes_or_rng(make_case):
    case = make_case()
    model = case.model
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 3.0)  # one .grad set, the others None
    modules = list(model.modules())
    if len(modules) > 2:
        modules[1].eval()  # mixed training flags must come back as they were
    torch.manual_seed(1234)
    before = _snapshot(model)
    for op in [
        curvscope.HessianOperator(model, case.loss_fn, case.data),
        curvscope.HessianOperator(model, case.loss_fn, case.data, hvp_mode="reverse-over-reverse"),
        curvscope.GGNOperator(model, case.loss_fn, case.data, max_batch_size=2),
        curvscope.FisherOperator(model, case.loss_fn, case.data),
        curvscope.HessianOperator(model, case.loss_fn, case.data, eval_mode=False),
    ]:
        _exercise(op)
    _assert_same(before, _snapshot(model))


def test_monte_carlo_fisher_leaves_global_rng_alone():
    case = MODEL_CASES[0]()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    op = curvscope.FisherOperator(
        case.model, case.loss_fn, case.data, kind="monte_carlo", num_samples=4
    )
    _exercise(op)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_batchnorm_running_stats_untouched_in_train_mode_too():
    case = MODEL_CASES[1]()  # the CNN with BatchNorm
    bn = case.model[1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    op = curvscope.GGNOperator(case.model, case.loss_fn, case.data, eval_mode=False)
    _exercise(op)
    after = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)
