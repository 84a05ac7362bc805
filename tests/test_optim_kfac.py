"""KFACPreconditioner against a dense (K + λI)⁻¹ g built by hand, and its contract."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvscope.optim import KFACPreconditioner

DAMPING = 1e-3


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, stride=1),
        nn.Tanh(),
        nn.Conv2d(2, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _conv1d():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)
    )


def _data(name, n=6):
    gen = torch.Generator().manual_seed(3)
    shape = {"mlp": (n, 4), "cnn": (n, 1, 4, 4), "conv1d": (n, 2, 5)}[name]
    return torch.randn(shape, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _features(module, x):
    """Augmented inputs (n, R, d_in), by unfolding convolutions."""
    if isinstance(module, nn.Linear):
        features = x.reshape(x.shape[0], 1, -1)
    elif isinstance(module, nn.Conv1d):
        padded = F.pad(x, (1, 1))  # "same" for kernel 3
        features = padded.unfold(2, 3, 1).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)
    else:
        patches = F.unfold(x, module.kernel_size, padding=module.padding, stride=module.stride)
        features = patches.transpose(1, 2)
    if module.bias is not None:
        features = torch.cat([features, torch.ones(*features.shape[:2], 1)], dim=2)
    return features


def _reference(model, x, y, fisher, seed=0):
    """Per layer: (A, G) from per-example Jacobians of the output w.r.t. the layer output."""
    n, classes = len(y), 3
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(probs, 1, generator=gen)[:, 0] if fisher == "monte_carlo" else y
    out = {}
    for index, module in enumerate(model):
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        prefix, suffix = model[:index], model[index + 1 :]
        features = _features(module, prefix(x).detach())
        a = torch.einsum("nri,nrj->ij", features, features) / (n * features.shape[1])
        g = 0
        for i in range(n):
            s = module(prefix(x[i : i + 1])).detach()
            jac = torch.autograd.functional.jacobian(lambda s, f=suffix: f(s)[0], s)
            jac = jac.reshape(classes, s.shape[1], -1)  # (C, out channels, positions)
            p = probs[i]
            if fisher == "ggn":
                hess = torch.diag(p) - torch.outer(p, p)
                g = g + torch.einsum("cor,cd,dpr->op", jac, hess, jac) / n
            else:
                e = torch.einsum("c,cor->or", p - F.one_hot(labels[i], classes), jac)
                g = g + e @ e.T / n
        out[index] = (a, g)
    return out


@pytest.mark.parametrize("fisher", ["ggn", "empirical", "monte_carlo"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d"])
def test_first_call_is_the_dense_damped_kfac_solve(name, fisher):
    model = {"mlp": _mlp, "cnn": _cnn, "conv1d": _conv1d}[name]().double()
    x, y = _data(name)
    x = x.double()
    precond = KFACPreconditioner(model, nn.CrossEntropyLoss(), damping=DAMPING, fisher=fisher)
    F.cross_entropy(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    reference = _reference(model, x, y, fisher)
    precond.step((x, y))
    for index, (a, g) in reference.items():
        module = model[index]
        parts = [grads[f"{index}.weight"].reshape(g.shape[0], -1)]
        if module.bias is not None:
            parts.append(grads[f"{index}.bias"][:, None])
        matrix = torch.cat(parts, dim=1)
        kron = torch.kron(g, a) + DAMPING * torch.eye(g.shape[0] * a.shape[0])
        solved = torch.linalg.solve(kron, matrix.reshape(-1)).reshape(matrix.shape)
        weight = model[index].weight.grad.reshape(g.shape[0], -1)
        torch.testing.assert_close(weight, solved[:, : weight.shape[1]], rtol=1e-8, atol=1e-10)
        if module.bias is not None:
            torch.testing.assert_close(module.bias.grad, solved[:, -1], rtol=1e-8, atol=1e-10)
        stored_a, stored_g = precond.factors[str(index)]
        torch.testing.assert_close(stored_a, a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stored_g, g, rtol=1e-10, atol=1e-12)


def test_mse_ggn_factors_are_the_exact_gauss_newton_for_a_single_datum():
    model = nn.Linear(3, 2).double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, 3, generator=gen), torch.randn(1, 2, generator=gen)
    precond = KFACPreconditioner(model, nn.MSELoss(), damping=0.5, fisher="ggn")
    F.mse_loss(model(x), y).backward()
    grad = torch.cat([model.weight.grad, model.bias.grad[:, None]], dim=1).reshape(-1)
    # MSE over m = 2 outputs: GGN = (2/m) Jᵀ J with J = I ⊗ [x, 1] (row-major [W | b])
    features = torch.cat([x[0], torch.ones(1)])
    ggn = torch.kron(torch.eye(2), torch.outer(features, features))
    precond.step((x, y))
    expected = torch.linalg.solve(ggn + 0.5 * torch.eye(8), grad)
    got = torch.cat([model.weight.grad, model.bias.grad[:, None]], dim=1).reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _batches(count=4, n=8):
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))
        for _ in range(count)
    ]


def _backward(model, batch):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch[0]), batch[1]).backward()


def test_unsupported_layers_keep_their_gradients_and_are_listed_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        precond = KFACPreconditioner(model, nn.CrossEntropyLoss())
    texts = [str(w.message) for w in caught]
    assert len(texts) == 1 and "['1.weight', '1.bias']" in texts[0]
    assert "left untouched" in texts[0] and precond.layers == ["0", "2"]
    batch = _batches(1)[0]
    _backward(model, batch)
    norm_grads = [model[1].weight.grad.clone(), model[1].bias.grad.clone()]
    linear_grad = model[0].weight.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        precond.step(batch)
    assert torch.equal(model[1].weight.grad, norm_grads[0])
    assert torch.equal(model[1].bias.grad, norm_grads[1])
    assert not torch.allclose(model[0].weight.grad, linear_grad)


def test_step_changes_no_parameter_no_flag_and_not_the_global_rng():
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double()
    model.train()
    precond = KFACPreconditioner(model, nn.CrossEntropyLoss(), fisher="monte_carlo")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batches(1)[0]
    _backward(model, batch)
    rng = torch.get_rng_state()
    precond.step(batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(module.training for module in model.modules())


def test_moving_average_and_update_every():
    model = _mlp().double()
    loss = nn.CrossEntropyLoss()
    batches = _batches(3)
    first = KFACPreconditioner(model, loss, fisher="empirical", factor_decay=0.0)
    _backward(model, batches[0])
    first.step(batches[0])
    second = KFACPreconditioner(model, loss, fisher="empirical", factor_decay=0.0)
    _backward(model, batches[2])
    second.step(batches[2])
    averaged = KFACPreconditioner(model, loss, fisher="empirical", factor_decay=0.9, update_every=2)
    for batch in batches:  # refreshes on calls 0 and 2 only
        _backward(model, batch)
        averaged.step(batch)
    assert averaged.num_updates == 2 and averaged.num_steps == 3
    for name in averaged.layers:
        for got, one, two in zip(
            averaged.factors[name], first.factors[name], second.factors[name], strict=True
        ):
            torch.testing.assert_close(got, 0.9 * one + 0.1 * two, rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_resumes_exactly():
    loss = nn.CrossEntropyLoss()
    batches = _batches(4)
    model = _mlp().double()
    precond = KFACPreconditioner(model, loss, update_every=1, seed=7)
    for batch in batches[:2]:
        _backward(model, batch)
        precond.step(batch)
    state = precond.state_dict()
    expected = []
    for batch in batches[2:]:
        _backward(model, batch)
        precond.step(batch)
        expected.append([p.grad.clone() for p in model.parameters()])
    fresh = KFACPreconditioner(model, loss, update_every=1, seed=123)
    fresh.load_state_dict(state)
    for batch, grads in zip(batches[2:], expected, strict=True):
        _backward(model, batch)
        fresh.step(batch)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert fresh.num_steps == 4 and fresh.num_updates == 4


def test_monte_carlo_sampling_follows_the_seed():
    model, batch = _mlp().double(), _batches(1)[0]

    def factors(seed):
        precond = KFACPreconditioner(model, nn.CrossEntropyLoss(), seed=seed)
        _backward(model, batch)
        precond.step(batch)
        return precond.factors["2"][1]

    assert torch.equal(factors(0), factors(0))
    assert not torch.equal(factors(0), factors(1))


def test_kfac_preconditioned_sgd_beats_plain_sgd():
    batch = _batches(1, n=64)[0]

    def train(kfac):
        model = _mlp().double()
        precond = KFACPreconditioner(model, nn.CrossEntropyLoss(), damping=1e-2, update_every=5)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            optimizer.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            if kfac:
                precond.step(batch)
            optimizer.step()
        return F.cross_entropy(model(batch[0]), batch[1]).item()

    assert train(kfac=True) < train(kfac=False) - 0.05


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"damping": -1e-3}, "(damping=...): expected a number >= 0.0, got -0.001"),
        ({"factor_decay": 1.0}, "(factor_decay=...): expected a number in [0, 1), got 1.0"),
        ({"factor_decay": -0.1}, "(factor_decay=...): expected a number in [0.0, 1.0], got -0.1"),
        ({"update_every": 0}, "(update_every=...): expected an integer >= 1, got 0"),
        ({"fisher": "exact"}, "(fisher=...): expected one of 'monte_carlo', 'empirical', 'ggn'"),
        ({"seed": -1}, "(seed=...): expected an integer >= 0, got -1"),
    ],
)
def test_bad_input(kwargs, text):
    import re

    pattern = "^curvscope.optim.KFACPreconditioner" + re.escape(text)
    with pytest.raises((TypeError, ValueError), match=pattern):
        KFACPreconditioner(nn.Linear(2, 2), nn.CrossEntropyLoss(), **kwargs)


def test_bad_loss_and_batch():
    with pytest.raises(
        ValueError, match=r"\(loss_fn=...\): expected nn.CrossEntropyLoss \(no class"
    ):
        KFACPreconditioner(nn.Linear(2, 2), nn.L1Loss())
    with pytest.raises(ValueError, match=r"no class weights or label smoothing"):
        KFACPreconditioner(nn.Linear(2, 2), nn.CrossEntropyLoss(label_smoothing=0.1), fisher="ggn")
    KFACPreconditioner(nn.Linear(2, 2), nn.L1Loss(), fisher="empirical")  # any loss
    precond = KFACPreconditioner(nn.Linear(2, 2), nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match=r"step\(batch=...\): expected an \(inputs, targets\)"):
        precond.step(torch.zeros(2, 2))


@pytest.mark.parametrize("fisher", ["ggn", "empirical"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_factors_are_those_of_kfac_operator(name, fisher):
    """The preconditioner's factors are KFACOperator's on the same batch (one convention)."""
    import curvscope

    model = {"mlp": _mlp, "cnn": _cnn}[name]().double()
    x, y = _data(name)
    loss_fn = nn.CrossEntropyLoss()
    precond = KFACPreconditioner(model, loss_fn, fisher=fisher)
    F.cross_entropy(model(x), y).backward()
    precond.step((x.double(), y))
    operator = curvscope.KFACOperator(model, loss_fn, (x.double(), y), fisher=fisher)
    for layer in precond.layers:
        a, g = precond.factors[layer]
        factor = operator.factors[layer]
        torch.testing.assert_close(a, factor.input, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, factor.output, rtol=1e-10, atol=1e-12)
