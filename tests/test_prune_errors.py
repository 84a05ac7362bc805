"""Bad input to curvscope.prune: one clear error per argument, naming call, argument and fix."""

import pytest
import torch
from prune_models import mlp

import curvscope


@pytest.fixture
def problem():
    return mlp()


@pytest.mark.parametrize(
    ("options", "error", "pattern"),
    [
        ({"sparsity": 1.0}, ValueError, r"prune\(sparsity=...\): expected a number in \[0, 1\)"),
        ({"sparsity": 1.5}, ValueError, r"prune\(sparsity=...\).*got 1.5"),
        ({"sparsity": -0.1}, ValueError, r"prune\(sparsity=...\)"),
        ({"sparsity": "half"}, TypeError, r"prune\(sparsity=...\).*Pass e.g. sparsity=0.5"),
        ({"method": "random"}, ValueError, r"prune\(method=...\): expected one of 'magnitude'"),
        ({"scope": "model"}, ValueError, r"prune\(scope=...\): expected one of 'layer'"),
        ({"curvature": "exact"}, ValueError, r"prune\(curvature=...\): expected one of 'ggn'"),
        ({"damping": -0.01}, ValueError, r"prune\(damping=...\): expected a number >= 0"),
        ({"structure": "5:4"}, ValueError, r"prune\(structure=...\): expected None, \"channel\""),
        ({"structure": "2-4"}, ValueError, r"prune\(structure=...\).*got '2-4'"),
        ({"structure": 4}, TypeError, r"prune\(structure=...\)"),
        ({"structure": "2:4", "sparsity": 0.7}, ValueError, r"sparsity=2/4"),
        (
            {"structure": "3:8", "sparsity": 0.375},
            ValueError,
            r"rows whose length is a multiple of m=8.*'2.weight'",
        ),
        ({"params": ["0.weight", "nope"]}, ValueError, r"prune\(params=...\).*Unknown: \['nope'\]"),
        ({"params": "0.weight"}, TypeError, r"prune\(params=...\): expected None or a list"),
        ({"params": []}, ValueError, r"prune\(params=...\)"),
        ({"params": ["0.bias"], "method": "layer_obs"}, ValueError, r"'0.bias'.*method='obs'"),
        ({"seed": 0.5}, TypeError, r"prune\(seed=...\)"),
        ({"progress": "yes"}, TypeError, r"prune\(progress=...\)"),
    ],
)
def test_bad_arguments(problem, options, error, pattern):
    model, loss_fn, data = problem
    options = {"sparsity": 0.5, **options}
    with pytest.raises(error, match=pattern):
        curvscope.prune(model, loss_fn, data, **options)


def test_bad_model_loss_and_data(problem):
    model, loss_fn, data = problem
    with pytest.raises(TypeError, match=r"prune\(model=...\): expected a torch.nn.Module"):
        curvscope.prune("model", loss_fn, data, sparsity=0.5)
    with pytest.raises(TypeError, match=r"prune\(loss_fn=...\)"):
        curvscope.prune(model, 3, data, sparsity=0.5)
    with pytest.raises(TypeError, match=r"prune\(data=...\)"):
        curvscope.prune(model, loss_fn, iter(data), sparsity=0.5)
    with pytest.raises(ValueError, match=r"prune\(model=...\): expected a model with Linear"):
        curvscope.prune(torch.nn.Tanh(), loss_fn, data, sparsity=0.5)


def test_docstring_example_holds():
    import doctest
    import importlib

    module = importlib.import_module("curvscope.prune.pruning")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
