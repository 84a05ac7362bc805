"""Property tests over shapes, structures and chunk sizes; adjoint, symmetry, no side effects."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import curvscope

SETTINGS = settings(max_examples=25, deadline=None)
shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)
chunk_sizes = st.one_of(st.none(), st.integers(1, 40))


@st.composite
def structures(draw):
    """A Tensor, a tuple or a dict of float64 Tensors of random shapes, with a seed."""
    kind = draw(st.sampled_from(["tensor", "tuple", "dict"]))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    count = 1 if kind == "tensor" else draw(st.integers(1, 3))
    leaves = [torch.randn(draw(shapes), generator=generator) for _ in range(count)]
    if kind == "tensor":
        return leaves[0]
    if kind == "tuple":
        return tuple(leaves)
    return {f"p{index}": leaf for index, leaf in enumerate(leaves)}


def make_map(size, out_shape, seed):
    """A smooth map from a structure of ``size`` entries to a Tensor of ``out_shape``."""
    weights = torch.randn(math.prod(out_shape), size, generator=torch.Generator().manual_seed(seed))

    def f(x):
        vector, _ = curvscope.flatten(x)
        return (torch.tanh(weights @ vector) + vector.sum() ** 2).reshape(out_shape)

    return f


def make_loss(size, seed):
    weights = torch.randn(3, size, generator=torch.Generator().manual_seed(seed))

    def f(x):
        vector, _ = curvscope.flatten(x)
        return torch.cos(weights @ vector).sum() + (vector @ vector) ** 2 / 4

    return f


def like(x, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils._pytree.tree_map(lambda t: torch.randn(t.shape, generator=generator), x)


@SETTINGS
@given(x=structures(), out_shape=shapes, chunk_size=chunk_sizes, seed=st.integers(0, 99))
def test_jacobian_matches_jacrev_in_every_mode(x, out_shape, chunk_size, seed):
    f = make_map(curvscope.flatten(x)[0].numel(), out_shape, seed)
    expected = torch.func.jacrev(f)(x)
    for mode in ["auto", "forward", "reverse"]:
        result = curvscope.jacobian(f, x, mode=mode, chunk_size=chunk_size)
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(x=structures(), chunk_size=chunk_sizes, seed=st.integers(0, 99))
def test_hessian_matches_torch_func_and_is_symmetric(x, chunk_size, seed):
    f = make_loss(curvscope.flatten(x)[0].numel(), seed)
    result = curvscope.hessian(f, x, chunk_size=chunk_size)
    torch.testing.assert_close(result, torch.func.hessian(f)(x), rtol=1e-10, atol=1e-12)
    matrix = curvscope.hessian(f, x, chunk_size=chunk_size, flat=True)
    torch.testing.assert_close(matrix, matrix.T, rtol=1e-12, atol=1e-12)
    diagonal = curvscope.hessian_diagonal(f, x, chunk_size=chunk_size)
    torch.testing.assert_close(curvscope.flatten(diagonal)[0], torch.diagonal(matrix))


@SETTINGS
@given(x=structures(), out_shape=shapes, seed=st.integers(0, 99))
def test_adjoint_identity_and_hvp_consistency(x, out_shape, seed):
    """<u, J v> = <J^T u, v>; H v agrees in both modes and with the dense Hessian."""
    size = curvscope.flatten(x)[0].numel()
    f = make_map(size, out_shape, seed)
    v = like(x, seed + 1)
    out, jv = curvscope.jvp(f, x, v)
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2))
    _, jtu = curvscope.vjp(f, x, u)
    left = (u * jv).sum()
    right = curvscope.flatten(jtu)[0] @ curvscope.flatten(v)[0]
    torch.testing.assert_close(left, right)
    loss = make_loss(size, seed)
    dense = curvscope.hessian(loss, x, flat=True) @ curvscope.flatten(v)[0]
    for mode in ["auto", "forward-over-reverse", "reverse-over-reverse"]:
        product = curvscope.hvp(loss, x, v, mode=mode)
        torch.testing.assert_close(curvscope.flatten(product)[0], dense)


@SETTINGS
@given(batch=st.integers(1, 4), shape=shapes, chunk_size=chunk_sizes, seed=st.integers(0, 99))
def test_batch_forms_match_a_loop(batch, shape, chunk_size, seed):
    size = math.prod(shape)
    xs = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))
    f, loss = make_map(size, (2,), seed), make_loss(size, seed)
    jacobians = curvscope.batch_jacobian(f, xs, chunk_size=chunk_size)
    hessians = curvscope.batch_hessian(loss, xs, chunk_size=chunk_size)
    assert jacobians.shape == (batch, 2, *shape)
    assert hessians.shape == (batch, *shape, *shape)
    for index in range(batch):
        torch.testing.assert_close(jacobians[index], torch.func.jacrev(f)(xs[index]))
        torch.testing.assert_close(hessians[index], torch.func.hessian(loss)(xs[index]))


def test_no_side_effects_on_global_rng_or_inputs():
    x = {"a": torch.randn(3, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    copy = {key: value.clone() for key, value in x.items()}
    loss = make_loss(5, 0)
    state = torch.get_rng_state()
    curvscope.hessian(loss, x)
    curvscope.hessian_diagonal(loss, x, chunk_size=2)
    curvscope.jacobian(make_map(5, (4,), 1), x, mode="forward")
    curvscope.hvp(loss, x, copy)
    curvscope.derivative(loss, x, order=3, direction=copy)
    assert torch.equal(torch.get_rng_state(), state)
    for key in x:
        assert torch.equal(x[key], copy[key])


def test_empty_inputs_and_outputs():
    empty, pair = torch.ones(0), torch.tensor([1.0, 2.0])
    for mode in ["auto", "forward", "reverse"]:
        assert curvscope.jacobian(lambda x: x[:0], pair, mode=mode).shape == (0, 2)
        assert curvscope.jacobian(lambda x: x.sum() * pair, empty, mode=mode).shape == (2, 0)
    assert curvscope.hessian(lambda x: x.sum(), empty).shape == (0, 0)
    assert curvscope.hessian_diagonal(lambda x: x.sum(), empty).shape == (0,)
    blocks = curvscope.hessian(lambda x: (x[0].sum() + x[1] ** 3).sum(), (empty, pair))
    assert blocks[0][1].shape == (0, 2)
    assert torch.equal(blocks[1][1], torch.diag(6 * pair))


def _network_case():
    """A small convolutional network, its parameters, a direction and a batch (float64)."""
    torch.manual_seed(0)  # the test process's RNG, only to initialise the network
    net = torch.nn.Sequential(
        torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 3), torch.nn.LayerNorm(3)
    ).double()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(4, 1, 6, generator=generator)
    labels = torch.randint(0, 3, (4,), generator=generator)
    params = {name: p.detach() for name, p in net.named_parameters()}
    direction = like(params, 2)

    def outputs(p):
        return torch.func.functional_call(net, p, (inputs,))

    def loss(p):
        return torch.nn.functional.cross_entropy(outputs(p), labels)

    return params, direction, outputs, loss


def _every_call():
    params, v, outputs, loss = _network_case()
    per_example = {"w": torch.randn(3, 4, generator=torch.Generator().manual_seed(3))}

    def example(p):
        return torch.tanh(p["w"]).cumsum(0)

    def example_loss(p):
        return (torch.tanh(p["w"]) ** 3).sum()

    return {
        "jvp": lambda: curvscope.jvp(outputs, params, v),
        "vjp": lambda: curvscope.vjp(outputs, params, torch.ones(4, 3)),
        "hvp-auto": lambda: curvscope.hvp(loss, params, v),
        "hvp-forward-over-reverse": lambda: curvscope.hvp(
            loss, params, v, mode="forward-over-reverse"
        ),
        "hvp-reverse-over-reverse": lambda: curvscope.hvp(
            loss, params, v, mode="reverse-over-reverse"
        ),
        "jacobian-auto": lambda: curvscope.jacobian(outputs, params, flat=True),
        "jacobian-forward": lambda: curvscope.jacobian(outputs, params, mode="forward", flat=True),
        "jacobian-reverse": lambda: curvscope.jacobian(outputs, params, mode="reverse", flat=True),
        "hessian": lambda: curvscope.hessian(loss, params, flat=True, chunk_size=16),
        "hessian_diagonal": lambda: curvscope.hessian_diagonal(loss, params),
        "derivative": lambda: curvscope.derivative(loss, params, order=3, direction=v),
        "batch_jacobian-auto": lambda: curvscope.batch_jacobian(example, per_example),
        "batch_jacobian-forward": lambda: curvscope.batch_jacobian(
            example, per_example, mode="forward"
        ),
        "batch_jacobian-reverse": lambda: curvscope.batch_jacobian(
            example, per_example, mode="reverse"
        ),
        "batch_hessian": lambda: curvscope.batch_hessian(example_loss, per_example),
    }


def test_every_derivative_works_under_no_grad_and_inference_mode():
    """torch.func records its own graphs: the answers are those computed with autograd on."""
    calls = _every_call()
    for key, call in calls.items():
        expected = torch.utils._pytree.tree_leaves(call())
        for context in [torch.no_grad, torch.inference_mode]:
            with context():
                result = torch.utils._pytree.tree_leaves(call())
            torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-14, msg=key)
    # the answers themselves are right: a dense float64 reference from torch.autograd.functional
    # (torch.func.hessian is not: in torch 2.13 its LayerNorm-weight rows are off on this network)
    params, v, _, loss = _network_case()
    vector, unflatten = curvscope.flatten(params)
    dense = torch.autograd.functional.hessian(lambda w: loss(unflatten(w)), vector)
    with torch.inference_mode():
        hv = curvscope.hvp(loss, params, v)
    torch.testing.assert_close(curvscope.flatten(hv)[0], dense @ curvscope.flatten(v)[0])
