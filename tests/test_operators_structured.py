"""The structured operators (KFAC, EKFAC, GGN diagonal, block diagonal): exact inverse, logdet,
trace and diagonal against torch.linalg on to_dense(); the GGN diagonal on the model zoo; block
diagonals; batching invariance, no side effects, estimators, and every bad-input message."""

import copy
import importlib
import importlib.util
import math

import pytest
import torch
from models import MODEL_CASES, case_id, cnn_batchnorm, mlp, shared, transformer
from torch import nn

import curvscope

DTYPE = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class _Zoo(nn.Module):
    """Every layer kind KFAC supports: grouped strided conv, BatchNorm, LayerNorm, an Embedding
    and a Linear layer on a sequence."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.embed = nn.Embedding(6, 4)
        self.ln = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, image, tokens):
        h = torch.tanh(self.bn(self.conv(image))).mean(dim=(2, 3))  # (n, 4)
        seq = torch.tanh(self.mix(self.ln(self.embed(tokens))))  # (n, T, 4)
        return self.head(h + seq.mean(dim=1))


def zoo_case():
    model = _Zoo().to(DTYPE)
    gen = _gen(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=DTYPE))
        model.bn.running_mean.copy_(0.1 * torch.randn(4, generator=gen, dtype=DTYPE))
        model.bn.running_var.fill_(0.8)
    image = torch.randn(7, 2, 4, 4, generator=gen, dtype=DTYPE)
    tokens = torch.randint(0, 6, (7, 3), generator=gen)
    y = torch.randint(0, 3, (7,), generator=gen)
    data = [((image[:4], tokens[:4]), y[:4]), ((image[4:], tokens[4:]), y[4:])]
    return model, nn.CrossEntropyLoss(), data


def _structured_ops(model, loss_fn, data):
    ggn = curvscope.GGNOperator(model, loss_fn, data)
    return {
        "kfac-expand": curvscope.KFACOperator(model, loss_fn, data),
        "kfac-reduce": curvscope.KFACOperator(model, loss_fn, data, approx="reduce"),
        "kfac-empirical": curvscope.KFACOperator(model, loss_fn, data, fisher="empirical"),
        "ekfac": curvscope.EKFACOperator(model, loss_fn, data),
        "ggn-diagonal": curvscope.GGNDiagonalOperator(model, loss_fn, data),
        "block-diagonal": curvscope.BlockDiagonalOperator(ggn),
    }


OPS = list(_structured_ops(*zoo_case()))


@pytest.fixture(scope="module")
def zoo_ops():
    return _structured_ops(*zoo_case())


def _close(a, b, tol=1e-9):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = max(float(b.abs().max()), 1.0)
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max())


@pytest.mark.parametrize("name", OPS)
def test_inverse_logdet_trace_diagonal_match_dense(zoo_ops, name):
    op = zoo_ops[name]
    dense = op.to_dense()
    _close(dense, dense.T, 1e-12)
    eye = torch.eye(dense.shape[0], dtype=DTYPE)
    v = torch.randn(dense.shape[0], 3, generator=_gen(1), dtype=DTYPE)
    for damping in (1e-3, 0.5):
        shifted = dense + damping * eye
        _close(op.inverse(damping) @ v, torch.linalg.solve(shifted, v))
        _close(op.logdet(damping), torch.linalg.slogdet(shifted)[1])
        assert torch.linalg.slogdet(shifted)[0] == 1
    _close(op.trace(), torch.trace(dense))
    diagonal = op.diagonal()
    assert list(diagonal) == op.param_names
    flat = torch.cat([diagonal[n].reshape(-1) for n in op.param_names])
    _close(flat, torch.diagonal(dense))
    assert all(diagonal[n].shape == s for n, s in op.param_shapes.items())


@pytest.mark.parametrize("name", ["kfac-expand", "kfac-reduce", "ekfac"])
def test_eigenbasis_diagonalises_the_kronecker_operators(zoo_ops, name):
    op = zoo_ops[name]
    dense = op.to_dense()
    size = dense.shape[0]
    basis = op.to_eigenbasis(torch.eye(size, dtype=DTYPE))  # Qᵀ
    values = op.eigenbasis_values()
    _close(basis @ basis.T, torch.eye(size, dtype=DTYPE), 1e-10)  # orthogonal
    _close(basis.T @ (values[:, None] * basis), dense)  # K = Q diag(values) Qᵀ
    assert float(values.min()) >= 0
    # blockwise dampings (constant on each module) stay diagonal in the eigenbasis
    modules = sorted({n.rsplit(".", 1)[0] for n in op.param_names})
    level = {n: 0.1 + modules.index(n.rsplit(".", 1)[0]) for n in op.param_names}
    shift = torch.cat([torch.full((s.numel(),), level[n]) for n, s in op.param_shapes.items()])
    v = torch.randn(size, 2, generator=_gen(2), dtype=DTYPE)
    rotated = op.to_eigenbasis(v)
    shift = shift.to(DTYPE)
    _close(
        basis.T @ (rotated / (values + shift)[:, None]),
        torch.linalg.solve(dense + torch.diag(shift), v),
    )
    with pytest.raises(ValueError, match=r"to_eigenbasis\(matrix=...\)"):
        op.to_eigenbasis(torch.zeros(size + 1, 2, dtype=DTYPE))


@pytest.mark.parametrize("name", OPS)
def test_operator_interface_and_estimators(zoo_ops, name):
    op = zoo_ops[name]
    dense = op.to_dense()
    v = torch.randn(op.shape[0], generator=_gen(2), dtype=DTYPE)
    _close(op @ v, dense @ v, 1e-12)
    _close(
        op.matvec(op.unflatten(v))[op.param_names[0]], op.unflatten(dense @ v)[op.param_names[0]]
    )
    _close(torch.as_tensor(op.to_scipy() @ v.numpy()), dense @ v, 1e-12)
    before = op.num_matvecs
    op @ v
    assert op.num_matvecs == before + 1
    top = curvscope.eigenvalues(op, k=2, seed=0, tol=1e-8)
    _close(top.values, torch.linalg.eigvalsh(dense)[-2:].flip(0), 1e-6)
    estimate = curvscope.trace(op, num_matvecs=op.shape[0] + 3, method="hutch++", seed=0)
    assert math.isfinite(estimate.value)


def test_inverse_of_singular_operator_needs_damping():
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    x = torch.randn(1, 3, generator=_gen(3), dtype=DTYPE)  # rank-one factors: singular
    K = curvscope.KFACOperator(model, nn.MSELoss(), (x, torch.zeros(1, 2, dtype=DTYPE)))
    with pytest.raises(
        ValueError, match=r"KFACOperator.inverse\(damping=...\).*singular.*damping > 0"
    ):
        K.inverse()
    assert K.logdet() == -math.inf
    K.inverse(1e-3)


@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_ggn_diagonal_matches_dense_ggn_diagonal_on_the_zoo(make_case):
    case = make_case()
    dense = curvscope.GGNOperator(case.model, case.loss_fn, case.data).to_dense()
    op = curvscope.GGNDiagonalOperator(case.model, case.loss_fn, case.data)
    _close(op @ torch.ones(op.shape[0], dtype=DTYPE), torch.diagonal(dense), 1e-10)
    assert op.num_examples == sum(len(y) for _, y in case.data)


def test_ggn_diagonal_on_the_structured_zoo_and_sequence_outputs():
    model, loss_fn, data = zoo_case()
    dense = curvscope.GGNOperator(model, loss_fn, data).to_dense()
    op = curvscope.GGNDiagonalOperator(model, loss_fn, data, max_batch_size=3)
    _close(op.to_dense(), torch.diag(torch.diagonal(dense)), 1e-10)

    class Tagger(nn.Module):  # cross-entropy on (n, C, T): one column per class and position
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(5, 3), nn.Linear(3, 4)

        def forward(self, tokens):
            return self.out(torch.tanh(self.embed(tokens))).transpose(1, 2)

    tagger = Tagger().to(DTYPE)
    tokens = torch.randint(0, 5, (4, 3), generator=_gen(4))
    tags = torch.randint(0, 4, (4, 3), generator=_gen(5))
    tags[0, 1] = -100
    data = [(tokens[:3], tags[:3]), (tokens[3:], tags[3:])]
    dense = curvscope.GGNOperator(tagger, nn.CrossEntropyLoss(), data).to_dense()
    diag = curvscope.GGNDiagonalOperator(tagger, nn.CrossEntropyLoss(), data)
    _close(diag @ torch.ones(diag.shape[0], dtype=DTYPE), torch.diagonal(dense), 1e-10)


def test_ggn_diagonal_of_an_lstm_where_vmap_fails_loops_over_examples():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    model = Net().to(DTYPE)
    x = torch.randn(5, 6, 3, generator=_gen(11), dtype=DTYPE)
    y = torch.randint(0, 2, (5,), generator=_gen(12))
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    dense = curvscope.GGNOperator(model, nn.CrossEntropyLoss(), data).to_dense()
    op = curvscope.GGNDiagonalOperator(model, nn.CrossEntropyLoss(), data)
    _close(op @ torch.ones(op.shape[0], dtype=DTYPE), torch.diagonal(dense), 1e-10)


def test_ggn_diagonal_other_losses_via_autograd_loss_hessian():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x = torch.randn(6, 3, generator=_gen(6), dtype=DTYPE)
    y = torch.rand(6, 2, generator=_gen(7), dtype=DTYPE)
    loss_fn = nn.BCEWithLogitsLoss()
    dense = curvscope.GGNOperator(model, loss_fn, (x, y)).to_dense()
    op = curvscope.GGNDiagonalOperator(model, loss_fn, [(x[:4], y[:4]), (x[4:], y[4:])])
    _close(op @ torch.ones(op.shape[0], dtype=DTYPE), torch.diagonal(dense), 1e-10)


def test_monte_carlo_ggn_diagonal_is_the_monte_carlo_fisher_diagonal():
    case = cnn_batchnorm()
    args = (case.model, case.loss_fn, case.data)
    op = curvscope.GGNDiagonalOperator(*args, kind="monte_carlo", num_samples=3, seed=4)
    fisher = curvscope.FisherOperator(*args, kind="monte_carlo", num_samples=3, seed=4)
    _close(op @ torch.ones(op.shape[0], dtype=DTYPE), torch.diagonal(fisher.to_dense()), 1e-10)
    exact = curvscope.GGNDiagonalOperator(*args).diagonal()
    assert not torch.allclose(op.diagonal()["0.weight"], exact["0.weight"])


def test_block_diagonal_keeps_exactly_the_chosen_blocks():
    case = transformer()
    H = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    dense = H.to_dense()
    B = curvscope.BlockDiagonalOperator(H)
    mask = torch.zeros_like(dense, dtype=torch.bool)
    start = 0
    for block in B.blocks:
        size = sum(H.param_shapes[n].numel() for n in block)
        indices = [i for i, n in enumerate(H.param_names) if n in block]
        assert indices == list(range(indices[0], indices[0] + len(block)))
        mask[start : start + size, start : start + size] = True
        start += size
    _close(B.to_dense(), torch.where(mask, dense, 0.0), 1e-10)
    custom = [["head.weight"], [n for n in H.param_names if n != "head.weight"]]
    C = curvscope.BlockDiagonalOperator(curvscope.DenseOperator(dense), "layer")
    assert C.blocks == [["matrix"]]
    D = curvscope.BlockDiagonalOperator(H, custom)
    assert D.blocks[0] == ["head.weight"] or D.blocks[1] == ["head.weight"]


def test_block_diagonal_of_indefinite_hessian_inverts_but_has_no_real_logdet():
    case = mlp()
    H = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    B = curvscope.BlockDiagonalOperator(H)
    dense = B.to_dense()
    lowest = float(torch.linalg.eigvalsh(dense)[0])
    assert lowest < 0
    v = torch.randn(dense.shape[0], generator=_gen(8), dtype=DTYPE)
    shifted = dense + 1e-2 * torch.eye(43)
    assert torch.linalg.eigvalsh(shifted).abs().min() > 1e-3  # indefinite, well conditioned
    _close(B.inverse(1e-2) @ v, torch.linalg.solve(shifted, v))
    with pytest.raises(ValueError, match=r"BlockDiagonalOperator.logdet.*negative eigenvalue"):
        B.logdet()
    _close(
        B.logdet(-lowest + 0.1), torch.linalg.slogdet(dense + (-lowest + 0.1) * torch.eye(43))[1]
    )


@pytest.mark.parametrize(
    "make_op",
    [
        lambda m, l, d, **k: curvscope.KFACOperator(m, l, d, **k),
        lambda m, l, d, **k: curvscope.EKFACOperator(m, l, d, approx="reduce", **k),
        lambda m, l, d, **k: curvscope.GGNDiagonalOperator(m, l, d, **k),
    ],
    ids=["kfac", "ekfac", "ggn-diagonal"],
)
def test_batching_invariance_and_no_side_effects(make_op):
    model, loss_fn, data = zoo_case()
    model.train()
    model.conv.weight.grad = torch.ones_like(model.conv.weight)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    joined = (
        (torch.cat([d[0][0] for d in data]), torch.cat([d[0][1] for d in data])),
        torch.cat([d[1] for d in data]),
    )
    one = make_op(model, loss_fn, joined).to_dense()
    micro = make_op(model, loss_fn, data, max_batch_size=2).to_dense()
    _close(micro, one, 1e-12)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.conv.weight.grad, torch.ones_like(model.conv.weight))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "conv.weight")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(rng, torch.get_rng_state())
    assert not model.conv._forward_hooks


def test_bad_input_messages():
    case = mlp()
    args = (case.model, case.loss_fn, case.data)
    with pytest.raises(ValueError, match=r"KFACOperator\(fisher=...\): expected one of 'ggn'"):
        curvscope.KFACOperator(*args, fisher="type-2")
    with pytest.raises(ValueError, match=r"EKFACOperator\(approx=...\): expected one of 'expand'"):
        curvscope.EKFACOperator(*args, approx="mean")
    with pytest.raises(ValueError, match=r"GGNDiagonalOperator\(kind=...\): expected one of"):
        curvscope.GGNDiagonalOperator(*args, kind="empirical")
    with pytest.raises(ValueError, match=r"GGNDiagonalOperator\(num_samples=...\)"):
        curvscope.GGNDiagonalOperator(*args, kind="monte_carlo", num_samples=0)
    K = curvscope.KFACOperator(*args)
    for call in (K.inverse, K.logdet):
        with pytest.raises(ValueError, match=r"KFACOperator\.(inverse|logdet)\(damping=...\)"):
            call(-1.0)
    with pytest.raises(TypeError, match=r"damping=...\): expected a number >= 0"):
        K.inverse("1")
    with pytest.raises(ValueError, match=r"loss_fn=...\).*Monte Carlo"):
        curvscope.KFACOperator(*args[:1], nn.L1Loss(), args[2], fisher="monte_carlo")


def test_unsupported_tied_and_bypassed_modules_are_refused_by_name():
    gru = nn.Sequential(nn.Linear(2, 3))
    gru.add_module("rnn", nn.GRU(3, 3))
    x = torch.randn(2, 2)
    with pytest.raises(ValueError, match=r"rnn.weight_ih_l0 \(GRU\).*Restrict params="):
        curvscope.KFACOperator(gru, nn.MSELoss(), (x, x))
    case = shared()
    with pytest.raises(ValueError, match=r"tied.*\['first.weight'\].*Restrict params="):
        curvscope.KFACOperator(case.model, case.loss_fn, case.data)
    K = curvscope.KFACOperator(
        case.model, case.loss_fn, case.data, params=["first.bias", "out.weight", "out.bias"]
    )
    assert K.shape == (11, 11)
    case = transformer()
    names = [n for n in case.model.state_dict() if "out_proj" in n or n.startswith("head")]
    K = curvscope.KFACOperator(case.model, case.loss_fn, case.data, params=names)
    with pytest.raises(ValueError, match=r"'encoder.self_attn.out_proj' was not called.*params="):
        K @ torch.zeros(K.shape[0], dtype=DTYPE)
    conv = nn.Conv2d(1, 1, 2, padding_mode="reflect", padding=1)
    with pytest.raises(ValueError, match=r"padding_mode='reflect'"):
        curvscope.KFACOperator(conv, nn.MSELoss(), (torch.randn(1, 1, 3, 3), torch.zeros(1)))


def test_block_diagonal_bad_input_messages():
    dense = curvscope.DenseOperator(torch.eye(4, dtype=DTYPE))
    with pytest.raises(TypeError, match=r"BlockDiagonalOperator\(operator=...\)"):
        curvscope.BlockDiagonalOperator(torch.eye(4))
    with pytest.raises(ValueError, match=r"BlockDiagonalOperator\(blocks=...\).*'layer'"):
        curvscope.BlockDiagonalOperator(dense, "module")
    with pytest.raises(ValueError, match=r"Unknown: \['x'\]; in several blocks: \[\]; in no block"):
        curvscope.BlockDiagonalOperator(dense, [["x"]])
    with pytest.raises(ValueError, match=r"block \['matrix'\] has 4 parameters.*16 entries.*GiB"):
        curvscope.BlockDiagonalOperator(dense, max_entries=10)


@pytest.mark.skipif(importlib.util.find_spec("curvlinops") is None, reason="needs curvlinops")
def test_kfac_matches_curvlinops_on_a_small_cnn():  # pragma: no cover - peer environment only
    from curvlinops import KFACLinearOperator

    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)
    ).to(DTYPE)
    x = torch.randn(6, 2, 4, 4, generator=_gen(9), dtype=DTYPE)
    y = torch.randint(0, 4, (6,), generator=_gen(10))
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    ours = curvscope.KFACOperator(model, nn.CrossEntropyLoss(), data).to_dense()
    params = list(model.parameters())
    theirs = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        params,
        data,
        fisher_type="type-2",
        kfac_approx="expand",
        separate_weight_and_bias=False,
    )
    theirs = theirs @ torch.eye(ours.shape[0], dtype=DTYPE)
    _close(ours, torch.as_tensor(theirs), 1e-9)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "ggn_diagonal", "block_diagonal"])
def test_docstring_examples(name):
    import doctest

    module = importlib.import_module(f"curvscope.operators.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
