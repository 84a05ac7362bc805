"""curvscope.InfluenceFunction against dense references built with torch.func, in float64."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

import curvscope

N_TRAIN, N_TEST = 20, 5
DAMPING = 0.5


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN,), generator=gen)
    xt = torch.randn(N_TEST, 3, generator=gen, dtype=torch.float64)
    yt = torch.randint(0, 3, (N_TEST,), generator=gen)
    return [(x[i : i + 7], y[i : i + 7]) for i in range(0, N_TRAIN, 7)], (xt, yt), (x, y)


def _loss(output, target):
    return nn.functional.cross_entropy(output, target)


def _flat_params(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        return {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}

    return flat, unflat


def _gradients(model, x, y):
    """Per-example gradients (n, P) by a plain loop."""
    flat, unflat = _flat_params(model)

    def loss(theta, xi, yi):
        out = functional_call(model, unflat(theta), (xi[None],))
        return nn.functional.cross_entropy(out, yi[None])

    return torch.stack([grad(loss)(flat, xi, yi) for xi, yi in zip(x, y, strict=True)])


def _curvature(model, x, y, kind):
    """The dense curvature of the mean loss: hessian, ggn or (empirical) fisher."""
    flat, unflat = _flat_params(model)
    if kind == "fisher":
        g = _gradients(model, x, y)
        return g.T @ g / len(y)
    if kind == "hessian":
        return hessian(lambda t: _loss(functional_call(model, unflat(t), (x,)), y))(flat)
    jac = jacrev(lambda t: functional_call(model, unflat(t), (x,)))(flat)  # (n, C, P)
    out = functional_call(model, unflat(flat), (x,))
    h_out = hessian(lambda o: nn.functional.cross_entropy(o, y))(out)  # (n, C, n, C)
    n, c = out.shape
    return jac.reshape(n * c, -1).T @ h_out.reshape(n * c, n * c) @ jac.reshape(n * c, -1)


def _reference(model, curvature_matrix, damping):
    _, test, (x, y) = _data()
    g_train, g_test = _gradients(model, x, y), _gradients(model, *test)
    system = curvature_matrix + damping * torch.eye(curvature_matrix.shape[0])
    inverse = torch.linalg.inv(system)
    return g_test @ inverse @ g_train.T / N_TRAIN, ((g_train @ inverse) * g_train).sum(1) / N_TRAIN


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "fisher"])
@pytest.mark.parametrize("solver", ["exact", "cg", "lowrank", "lissa", "auto"])
def test_every_curvature_and_solver_matches_the_dense_formula(curvature, solver):
    model = _model()
    train, test, (x, y) = _data()
    matrix = _curvature(model, x, y, curvature)
    assert float(torch.linalg.eigvalsh(matrix).min()) + DAMPING > 0.1
    influence = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(), train, curvature=curvature, solver=solver, damping=DAMPING,
        rank=matrix.shape[0], tol=1e-12, max_matvecs=5000,
    )  # fmt: skip
    scores, self_scores = _reference(model, matrix, DAMPING)
    torch.testing.assert_close(influence.scores(test), scores, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(influence.self_influence(), self_scores, rtol=1e-9, atol=1e-11)
    assert influence.solver == ("exact" if solver == "auto" else solver)
    assert influence.solver_status.num_columns == N_TRAIN
    assert influence.solver_status.num_converged == N_TRAIN
    assert influence.num_matvecs > 0


def test_lowrank_keeps_the_top_eigenpairs_and_the_rest_at_one_over_damping():
    model = _model()
    train, test, (x, y) = _data()
    matrix = _curvature(model, x, y, "ggn")
    values, vectors = torch.linalg.eigh(matrix)
    top, basis = values[-5:], vectors[:, -5:]
    inverse = basis @ torch.diag(1 / (top + DAMPING) - 1 / DAMPING) @ basis.T
    inverse = inverse + torch.eye(len(values)) / DAMPING
    g_train, g_test = _gradients(model, x, y), _gradients(model, *test)
    influence = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(), train, solver="lowrank", rank=5, damping=DAMPING
    )
    expected = g_test @ inverse @ g_train.T / N_TRAIN
    torch.testing.assert_close(influence.scores(test), expected, rtol=1e-6, atol=1e-9)


def test_identity_is_gradient_similarity_and_an_operator_works_as_curvature():
    model = _model()
    train, test, (x, y) = _data()
    g_train, g_test = _gradients(model, x, y), _gradients(model, *test)
    loss = nn.CrossEntropyLoss()
    identity = curvscope.InfluenceFunction(model, loss, train, curvature="identity")
    assert identity.damping == 0.0 and identity.solver == "identity"
    torch.testing.assert_close(identity.scores(test), g_test @ g_train.T / N_TRAIN)
    matrix = _curvature(model, x, y, "hessian")
    names = [name for name, _ in model.named_parameters()]
    dense = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(), train, curvature=curvscope.DenseOperator(matrix),
        params=names, damping=DAMPING,
    )  # fmt: skip
    scores, _ = _reference(model, matrix, DAMPING)
    torch.testing.assert_close(dense.scores(test), scores)
    assert dense.curvature == "DenseOperator"


def test_default_damping_is_a_tenth_of_the_mean_eigenvalue():
    model = _model()
    train, test, (x, y) = _data()
    matrix = _curvature(model, x, y, "ggn")
    exact = curvscope.InfluenceFunction(model, nn.CrossEntropyLoss(), train)
    assert exact.damping == pytest.approx(0.1 * float(matrix.trace()) / matrix.shape[0], rel=1e-10)
    cg = curvscope.InfluenceFunction(model, nn.CrossEntropyLoss(), train, solver="cg", seed=4)
    again = curvscope.InfluenceFunction(model, nn.CrossEntropyLoss(), train, solver="cg", seed=4)
    # a seeded Hutch++ estimate: the same up to rounding (the operators' once-timed choice
    # between vmapped and looped block products may differ between two instances)
    assert cg.damping == pytest.approx(again.damping, rel=1e-10)
    assert cg.damping == pytest.approx(exact.damping, rel=0.3)
    torch.testing.assert_close(cg.scores(test), again.scores(test), rtol=1e-6, atol=1e-10)


def test_streaming_and_batching_do_not_change_the_scores():
    model = _model()
    train, test, (x, y) = _data()
    loss = nn.CrossEntropyLoss()
    reference = curvscope.InfluenceFunction(model, loss, (x, y), damping=DAMPING).scores(test)
    test_batches = [(test[0][:2], test[1][:2]), (test[0][2:], test[1][2:])]
    for size in (1, 3, None):
        for data in (train, (x, y)):
            influence = curvscope.InfluenceFunction(
                model, loss, data, damping=DAMPING, max_batch_size=size
            )
            torch.testing.assert_close(influence.scores(test_batches), reference)
    cg = curvscope.InfluenceFunction(model, loss, train, damping=DAMPING, solver="cg", tol=1e-12)
    torch.testing.assert_close(cg.scores(test_batches), reference, rtol=1e-9, atol=1e-12)


def test_sum_reduction_gives_the_mean_loss_convention():
    model = _model()
    train, test, _ = _data()
    mean = curvscope.InfluenceFunction(model, nn.CrossEntropyLoss(), train, damping=DAMPING)
    total = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(reduction="sum"), train, damping=DAMPING, solver="cg", tol=1e-12
    )
    torch.testing.assert_close(total.scores(test), mean.scores(test), rtol=1e-9, atol=1e-12)


def test_self_influence_is_the_diagonal_of_the_train_scores_and_top_agrees():
    model = _model()
    train, test, (x, y) = _data()
    influence = curvscope.InfluenceFunction(model, nn.CrossEntropyLoss(), train, damping=DAMPING)
    torch.testing.assert_close(influence.self_influence(), influence.scores((x, y)).diagonal())
    scores, top = influence.scores(test), influence.top(test, k=4)
    order = scores.argsort(dim=1, descending=True)
    assert torch.equal(top.helpful_indices, order[:, :4])
    assert torch.equal(top.harmful_indices, order[:, -4:].flip(1))
    torch.testing.assert_close(top.helpful_scores, scores.gather(1, order[:, :4]))
    assert top.to_dict()["kind"] == "InfluenceTop"


def test_non_convergence_is_reported():
    model = _model()
    train, test, _ = _data()
    influence = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(), train, solver="cg", damping=1e-3, max_matvecs=2
    )
    with pytest.warns(RuntimeWarning, match="not converged"):
        influence.scores(test)
    status = influence.solver_status
    assert status.status == "not converged" and status.num_converged < N_TEST
    assert status.max_relative_residual > 1e-3


def _snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


@pytest.mark.filterwarnings("ignore:curvscope.InfluenceFunction")
@pytest.mark.parametrize("solver", ["exact", "cg", "lowrank", "lissa"])
def test_the_model_is_untouched(solver):
    model = _model().train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = _snapshot(model)
    train, test, _ = _data()
    influence = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(), train, solver=solver, rank=4, max_matvecs=20
    )
    influence.scores(test)
    influence.self_influence()
    after = _snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"], strict=True))
    assert torch.equal(before["grads"][0], after["grads"][0])
    assert all(g is None for g in after["grads"][1:])
    assert before["training"] == after["training"] and all(after["training"])
    assert torch.equal(before["rng"], after["rng"])


def _influence(**kwargs):
    train, _, _ = _data()
    return curvscope.InfluenceFunction(_model(), nn.CrossEntropyLoss(), train, **kwargs)


BAD_ARGUMENTS = [
    ({"curvature": "kfca"}, ValueError, r"InfluenceFunction\(curvature=...\): expected one of"),
    ({"curvature": 3}, TypeError, r"curvature=...\): expected one of .* or a curvscope operator"),
    ({"solver": "newton"}, ValueError, r"InfluenceFunction\(solver=...\): expected one of 'auto'"),
    ({"damping": -1.0}, ValueError, r"InfluenceFunction\(damping=...\): expected a number >= 0"),
    ({"damping": "big"}, TypeError, r"damping=...\): expected a number >= 0.0, got 'big'"),
    ({"solver": "lowrank", "damping": 0.0}, ValueError, r"expected a number > 0 with solver"),
    ({"params": ["nope"]}, ValueError, r"params=...\): expected a non-empty list"),
    ({"max_batch_size": 0}, ValueError, r"max_batch_size=...\): expected an integer >= 1"),
    ({"rank": 0}, ValueError, r"rank=...\): expected an integer >= 1"),
    ({"progress": 1}, TypeError, r"progress=...\): expected True or False"),
    (
        {"curvature": curvscope.DenseOperator(torch.eye(3))},
        ValueError,
        r"params=...\): expected the parameter names",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "text"), BAD_ARGUMENTS)
def test_bad_arguments_are_clear_errors(kwargs, error, text):
    with pytest.raises(error, match=text):
        _influence(**kwargs)


def test_bad_data_and_mismatched_test_data_are_clear_errors():
    train, _, _ = _data()
    with pytest.raises(TypeError, match=r"InfluenceFunction\(data=...\)"):
        curvscope.InfluenceFunction(_model(), nn.CrossEntropyLoss(), iter(train))
    influence = _influence(damping=DAMPING)
    wide = (torch.randn(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"test_data=...\): the per-example loss failed on batch"):
        influence.scores(wide)
    with pytest.raises(ValueError, match=r"mixes sizes"):
        influence.scores((torch.randn(4, 3, dtype=torch.float64), torch.zeros(3).long()))
    with pytest.raises(ValueError, match=r"top\(k=...\): expected an integer <= n_train = 20"):
        influence.top(wide, k=21)
    names = [name for name, _ in _model().named_parameters()]
    with pytest.raises(ValueError, match=r"expected an operator of size 31"):
        _influence(curvature=curvscope.DenseOperator(torch.eye(3)), params=names)


@pytest.mark.parametrize(
    ("curvature", "cls"),
    [("kfac", "KFACOperator"), ("ekfac", "EKFACOperator"), ("diagonal", "GGNDiagonalOperator")],
)
def test_structured_curvatures_use_their_exact_inverse(curvature, cls):
    model = _model()
    train, test, _ = _data()
    operator = getattr(curvscope, cls)(model, nn.CrossEntropyLoss(), train)
    matrix = operator.to_dense()
    loss = nn.CrossEntropyLoss()
    influence = curvscope.InfluenceFunction(model, loss, train, curvature=curvature)
    expected_damping = 0.1 * float(matrix.trace()) / matrix.shape[0]
    assert influence.damping == pytest.approx(expected_damping, rel=1e-8)
    assert influence.solver == "exact" and influence.num_matvecs == 0
    scores, self_scores = _reference(model, matrix, influence.damping)
    torch.testing.assert_close(influence.scores(test), scores, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(influence.self_influence(), self_scores, rtol=1e-8, atol=1e-11)
    cg = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(), train, curvature=curvature, solver="cg", tol=1e-12,
        damping=influence.damping,
    )  # fmt: skip
    torch.testing.assert_close(cg.scores(test), scores, rtol=1e-8, atol=1e-11)
    assert math.isfinite(cg.solver_status.max_relative_residual)


def test_an_indefinite_system_is_reported():
    model = _model()
    train, test, (x, y) = _data()
    lowest = float(torch.linalg.eigvalsh(_curvature(model, x, y, "hessian")).min())
    assert lowest < 0
    influence = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(), train, curvature="hessian", damping=-lowest / 2
    )
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        influence.scores(test)
    assert influence.solver_status.status == "not positive definite"


class _StructuredStandIn(curvscope.DenseOperator):
    """An operator with an exact inverse and trace, as the structured operators have."""

    def inverse(self, damping=0.0):
        eye = torch.eye(self.shape[0], dtype=self.dtype)
        return curvscope.DenseOperator(torch.linalg.inv(self._matrix + damping * eye))

    def trace(self):
        return float(self._matrix.trace())


def test_an_operator_with_an_exact_inverse_is_used_without_products():
    model = _model()
    train, test, (x, y) = _data()
    matrix = _curvature(model, x, y, "ggn")
    names = [name for name, _ in model.named_parameters()]
    operator = _StructuredStandIn(matrix)
    influence = curvscope.InfluenceFunction(
        model, nn.CrossEntropyLoss(), train, curvature=operator, params=names
    )
    assert influence.solver == "exact"
    assert influence.damping == pytest.approx(0.1 * float(matrix.trace()) / matrix.shape[0])
    scores, self_scores = _reference(model, matrix, influence.damping)
    torch.testing.assert_close(influence.scores(test), scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(influence.self_influence(), self_scores, rtol=1e-9, atol=1e-12)
    assert influence.num_matvecs == 0 and operator.num_matvecs == 0


@pytest.mark.parametrize(
    "name", ["curvscope.influence.function", "curvscope.report.influence_example"]
)
def test_docstring_examples(name):
    import doctest
    import importlib

    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_progress_bars_do_not_change_the_scores():
    _, test, _ = _data()
    quiet = _influence(damping=DAMPING, solver="cg").scores(test)
    shown = _influence(damping=DAMPING, solver="cg", progress=True).scores(test)
    torch.testing.assert_close(shown, quiet, rtol=1e-10, atol=1e-15)
