"""Layer-wise OBS: the captured H, the reconstruction error, the exact and the sweep paths."""

import pytest
import torch
import torch.nn.functional as F
from prune_models import cnn, mlp
from torch import nn

import curvscope
from curvscope.prune import layer_obs
from curvscope.prune._validate import Layer


def _layer_inputs(model, data):
    """The inputs of every Linear/Conv module, captured independently with hooks."""
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            hook = lambda m, i, o, name=name: inputs.setdefault(name, []).append(i[0])  # noqa: E731
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(xs) for name, xs in inputs.items()}


def _error(module, x, delta):
    """‖W X − Ŵ X‖² by the layer's own operation (bias excluded)."""
    if isinstance(module, nn.Linear):
        out = x @ delta.T
    elif isinstance(module, nn.Conv1d):
        out = F.conv1d(x, delta, None, module.stride, module.padding, module.dilation)
    else:
        out = F.conv2d(x, delta, None, module.stride, module.padding, module.dilation)
    return float((out.detach() ** 2).sum())


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(5, 3),
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.Conv2d(2, 3, 3, padding="same", dilation=2),
        nn.Conv1d(2, 3, 4, stride=2, padding=1),
        nn.Conv1d(2, 3, 2, padding="same"),
    ],
    ids=["linear", "conv2d", "conv2d-same", "conv1d", "conv1d-same"],
)
def test_captured_input_hessian_gives_the_layer_error(module):
    """δwᵀ H δw equals ‖conv(x; δW)‖² for every layer kind, so H = X Xᵀ is captured right."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(module).double()
    shape = {nn.Linear: (7, 5), nn.Conv2d: (4, 2, 6, 7), nn.Conv1d: (4, 2, 9)}[type(module)]
    x = torch.randn(*shape, generator=gen)
    data = [(x, torch.zeros(len(x)))]
    layer = Layer("0.weight", module.weight.shape, module)
    hessian = layer_obs.input_hessians(model, data, [layer])["0.weight"]
    delta = torch.randn(module.weight.shape, generator=gen)
    flat = delta.reshape(len(delta), -1)
    expected = _error(module, x.double(), delta)
    assert float((flat @ hessian * flat).sum()) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("problem", [mlp, cnn])
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_layer_obs_error_is_no_larger_than_magnitude_on_every_layer(problem, sparsity):
    model, loss_fn, data = problem()
    inputs = _layer_inputs(model, data)
    result = curvscope.prune(model, loss_fn, data, sparsity=sparsity, method="layer_obs")
    magnitude = curvscope.prune(model, loss_fn, data, sparsity=sparsity, method="magnitude")
    for name, module in model.named_modules():
        if name not in inputs:
            continue
        w = module.weight.detach()
        ours = _error(module, inputs[name], w - result.model.get_submodule(name).weight)
        theirs = _error(module, inputs[name], w - magnitude.model.get_submodule(name).weight)
        assert ours <= theirs * (1 + 1e-12), name
        assert int((~result.masks[f"{name}.weight"]).sum()) == round(sparsity * w.numel())


def _row_greedy(w, hessian, count):
    """Greedy OBS on the sum of independent rows with the same H, by re-inversion."""
    rows = w.shape[0]
    w, kept = w.clone(), torch.ones_like(w, dtype=torch.bool)
    for _ in range(count):
        best = None
        for r in range(rows):
            index = torch.nonzero(kept[r]).reshape(-1)
            inverse = torch.linalg.inv(hessian[index][:, index])
            saliency = w[r, index] ** 2 / inverse.diagonal()
            j = int(saliency.argmin())
            if best is None or saliency[j] < best[0]:
                best = (saliency[j], r, index, inverse, j)
        _, r, index, inverse, j = best
        w[r, index] -= w[r, index[j]] / inverse[j, j] * inverse[:, j]
        w[r, index[j]] = 0.0
        kept[r, index[j]] = False
    return w, kept


def test_exact_layer_obs_equals_a_greedy_reference_over_rows():
    model, loss_fn, data = mlp(seed=5)
    x = torch.cat([x for x, _ in data])
    hessian = x.T @ x
    w = model[0].weight.detach()
    expected, kept = _row_greedy(w, hessian, 40)
    result = curvscope.prune(
        model, loss_fn, data, sparsity=40 / 96, method="layer_obs", damping=0.0, params=["0.weight"]
    )
    assert torch.equal(result.masks["0.weight"], kept)
    torch.testing.assert_close(result.model[0].weight.detach(), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("structure", "dtype"), [(None, torch.float64), ("2:4", torch.float64), (None, torch.float32)]
)
def test_sweep_path_for_large_layers(monkeypatch, structure, dtype):
    """SparseGPT's sweep (used above OBC_MAX_ENTRIES; its inverse in float32 for float32
    models) meets the count and beats magnitude."""
    monkeypatch.setattr(layer_obs, "OBC_MAX_ENTRIES", 0)
    monkeypatch.setattr(layer_obs, "SWEEP_BLOCK", 4)
    model, loss_fn, data = mlp(seed=6)
    model, data = model.to(dtype), [(x.to(dtype), y) for x, y in data]
    inputs = _layer_inputs(model, data)
    result = curvscope.prune(
        model, loss_fn, data, sparsity=0.5, method="layer_obs", structure=structure
    )
    magnitude = curvscope.prune(
        model, loss_fn, data, sparsity=0.5, method="magnitude", structure=structure
    )
    for name in ["0", "2"]:
        mask = result.masks[f"{name}.weight"]
        assert int((~mask).sum()) == mask.numel() // 2
        if structure:
            assert (mask.reshape(-1, 4).sum(dim=1) == 2).all()
        module, w = model.get_submodule(name), model.get_submodule(name).weight.detach()
        ours = _error(module, inputs[name], w - result.model.get_submodule(name).weight)
        theirs = _error(module, inputs[name], w - magnitude.model.get_submodule(name).weight)
        assert ours <= theirs * (1 + 1e-5)


def test_layer_obs_never_touches_the_model_it_hooks():
    model, loss_fn, data = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    curvscope.prune(model, loss_fn, data, sparsity=0.5, method="layer_obs")
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
