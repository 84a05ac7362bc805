"""prune_sweep: the same numbers as separate prune calls (the reused curvature changes
nothing), evaluation, and bad input."""

import pytest
import torch
from prune_models import least_squares, mlp

import curvscope
from curvscope.prune.sweep import evaluate


def test_sweep_points_equal_separate_prune_calls():
    model, loss_fn, data = mlp(seed=4)
    x, y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    test = [(x[:30], y[:30])]
    sweep = curvscope.prune_sweep(
        model, loss_fn, data, sparsities=[0.5, 0.7], methods=["obd", "obs", "layer_obs"],
        test_data=test,
    )  # fmt: skip
    assert [(p.method, p.sparsity) for p in sweep.points] == [
        (m, s) for m in ["obd", "obs", "layer_obs"] for s in [0.5, 0.7]
    ]
    for point in sweep.points:
        alone = curvscope.prune(model, loss_fn, data, sparsity=point.sparsity, method=point.method)
        assert point.loss == pytest.approx(alone.loss_after, rel=1e-12)
        with torch.no_grad():
            output = alone.model(x[:30])
        assert point.test_accuracy == pytest.approx(
            float((output.argmax(1) == y[:30]).double().mean())
        )
        assert point.per_layer == alone.sparsity.per_layer
    assert sweep.layers == ("0.weight", "2.weight") and sweep.num_pruned == 8 * 12 + 12 * 4
    assert sweep.to_dict()["points"][0]["method"] == "obd"


def test_evaluate_gives_no_accuracy_for_regression():
    model, loss_fn, data = least_squares()
    loss, accuracy = evaluate(model, loss_fn, data)
    assert accuracy is None and loss == pytest.approx(float(loss_fn(model(data[0]), data[1])))


def test_bad_sweep_arguments():
    model, loss_fn, data = mlp()
    with pytest.raises(TypeError, match=r"prune_sweep\(methods=...\)"):
        curvscope.prune_sweep(model, loss_fn, data, methods="obs")
    with pytest.raises(ValueError, match=r"prune_sweep\(methods=...\)"):
        curvscope.prune_sweep(model, loss_fn, data, methods=["obs", "random"])
    with pytest.raises(TypeError, match=r"prune_sweep\(sparsities=...\)"):
        curvscope.prune_sweep(model, loss_fn, data, sparsities=0.5)
    with pytest.raises(ValueError, match=r"prune\(sparsity=...\)"):
        curvscope.prune_sweep(model, loss_fn, data, sparsities=[0.5, 1.2], methods=["obs"])
