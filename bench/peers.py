"""Adapters to the peer libraries: PyHessian, curvlinops and hessian-eigenthings.

Each adapter exposes a flat-vector product ``(P,) -> (P,)`` on the same model and batches as
curvscope, and counts its products. A peer that cannot be imported is recorded with the reason
and its rows are reported as not runnable.

Workaround, stated in BENCHMARKS.md: PyHessian 0.1's ``density`` calls ``torch.eig``, which
torch removed in 2.x. While PyHessian's density runs (and only then) we provide ``torch.eig``
for a symmetric tridiagonal matrix through ``torch.linalg.eigh``, returning eigenvalues in the
old ``(n, 2)`` real/imaginary layout; nothing else of PyHessian is changed.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator

import torch

from .models import Problem

PEER_PACKAGES = {
    "PyHessian": ("pyhessian", "pyhessian"),
    "curvlinops": ("curvlinops", "curvlinops-for-pytorch"),
    "hessian-eigenthings": ("hessian_eigenthings", "hessian-eigenthings"),
    "BackPACK": ("backpack", "backpack-for-pytorch"),
    # peers of issues 10-14 (structured curvature, influence, Laplace, training, pruning)
    "laplace-torch": ("laplace", "laplace-torch"),
    "Kronfluence": ("kronfluence", "kronfluence"),
    "dattri": ("dattri", "dattri"),
    "ASDL (asdfghjkl)": ("asdl", "asdfghjkl"),
    "Torch-Pruning": ("torch_pruning", "torch-pruning"),
}


def availability() -> dict[str, tuple[str | None, str]]:
    """Peer name -> (version or None, '' or the reason it cannot run)."""
    out: dict[str, tuple[str | None, str]] = {}
    for name, (module, dist) in PEER_PACKAGES.items():
        try:
            importlib.import_module(module)
            out[name] = (importlib.metadata.version(dist), "")
        except Exception as error:  # any import failure: not runnable
            out[name] = (None, f"{type(error).__name__}: {error}")
    return out


def runnable(name: str) -> bool:
    return availability()[name][0] is not None


class Counted:
    """A flat product ``(P,) -> (P,)`` that counts its calls."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], size: int) -> None:
        self.fn = fn
        self.size = size
        self.count = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.fn(v)


def _params(problem: Problem) -> list[torch.nn.Parameter]:
    return [p for p in problem.model.parameters() if p.requires_grad]


def _split(vector: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    pieces, start = [], 0
    for p in params:
        pieces.append(vector[start : start + p.numel()].view_as(p))
        start += p.numel()
    return pieces


def _cat(pieces) -> torch.Tensor:
    return torch.cat([piece.reshape(-1) for piece in pieces])


def _clear_grads(problem: Problem) -> None:
    for p in problem.model.parameters():
        p.grad = None


# -- PyHessian -----------------------------------------------------------------------------------
def pyhessian_loader(problem: Problem):
    """PyHessian's object in dataloader mode (its ``dataloader_hv_product``)."""
    from pyhessian import hessian

    obj = hessian(problem.model, problem.loss_fn, dataloader=problem.batches, cuda=False)
    _clear_grads(problem)
    return obj


def pyhessian_hvp(problem: Problem) -> Counted:
    """PyHessian's dataloader HVP as a flat product."""
    obj = pyhessian_loader(problem)
    params = _params(problem)

    def product(v: torch.Tensor) -> torch.Tensor:
        _, hv = obj.dataloader_hv_product(_split(v, params))
        _clear_grads(problem)
        return _cat(hv)

    return Counted(product, sum(p.numel() for p in params))


def pyhessian_full_batch(problem: Problem):
    """PyHessian's object in single-batch mode on the whole dataset (its fast path: the gradient
    graph is built once and reused by every product). Counts products in ``obj.count``."""
    import sys

    import pyhessian  # noqa: F401 - registers the submodule (its name is shadowed by the class)

    module = sys.modules["pyhessian.hessian"]
    inputs, targets = problem.full_batch
    _clear_grads(problem)
    obj = module.hessian(problem.model, problem.loss_fn, data=(inputs, targets), cuda=False)
    obj.count = 0
    original = getattr(module, "_bench_original", module.hessian_vector_product)
    module._bench_original = original

    def counted(grads, params, v):
        obj.count += 1
        return original(grads, params, v)

    module.hessian_vector_product = counted
    original_loader = obj.dataloader_hv_product

    def counted_loader(v):
        obj.count += 1
        return original_loader(v)

    obj.dataloader_hv_product = counted_loader
    return obj


@contextlib.contextmanager
def torch_eig_shim() -> Iterator[None]:
    """Provide the removed ``torch.eig`` for PyHessian's density (symmetric input only)."""

    def eig(matrix: torch.Tensor, eigenvectors: bool = False):
        values, vectors = torch.linalg.eigh(matrix)
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    had = hasattr(torch, "eig")
    previous = getattr(torch, "eig", None)
    torch.eig = eig
    try:
        yield
    finally:
        if had:
            torch.eig = previous
        else:
            del torch.eig


# -- curvlinops ----------------------------------------------------------------------------------
def curvlinops_operator(problem: Problem, kind: str = "hessian"):
    """curvlinops' HessianLinearOperator or GGNLinearOperator (torch-based, curvlinops >= 3)."""
    import curvlinops

    cls = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator}[kind]
    return cls(problem.model, problem.loss_fn, _params(problem), problem.batches)


def curvlinops_product(problem: Problem, kind: str = "hessian") -> Counted:
    op = curvlinops_operator(problem, kind)
    return Counted(lambda v: op @ v, op.shape[0])


# -- hessian-eigenthings -------------------------------------------------------------------------
def eigenthings_operator(problem: Problem, kind: str = "hessian"):
    """hessian-eigenthings' HessianOperator (or GGNOperator) over the full dataset."""
    import hessian_eigenthings as he

    if kind == "hessian":
        return he.HessianOperator(
            problem.model, problem.batches, he.supervised_loss(problem.loss_fn)
        )
    return he.GGNOperator(
        problem.model,
        problem.batches,
        he.supervised_forward,
        he.supervised_loss_of_output(problem.loss_fn),
    )


class CountedOperator:
    """Wraps a hessian-eigenthings operator, counting products (same interface)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.count = 0
        self.size = inner.size
        self.device = inner.device
        self.dtype = inner.dtype

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.inner.matvec(v)

    rmatvec = matvec
    __call__ = matvec
    __matmul__ = matvec


def eigenthings_product(problem: Problem, kind: str = "hessian") -> Counted:
    op = eigenthings_operator(problem, kind)
    return Counted(op.matvec, op.size)
