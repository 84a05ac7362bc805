"""On the digits MLP at 90% sparsity, OBS and layer-wise OBS keep far more held-out accuracy
than magnitude pruning (BENCHMARKS.md gives the margins over the full range)."""

import pytest
import torch

import curvscope
from curvscope.report.digits import digits_train_test


@pytest.mark.slow
def test_second_order_pruning_beats_magnitude_at_90_percent():
    model, loss_fn, train, test = digits_train_test(dtype=torch.float64)
    sweep = curvscope.prune_sweep(
        model, loss_fn, train, test_data=test, sparsities=[0.9],
        methods=["magnitude", "obs", "layer_obs"],
    )  # fmt: skip
    dense = sweep.dense_test_accuracy
    magnitude = sweep.point("magnitude", 0.9).test_accuracy
    obs = sweep.point("obs", 0.9).test_accuracy
    layer_obs = sweep.point("layer_obs", 0.9).test_accuracy
    assert dense > 0.95
    assert obs > magnitude + 0.25, (obs, magnitude)
    assert layer_obs > magnitude + 0.4, (layer_obs, magnitude)
    assert dense - layer_obs < (dense - magnitude) / 2
    for point in sweep.points:
        assert point.achieved == pytest.approx(0.9, abs=1e-3)
