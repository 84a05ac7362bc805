"""Every bad input of the estimators raises a clear TypeError/ValueError naming the call."""

import pytest
import torch

import curvscope


def op(size=40):
    matrix = torch.diag(torch.linspace(-1.0, 2.0, size))
    return curvscope.DenseOperator(matrix)


class Asymmetric:
    shape, dtype, device, is_symmetric = (3, 3), torch.float64, torch.device("cpu"), False

    def matmat(self, block):
        return block


class Rectangular:
    shape, dtype, device = (3, 4), torch.float64, torch.device("cpu")

    def matmat(self, block):
        return block[:3]


ALL = [
    lambda o: curvscope.eigenvalues(o, k=1),
    lambda o: curvscope.trace(o),
    lambda o: curvscope.diagonal(o),
    lambda o: curvscope.spectral_density(o),
    lambda o: curvscope.solve(o, torch.ones(3)),
]


@pytest.mark.parametrize("call", ALL)
def test_operator_checks(call):
    with pytest.raises(ValueError, match=r"expected a symmetric operator"):
        call(Asymmetric())
    with pytest.raises(ValueError, match=r"expected a square operator"):
        call(Rectangular())
    with pytest.raises(TypeError, match=r"Wrap an explicit matrix with curvscope.DenseOperator"):
        call(torch.eye(3))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"k": 0}, ValueError, r"eigenvalues\(k=...\): expected an integer >= 1"),
        ({"k": 41}, ValueError, r"k <= P = 40"),
        ({"k": 21, "which": "both"}, ValueError, r"2k <= P = 40 for which='both'"),
        ({"k": 1.5}, TypeError, r"k=...\): expected an integer"),
        ({"which": "top"}, ValueError, r"which=...\): expected one of 'largest'"),
        ({"tol": 0.0}, ValueError, r"tol=...\): expected a number > 0.0"),
        ({"max_matvecs": 2}, ValueError, r"max_matvecs=...\): expected an integer >= 6"),
        ({"seed": "a"}, TypeError, r"seed=...\): expected an integer seed or a torch.Generator"),
        ({"v0": torch.ones(3)}, ValueError, r"v0=...\): expected a tensor of shape \(40,\)"),
        ({"v0": torch.ones(40, dtype=torch.float32)}, ValueError, r"expected dtype torch.float64"),
        (
            {"v0": torch.zeros(40, dtype=torch.float64)},
            ValueError,
            r"v0=...\): expected a finite, nonzero vector",
        ),
    ],
)
def test_eigenvalues_errors(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        curvscope.eigenvalues(op(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"method": "fast"}, ValueError, r"trace\(method=...\): expected one of 'hutch\+\+'"),
        ({"method": "hutch++", "num_matvecs": 2}, ValueError, r"integer >= 3 for hutch\+\+"),
        ({"method": "hutchinson", "num_matvecs": 1}, ValueError, r">= 2 for hutchinson"),
        ({"method": "xtrace", "num_matvecs": 7}, ValueError, r">= 4 and even for xtrace"),
        ({"num_matvecs": 2.0}, TypeError, r"num_matvecs=...\): expected an integer"),
        ({"confidence": 1.0}, ValueError, r"confidence=...\): expected a number in \(0.0, 1.0\)"),
        ({"confidence": 0}, ValueError, r"confidence=...\): expected a number in \(0.0, 1.0\)"),
        ({"seed": 1.5}, TypeError, r"seed=...\): expected an integer seed"),
    ],
)
def test_trace_errors(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        curvscope.trace(op(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"method": "diag++"}, ValueError, r"diagonal\(method=...\): expected one of"),
        ({"method": "xdiag", "num_matvecs": 5}, ValueError, r">= 4 and even for xdiag"),
        ({"num_matvecs": 1}, ValueError, r">= 2 for hutchinson"),
        ({"seed": None}, TypeError, r"seed=...\): expected an integer seed"),
    ],
)
def test_diagonal_errors(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        curvscope.diagonal(op(), **kwargs)


def test_density_frobenius_errors():
    with pytest.raises(
        ValueError, match=r"spectral_density\(num_probes=...\): expected an integer"
    ):
        curvscope.spectral_density(op(), num_probes=0)
    with pytest.raises(ValueError, match=r"lanczos_steps=...\): expected an integer >= 1"):
        curvscope.spectral_density(op(), lanczos_steps=0)
    result = curvscope.spectral_density(op(), num_probes=1, lanczos_steps=5)
    with pytest.raises(ValueError, match=r"density\(sigma=...\): expected a number > 0.0"):
        result.density([0.0], sigma=-1.0)
    with pytest.raises(ValueError, match=r"frobenius_norm\(num_matvecs=...\): expected an integer"):
        curvscope.frobenius_norm(op(), num_matvecs=1)
    with pytest.raises(ValueError, match=r"frobenius_norm\(confidence=...\)"):
        curvscope.frobenius_norm(op(), confidence=1.5)


@pytest.mark.parametrize(
    ("b", "kwargs", "error", "pattern"),
    [
        (torch.ones(3), {}, ValueError, r"solve\(b=...\): expected a tensor of shape \(40,\)"),
        ([1.0] * 40, {}, TypeError, r"solve\(b=...\): expected a tensor of shape \(40,\)"),
        (torch.ones(40, dtype=torch.float32), {}, ValueError, r"b=...\): expected dtype"),
        (torch.ones(40, 2), {}, ValueError, r"b=...\): expected a tensor of shape \(40,\)"),
        ({"other": torch.ones(40)}, {}, ValueError, r"solve\(b=...\): expected a dict with"),
        (
            torch.ones(40, dtype=torch.float64),
            {"damping": -1.0},
            ValueError,
            r"damping=...\): expected a number >= 0",
        ),
        (
            torch.ones(40, dtype=torch.float64),
            {"tol": -1.0},
            ValueError,
            r"tol=...\): expected a number > 0",
        ),
        (
            torch.ones(40, dtype=torch.float64),
            {"max_matvecs": 0},
            ValueError,
            r"max_matvecs=...\): expected an int",
        ),
    ],
)
def test_solve_errors(b, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        curvscope.solve(op(), b, **kwargs)


def test_wrong_device_is_reported():
    class MetaOp:
        shape, dtype, device = (4, 4), torch.float64, torch.device("meta")

        def matmat(self, block):
            return block

    with pytest.raises(ValueError, match=r"solve\(b=...\): expected device meta"):
        curvscope.solve(MetaOp(), torch.ones(4))
