"""Every bad input of the derivative functions raises TypeError/ValueError naming call and fix."""

import pytest
import torch

import curvscope

X = torch.tensor([1.0, 2.0], dtype=torch.float64)


def loss(x):
    return (x**2).sum()


def identity(x):
    return x


CALLS = {
    "jvp": lambda f, x: curvscope.jvp(f, x, x),
    "vjp": lambda f, x: curvscope.vjp(f, x, x),
    "hvp": lambda f, x: curvscope.hvp(f, x, x),
    "jacobian": lambda f, x: curvscope.jacobian(f, x),
    "hessian": lambda f, x: curvscope.hessian(f, x),
    "hessian_diagonal": lambda f, x: curvscope.hessian_diagonal(f, x),
    "derivative": lambda f, x: curvscope.derivative(f, x, order=1, direction=x),
    "batch_jacobian": lambda f, x: curvscope.batch_jacobian(f, x),
    "batch_hessian": lambda f, x: curvscope.batch_hessian(f, x),
}
SCALAR = {"hvp", "hessian", "hessian_diagonal", "batch_hessian"}


def fine(name):
    return loss if name in SCALAR else identity


@pytest.mark.parametrize("name", CALLS)
def test_f_not_callable(name):
    with pytest.raises(TypeError, match=rf"curvscope\.{name}\(f=\.\.\.\): expected a callable"):
        CALLS[name](3, X)


@pytest.mark.parametrize("name", CALLS)
def test_non_floating_x(name):
    arg = "xs" if name.startswith("batch") else "x"
    pattern = rf"curvscope\.{name}\({arg}=\.\.\.\): expected floating-point .*dtype torch\.int64"
    with pytest.raises(TypeError, match=pattern + r".*\.to\(torch\.float64\)"):
        CALLS[name](fine(name), torch.tensor([1, 2]))


@pytest.mark.parametrize("name", CALLS)
def test_non_tensor_x(name):
    with pytest.raises(TypeError, match=rf"curvscope\.{name}\(xs?=\.\.\.\): .*torch\.tensor"):
        CALLS[name](fine(name), (X, 2.0))


@pytest.mark.parametrize("name", CALLS)
def test_f_returning_a_non_tensor(name):
    with pytest.raises(TypeError, match=rf"curvscope\.{name}\(f=\.\.\.\): expected a function .*"):
        CALLS[name](lambda x: 1.0, X)


@pytest.mark.parametrize("name", sorted(SCALAR))
def test_non_scalar_f(name):
    pattern = rf"curvscope\.{name}\(f=\.\.\.\): expected a function returning a scalar Tensor"
    with pytest.raises(ValueError, match=pattern + r".*got a Tensor of shape .*loss\.sum\(\)"):
        CALLS[name](identity, torch.ones(3, 2))


@pytest.mark.parametrize(
    "name, call",
    [
        ("jvp", lambda v: curvscope.jvp(identity, X, v)),
        ("hvp", lambda v: curvscope.hvp(loss, X, v)),
        ("vjp", lambda v: curvscope.vjp(identity, X, v)),
        ("derivative", lambda v: curvscope.derivative(identity, X, order=2, direction=v)),
    ],
)
def test_tangent_mismatch(name, call):
    arg = {"jvp": "v", "hvp": "v", "vjp": "u", "derivative": "direction"}[name]
    head = rf"curvscope\.{name}\({arg}=\.\.\.\): expected "
    fix = rf"Pass {arg} with the same structure, shape, dtype and device"
    with pytest.raises(TypeError, match=head + r"the structure of .*a tuple of length 1\. " + fix):
        call((X,))
    with pytest.raises(ValueError, match=head + r"a Tensor like .*shape \(2,\).*shape \(3,\)"):
        call(torch.ones(3))
    with pytest.raises(ValueError, match=head + r".*dtype torch\.float32.*" + fix):
        call(torch.ones(2, dtype=torch.float32))
    with pytest.raises(ValueError, match=head + r".*device meta\. " + fix):
        call(torch.ones(2, device="meta"))
    with pytest.raises(TypeError, match=head + r"Tensors like"):
        call(2.0)


def test_structured_tangent_mismatch():
    x = {"a": X, "b": X}
    with pytest.raises(TypeError, match=r"jvp\(v=\.\.\.\): expected the structure of x \(a dict"):
        curvscope.jvp(lambda y: y["a"], x, {"a": X})
    with pytest.raises(TypeError, match=r"vjp\(u=\.\.\.\): expected the structure of f\(x\)"):
        curvscope.vjp(lambda y: (y["a"], y["b"]), x, X)


@pytest.mark.parametrize(
    "name", ["jacobian", "hessian", "hessian_diagonal", "batch_jacobian", "batch_hessian"]
)
def test_chunk_size(name):
    function = getattr(curvscope, name)
    f = fine(name)
    pattern = rf"curvscope\.{name}\(chunk_size=\.\.\.\): expected an integer >= 1 or None, got "
    for bad in [0, -3]:
        with pytest.raises(ValueError, match=pattern + rf"{bad}\. Pass the number of basis"):
            function(f, torch.ones(2, 2), chunk_size=bad)
    for bad in [2.5, True, "8"]:
        with pytest.raises(TypeError, match=pattern):
            function(f, torch.ones(2, 2), chunk_size=bad)


@pytest.mark.parametrize("name", ["hvp", "jacobian", "batch_jacobian"])
def test_unknown_mode(name):
    function = getattr(curvscope, name)
    args = (loss, X, X) if name == "hvp" else (identity, torch.ones(2, 2))
    pattern = rf"curvscope\.{name}\(mode=\.\.\.\): expected one of 'auto', .*got 'fast'\. Pass one"
    with pytest.raises(ValueError, match=pattern):
        function(*args, mode="fast")


def test_order():
    pattern = r"curvscope\.derivative\(order=\.\.\.\): expected an integer >= 1, got "
    with pytest.raises(ValueError, match=pattern + r"0\. Pass order=1"):
        curvscope.derivative(identity, torch.tensor(1.0), order=0)
    with pytest.raises(TypeError, match=pattern + r"1\.5"):
        curvscope.derivative(identity, torch.tensor(1.0), order=1.5)


def test_missing_direction_for_vector_x():
    pattern = r"curvscope\.derivative\(direction=\.\.\.\): expected a direction .*got None\. Pass"
    with pytest.raises(ValueError, match=pattern):
        curvscope.derivative(identity, X, order=1)


@pytest.mark.parametrize("name", ["batch_jacobian", "batch_hessian"])
def test_batch_without_shared_leading_dimension(name):
    function = getattr(curvscope, name)
    pattern = rf"curvscope\.{name}\(xs=\.\.\.\): expected Tensors with one shared leading batch"
    with pytest.raises(ValueError, match=pattern + r".*torch\.stack"):
        function(loss, (torch.ones(3, 2), torch.ones(4, 2)))
    with pytest.raises(ValueError, match=pattern):
        function(loss, torch.tensor(1.0))


# Every derivative function in every mode: complex or integer outputs of f are refused alike.
EVERY_MODE = {
    "jvp": lambda f, x: curvscope.jvp(f, x, x),
    "vjp": lambda f, x: curvscope.vjp(f, x, torch.utils._pytree.tree_map(torch.ones_like, f(x))),
    "hvp-auto": lambda f, x: curvscope.hvp(f, x, x),
    "hvp-forward-over-reverse": lambda f, x: curvscope.hvp(f, x, x, mode="forward-over-reverse"),
    "hvp-reverse-over-reverse": lambda f, x: curvscope.hvp(f, x, x, mode="reverse-over-reverse"),
    "jacobian-auto": lambda f, x: curvscope.jacobian(f, x),
    "jacobian-forward": lambda f, x: curvscope.jacobian(f, x, mode="forward"),
    "jacobian-reverse": lambda f, x: curvscope.jacobian(f, x, mode="reverse"),
    "hessian": lambda f, x: curvscope.hessian(f, x),
    "hessian_diagonal": lambda f, x: curvscope.hessian_diagonal(f, x),
    "derivative": lambda f, x: curvscope.derivative(f, x, order=2, direction=x),
    "batch_jacobian-auto": lambda f, x: curvscope.batch_jacobian(f, x.reshape(2, 1)),
    "batch_jacobian-forward": lambda f, x: curvscope.batch_jacobian(
        f, x.reshape(2, 1), mode="forward"
    ),
    "batch_jacobian-reverse": lambda f, x: curvscope.batch_jacobian(
        f, x.reshape(2, 1), mode="reverse"
    ),
    "batch_hessian": lambda f, x: curvscope.batch_hessian(f, x.reshape(2, 1)),
}


def _scalar(key):
    return key.split("-")[0] in SCALAR


def rfft(x):
    return torch.fft.rfft(x, n=4)


def rfft_entry(x):
    return torch.fft.rfft(x, n=4)[1]


@pytest.mark.parametrize("key", EVERY_MODE)
def test_complex_output_is_refused_in_every_mode(key):
    """Reverse mode would keep only the real part of rfft: no mode answers for a complex f."""
    name = key.split("-")[0]
    head = rf"curvscope\.{name}\(f=\.\.\.\): expected a function returning real floating-point "
    fix = r"dtype torch\.complex128.*Split complex numbers .* torch\.view_as_real\(z\)"
    with pytest.raises(TypeError, match=head + r"Tensors \(not complex ones\), got .*" + fix):
        EVERY_MODE[key](rfft_entry if _scalar(key) else rfft, X)


@pytest.mark.parametrize("key", EVERY_MODE)
@pytest.mark.parametrize("kind", ["argmax", "comparison"])
def test_integer_output_is_a_type_error_in_every_mode(key, kind):
    if _scalar(key):
        f = (lambda x: x.argmax()) if kind == "argmax" else (lambda x: (x > 1).sum())
    else:
        f = (lambda x: x.argmax(-1, keepdim=True)) if kind == "argmax" else (lambda x: x > 1)
    name = key.split("-")[0]
    head = rf"curvscope\.{name}\(f=\.\.\.\): expected a function returning floating-point Tensors"
    dtype = r"torch\.int64" if kind == "argmax" or _scalar(key) else r"torch\.bool"
    fix = r"Return the floating-point values they come from \(e\.g\. the logits"
    with pytest.raises(TypeError, match=head + rf".*argmax.*, got .*dtype {dtype}.*" + fix):
        EVERY_MODE[key](f, X)


@pytest.mark.parametrize("key", ["jvp", "vjp", "jacobian-auto", "jacobian-reverse"])
def test_one_integer_output_among_floating_ones_is_refused(key):
    def f(x):
        return {"value": x * 2, "index": x.argmax(-1, keepdim=True)}

    with pytest.raises(TypeError, match=r"have no derivative\), got .*dtype torch\.int64"):
        EVERY_MODE[key](f, X)


@pytest.mark.parametrize("name", CALLS)
def test_complex_input_says_to_split_real_and_imaginary_parts(name):
    arg = "xs" if name.startswith("batch") else "x"
    pattern = rf"curvscope\.{name}\({arg}=\.\.\.\): expected floating-point .*dtype torch\.complex"
    with pytest.raises(TypeError, match=pattern + r".*torch\.view_as_real\(z\)"):
        CALLS[name](fine(name), torch.tensor([1 + 1j, 2 - 1j]))


def test_check_not_inference_mode():
    """The shared checker for code that needs autograd names inference_mode and the fix."""
    from curvscope._checks import check_not_inference_mode

    check_not_inference_mode("HessianOperator")  # no error outside inference mode
    with torch.no_grad():
        check_not_inference_mode("HessianOperator")
    pattern = (
        r"curvscope\.HessianOperator: cannot run under torch\.inference_mode\(\).*"
        r"Call it outside torch\.inference_mode\(\), e\.g\. under torch\.no_grad\(\)"
    )
    with torch.inference_mode(), pytest.raises(RuntimeError, match=pattern):
        check_not_inference_mode("HessianOperator")
