"""Masks, structures, the pruned copy, the input model untouched, determinism, the result."""

import json

import pytest
import torch
from prune_models import cnn, mlp

import curvscope

METHODS = ["magnitude", "obd", "obs", "layer_obs"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sparsity_is_met_within_one_weight(method, scope):
    model, loss_fn, data = mlp()
    result = curvscope.prune(model, loss_fn, data, sparsity=0.65, method=method, scope=scope)
    zeros = {name: int((~mask).sum()) for name, mask in result.masks.items()}
    sizes = {name: mask.numel() for name, mask in result.masks.items()}
    assert set(zeros) == {"0.weight", "2.weight"}  # Linear weights only, biases kept
    if scope == "layer":
        for name in zeros:
            assert abs(zeros[name] - 0.65 * sizes[name]) <= 1
    assert abs(sum(zeros.values()) - 0.65 * sum(sizes.values())) <= 1
    assert float(result.sparsity) == pytest.approx(sum(zeros.values()) / sum(sizes.values()))
    assert result.sparsity["overall"] == result.sparsity.overall == float(result.sparsity)
    for name in zeros:
        assert result.sparsity[name] == pytest.approx(zeros[name] / sizes[name])
        assert result.sparsity.per_layer[name] == result.sparsity[name]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("problem", [mlp, cnn])
def test_n_of_m_holds_exactly(method, problem):
    model, loss_fn, data = problem()
    result = curvscope.prune(model, loss_fn, data, sparsity=0.5, method=method, structure="2:4")
    for name, mask in result.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows.reshape(-1, 4).sum(dim=1) == 2).all(), name
    one_of_four = curvscope.prune(
        model, loss_fn, data, sparsity=0.25, method=method, structure="1:4"
    )
    for mask in one_of_four.masks.values():
        assert (mask.reshape(-1, 4).sum(dim=1) == 3).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_structure_removes_whole_rows(method, scope):
    model, loss_fn, data = cnn()
    result = curvscope.prune(
        model, loss_fn, data, sparsity=0.5, method=method, scope=scope, structure="channel"
    )
    for name, mask in result.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert (rows.all(dim=1) | (~rows).all(dim=1)).all(), name
        if scope == "layer":
            assert int((~rows).all(dim=1).sum()) == round(0.5 * rows.shape[0])
        weight = result.model.get_parameter(name).reshape(rows.shape)
        assert (weight[~rows] == 0).all()
    total = sum(m.numel() for m in result.masks.values())
    widest = max(m[0].numel() for m in result.masks.values())
    assert abs(float(result.sparsity) * total - 0.5 * total) <= widest


@pytest.mark.parametrize("method", METHODS)
def test_input_model_untouched_and_copy_zeros_match_masks(method):
    model, loss_fn, data = mlp()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = curvscope.prune(model, loss_fn, data, sparsity=0.5, method=method)
    assert model.training
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert result.model is not model
    for name, mask in result.masks.items():
        assert mask.dtype == torch.bool and mask.shape == model.get_parameter(name).shape
        weight = result.model.get_parameter(name)
        assert torch.equal(weight == 0, ~mask)
    torch.testing.assert_close(result.model[0].bias, model[0].bias, rtol=0, atol=0)
    with torch.no_grad():
        losses = [float(loss_fn(model.eval()(x), y)) * len(y) / 60 for x, y in data]
    assert result.loss_before == pytest.approx(sum(losses), rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_result(method):
    model, loss_fn, data = mlp(seed=3)
    first = curvscope.prune(model, loss_fn, data, sparsity=0.6, method=method, seed=7)
    second = curvscope.prune(model, loss_fn, data, sparsity=0.6, method=method, seed=7)
    for name, mask in first.masks.items():
        assert torch.equal(second.masks[name], mask)
        assert torch.equal(second.model.get_parameter(name), first.model.get_parameter(name))
    assert first.loss_after == second.loss_after


def test_params_chooses_what_is_pruned_and_zero_sparsity_keeps_everything():
    model, loss_fn, data = mlp()
    result = curvscope.prune(
        model, loss_fn, data, sparsity=0.5, method="obs", params=["2.weight", "2.bias"]
    )
    assert set(result.masks) == {"2.weight", "2.bias"}
    assert int((~result.masks["2.bias"]).sum()) == 2
    torch.testing.assert_close(result.model[0].weight, model[0].weight, rtol=0, atol=0)
    nothing = curvscope.prune(model, loss_fn, data, sparsity=0.0)
    assert all(mask.all() for mask in nothing.masks.values())
    assert nothing.loss_after == pytest.approx(nothing.loss_before, abs=1e-12)


def test_result_to_dict_is_json_and_progress_runs(capsys):
    model, loss_fn, data = mlp()
    result = curvscope.prune(model, loss_fn, data, sparsity=0.5, progress=True)
    out = result.to_dict()
    json.dumps(out, allow_nan=False)
    assert out["kind"] == "PruneResult" and out["method"] == "obs" and out["status"] == "ok"
    assert out["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert isinstance(result, curvscope.PruneResult)
