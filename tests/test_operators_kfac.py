"""KFAC and EKFAC against dense float64 references: exact GGN blocks where KFAC is exact, a
textbook per-example reference, and the Fisher operators for the sampled/empirical variants."""

import pytest
import torch
from models import mlp
from torch import nn

import curvscope

DTYPE = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randomize(model, seed):
    gen = _gen(seed)
    model = model.to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
    return model


def _layer_mask(op, size):
    """1 inside the diagonal blocks of each module (weight and bias together), 0 elsewhere."""
    owners = [name.rpartition(".")[0] for name in op.param_names]
    sizes = [shape.numel() for shape in op.param_shapes.values()]
    labels = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    module_of = torch.tensor([owners.index(owners[i]) for i in range(len(owners))])[labels]
    assert labels.numel() == size
    return (module_of[:, None] == module_of[None, :]).to(DTYPE)


def _blocks(op, dense):
    return dense * _layer_mask(op, dense.shape[0])


def _assert_close(a, b, tol=1e-10):
    scale = max(b.abs().max().item(), 1e-300)
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


def _deep_linear():
    model = _randomize(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 2)), 0)
    x = torch.randn(9, 4, generator=_gen(1), dtype=DTYPE)
    y = torch.randn(9, 2, generator=_gen(2), dtype=DTYPE)
    return model, nn.MSELoss(), [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]


@pytest.mark.parametrize("ekfac", [False, True])
def test_kfac_equals_exact_ggn_blocks_for_deep_linear_mse(ekfac):
    model, loss_fn, data = _deep_linear()
    cls = curvscope.EKFACOperator if ekfac else curvscope.KFACOperator
    K = cls(model, loss_fn, data)
    G = curvscope.GGNOperator(model, loss_fn, data).to_dense()
    _assert_close(K.to_dense(), _blocks(K, G))


@pytest.mark.parametrize("ekfac", [False, True])
def test_kfac_equals_exact_ggn_blocks_for_single_datum_cross_entropy(ekfac):
    case = mlp()
    x, y = case.data[0][0][:1], case.data[0][1][:1]
    cls = curvscope.EKFACOperator if ekfac else curvscope.KFACOperator
    K = cls(case.model, case.loss_fn, (x, y))
    G = curvscope.GGNOperator(case.model, case.loss_fn, (x, y)).to_dense()
    _assert_close(K.to_dense(), _blocks(K, G))


def _textbook_kfac(model, x, y):
    """Per-example activations and output Hessians of a tanh MLP with CE, written out."""
    (w1, b1), (w2, b2) = (model[0].weight, model[0].bias), (model[2].weight, model[2].bias)
    n = x.shape[0]
    with torch.no_grad():
        a0 = torch.cat([x, torch.ones(n, 1, dtype=DTYPE)], 1)
        a1 = torch.tanh(x @ w1.T + b1)
        a1_bar = torch.cat([a1, torch.ones(n, 1, dtype=DTYPE)], 1)
        p = torch.softmax(a1 @ w2.T + b2, dim=1)
        hess = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / n  # mean over N
        back = (1 - a1**2)[:, :, None] * w2.T[None]  # d f / d h1 = W2 D_n, transposed
        g2 = hess.sum(0)
        g1 = (back @ hess @ back.transpose(1, 2)).sum(0)
        factors = [(a0.T @ a0 / n, g1), (a1_bar.T @ a1_bar / n, g2)]
    blocks = []
    for (a, g), w in zip(factors, (w1, w2), strict=True):
        full = torch.kron(g, a)  # on the row-major flattening of [W | b]
        rows, cols = w.shape
        index = torch.arange(rows * (cols + 1)).reshape(rows, cols + 1)
        order = torch.cat([index[:, :cols].reshape(-1), index[:, cols]])  # [vec W, b]
        blocks.append(full[order][:, order])
    return torch.block_diag(*blocks)


def test_kfac_equals_textbook_reference_on_tanh_mlp():
    case = mlp()
    K = curvscope.KFACOperator(case.model, case.loss_fn, case.data).to_dense()
    x = torch.cat([b[0] for b in case.data])
    y = torch.cat([b[1] for b in case.data])
    _assert_close(K, _textbook_kfac(case.model, x, y), 1e-8)
    reference = curvscope.GGNOperator(case.model, case.loss_fn, case.data).to_dense()
    assert (K - reference).abs().max() > 1e-4  # not the exact GGN: the test can fail


def _error(op, dense):
    return torch.linalg.norm(op.to_dense() - _blocks(op, dense)).item()


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_ekfac_error_never_larger_than_kfac(which):
    if which == "mlp":
        case = mlp()
        model, loss_fn, data = case.model, case.loss_fn, case.data
    else:
        model = _randomize(
            nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)),
            3,
        )
        x = torch.randn(6, 1, 4, 4, generator=_gen(4), dtype=DTYPE)
        y = torch.randint(0, 3, (6,), generator=_gen(5))
        model, loss_fn, data = model, nn.CrossEntropyLoss(), [(x[:4], y[:4]), (x[4:], y[4:])]
    G = curvscope.GGNOperator(model, loss_fn, data).to_dense()
    for approx in ("expand", "reduce"):
        k = curvscope.KFACOperator(model, loss_fn, data, approx=approx)
        e = curvscope.EKFACOperator(model, loss_fn, data, approx=approx)
        assert _error(e, G) <= _error(k, G) * (1 + 1e-10)
        assert _error(e, G) < 0.99 * _error(k, G)  # strictly better here: the test can fail


def _summed_sequence_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.second(self.first(x)).sum(dim=1)

    return _randomize(Net(), 6)


def test_reduce_is_exact_for_linear_weight_sharing_and_expand_is_not():
    model = _summed_sequence_model()
    x = torch.randn(5, 4, 3, generator=_gen(7), dtype=DTYPE)  # 5 sequences of length 4
    y = torch.randn(5, 2, generator=_gen(8), dtype=DTYPE)
    data = [(x[:2], y[:2]), (x[2:], y[2:])]
    G = curvscope.GGNOperator(model, nn.MSELoss(), data).to_dense()
    reduce = curvscope.KFACOperator(model, nn.MSELoss(), data, approx="reduce")
    _assert_close(reduce.to_dense(), _blocks(reduce, G))
    expand = curvscope.KFACOperator(model, nn.MSELoss(), data, approx="expand")
    assert (expand.to_dense() - _blocks(expand, G)).abs().max() > 1e-3


@pytest.mark.parametrize("conv", ["conv1d", "conv2d_groups"])
def test_convolution_with_one_position_is_exact(conv):
    """A kernel covering the whole (padded) input has one position: KFAC is exact per datum."""
    if conv == "conv1d":
        layer = nn.Conv1d(2, 4, 5, padding=1)
        x = torch.randn(1, 2, 3, generator=_gen(9))
    else:
        layer = nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=1, groups=2)
        x = torch.randn(1, 4, 3, 3, generator=_gen(9))
    head = nn.Linear(4 if conv == "conv1d" else 6, 3)
    model = _randomize(nn.Sequential(layer, nn.Tanh(), nn.Flatten(), head), 10)
    y = torch.tensor([2])
    K = curvscope.KFACOperator(model, nn.CrossEntropyLoss(), (x.to(DTYPE), y))
    G = curvscope.GGNOperator(model, nn.CrossEntropyLoss(), (x.to(DTYPE), y)).to_dense()
    dense = K.to_dense()
    if conv == "conv1d":
        _assert_close(dense, _blocks(K, G))
    else:  # the groups are independent Kronecker blocks: exact inside, zero between groups
        weight = model[0].weight.numel()
        grouped = dense[: weight + 6, : weight + 6]
        mask = torch.zeros_like(grouped, dtype=torch.bool)
        for g in range(2):
            rows = list(range(g * 3 * 18, (g + 1) * 3 * 18)) + [
                weight + 3 * g + i for i in range(3)
            ]
            mask[torch.tensor(rows)[:, None], torch.tensor(rows)[None, :]] = True
        _assert_close(grouped * mask, (G[: weight + 6, : weight + 6]) * mask)
        assert grouped[~mask].abs().max() == 0
    assert set(K.factors) >= ({"0"} if conv == "conv1d" else {"0[0]", "0[1]"})


def test_embedding_single_token_is_exact_and_padding_idx_has_zero_curvature():
    model = _randomize(
        nn.Sequential(nn.Embedding(5, 3, padding_idx=0), nn.Flatten(), nn.Tanh(), nn.Linear(3, 2)),
        11,
    )
    y = torch.tensor([1])
    for token in (3, 0):
        data = (torch.tensor([[token]]), y)
        K = curvscope.KFACOperator(model, nn.CrossEntropyLoss(), data)
        G = curvscope.GGNOperator(model, nn.CrossEntropyLoss(), data).to_dense()
        _assert_close(K.to_dense(), _blocks(K, G))
        assert K.factors["0"].input.shape == (5,)  # the diagonal input factor (counts)
        assert (K.to_dense()[:15, :15].abs().max() == 0) == (token == 0)


def test_norm_layers_are_their_exact_ggn_diagonal():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)
            self.ln = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.bn(self.conv(x))).flatten(1)
            return self.head(self.ln(h))

    model = _randomize(Net(), 12)
    with torch.no_grad():
        model.bn.running_var.fill_(0.7)
    x = torch.randn(5, 1, 4, 4, generator=_gen(13), dtype=DTYPE)
    y = torch.randint(0, 3, (5,), generator=_gen(14))
    K = curvscope.KFACOperator(model, nn.CrossEntropyLoss(), [(x[:3], y[:3]), (x[3:], y[3:])])
    G = curvscope.GGNOperator(model, nn.CrossEntropyLoss(), [(x[:3], y[:3]), (x[3:], y[3:])])
    diag = torch.diagonal(G.to_dense())
    kdiag = torch.diagonal(K.to_dense())
    flat = dict(zip(K.param_names, torch.arange(len(K.param_names)), strict=True))
    sizes = [s.numel() for s in K.param_shapes.values()]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    for name in ("bn.weight", "bn.bias", "ln.weight", "ln.bias"):
        i = flat[name]
        piece = slice(starts[i], starts[i + 1])
        _assert_close(kdiag[piece], diag[piece])
    assert isinstance(K.factors["bn"], curvscope.operators._kronecker.DiagonalFactor)


def _single(case):
    return case.data[0][0][:1], case.data[0][1][:1]


def test_empirical_and_monte_carlo_match_the_fisher_operators_for_a_single_datum():
    case = mlp()
    data = _single(case)
    for fisher, kind in (("empirical", "empirical"), ("monte_carlo", "monte_carlo")):
        K = curvscope.KFACOperator(case.model, case.loss_fn, data, fisher=fisher, seed=3)
        F = curvscope.FisherOperator(case.model, case.loss_fn, data, kind=kind, seed=3)
        _assert_close(K.to_dense(), _blocks(K, F.to_dense()))


def test_empirical_fisher_convention_matches_the_ggn_scale_for_multi_output_mse():
    """F = (1/(N m)) Σ_n g_n g_nᵀ, g_n the gradient of example n's summed squared errors, m = 2
    outputs: at a single datum KFAC(empirical) is exactly its layer blocks."""
    model, loss_fn, data = _deep_linear()
    x, y = data[0][0][:1], data[0][1][:1]
    K = curvscope.KFACOperator(model, loss_fn, (x, y), fisher="empirical")
    params = list(model.parameters())
    total = nn.MSELoss(reduction="sum")(model(x), y)
    g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(total, params)])
    _assert_close(K.to_dense(), _blocks(K, torch.outer(g, g) / 2))


def test_monte_carlo_depends_on_seed_and_is_deterministic():
    case = mlp()
    make = lambda seed: curvscope.KFACOperator(  # noqa: E731
        case.model, case.loss_fn, case.data, fisher="monte_carlo", seed=seed
    ).to_dense()
    assert torch.equal(make(1), make(1))
    assert not torch.allclose(make(1), make(2))


@pytest.mark.parametrize("cls", [curvscope.KFACOperator, curvscope.EKFACOperator])
def test_batching_and_micro_batching_never_change_the_result(cls):
    case = mlp()
    x = torch.cat([b[0] for b in case.data])
    y = torch.cat([b[1] for b in case.data])
    one = cls(case.model, case.loss_fn, (x, y)).to_dense()
    split = cls(case.model, case.loss_fn, case.data).to_dense()
    micro = cls(case.model, case.loss_fn, case.data, max_batch_size=2).to_dense()
    _assert_close(split, one, 1e-12)
    _assert_close(micro, one, 1e-12)


def test_in_place_activation_after_a_layer_is_handled():
    model = _randomize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)), 15)
    x = torch.randn(1, 3, generator=_gen(16), dtype=DTYPE)
    y = torch.tensor([1])
    K = curvscope.KFACOperator(model, nn.CrossEntropyLoss(), (x, y))
    G = curvscope.GGNOperator(model, nn.CrossEntropyLoss(), (x, y)).to_dense()
    _assert_close(K.to_dense(), _blocks(K, G))


def test_factors_are_named_by_module_and_give_the_block():
    case = mlp()
    K = curvscope.KFACOperator(case.model, case.loss_fn, case.data)
    factors = K.factors
    assert list(factors) == ["0", "2"]
    a, g = factors["2"].input, factors["2"].output
    assert a.shape == (6, 6) and g.shape == (3, 3)
    dense = K.to_dense()
    block = torch.kron(g, a)
    index = torch.arange(18).reshape(3, 6)
    order = torch.cat([index[:, :5].reshape(-1), index[:, 5]])
    _assert_close(dense[25:, 25:], block[order][:, order])


def test_params_restrict_to_a_subset_and_bias_only_layers():
    case = mlp()
    K = curvscope.KFACOperator(case.model, case.loss_fn, case.data, params=["0.bias", "2.weight"])
    G = curvscope.GGNOperator(case.model, case.loss_fn, case.data, params=["0.bias", "2.weight"])
    assert K.param_names == ["0.bias", "2.weight"]
    single = _single(case)
    K1 = curvscope.KFACOperator(case.model, case.loss_fn, single, params=["0.bias", "2.weight"])
    G1 = curvscope.GGNOperator(case.model, case.loss_fn, single, params=["0.bias", "2.weight"])
    _assert_close(K1.to_dense(), _blocks(K1, G1.to_dense()))
    assert K.to_dense().shape == G.shape
