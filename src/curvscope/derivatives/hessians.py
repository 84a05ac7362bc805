"""Full Hessians and their exact diagonals, from Hessian-vector products with basis vectors.

Each chunk of rows of H is one vmapped batch of HVPs (Pearlmutter, "Fast exact multiplication by
the Hessian", Neural Computation 1994), so the cost is that of n HVPs, batched, and memory is
bounded by the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func

from ._basis import FlatFunction, basis_matrix, basis_products
from ._norms import composite_norms
from ._validate import check_batched_input, check_chunk_size, check_function, check_input
from .products import forward_or_reverse
from .tree import split, split_matrix

__all__ = ["batch_hessian", "hessian", "hessian_diagonal"]

#: How basis HVPs are composed for full Hessians and diagonals. Reverse-over-reverse records the
#: forward and backward pass once and replays only the double-backward per chunk; it was the
#: fastest on a CPU for the digits MLP (see the report of the derivatives work).
COMPOSITION = "reverse-over-reverse"


def _row_product(flat: FlatFunction, composition: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``e -> H e`` for the flat scalar function, by the given composition."""
    gradient = torch.func.grad(flat)
    x = flat.vector
    if composition == "reverse-over-reverse":
        pullback = torch.func.vjp(gradient, x)[1]
        return lambda e: pullback(e)[0]
    return lambda e: torch.func.jvp(gradient, (x,), (e,))[1]


def _with_composition(run: Callable[[str], Any]) -> Any:
    """``run(COMPOSITION)``, retried in reverse-over-reverse if forward-mode AD is missing."""
    if COMPOSITION == "reverse-over-reverse":
        return run(COMPOSITION)
    return forward_or_reverse(lambda: run(COMPOSITION), lambda: run("reverse-over-reverse"))


def _hessian(func: str, f: Callable[[Any], Any], x: Any, chunk_size: int | None, flat: bool):
    function = FlatFunction(f, x, func, scalar=True)
    size = function.vector.numel()
    matrix = _with_composition(
        lambda composition: basis_matrix(
            _row_product(function, composition), size, function.vector, chunk_size
        )
    )
    return matrix if flat else split_matrix(matrix, function.inputs, function.inputs)


def hessian(
    f: Callable[[Any], torch.Tensor], x: Any, *, chunk_size: int | None = None, flat: bool = False
) -> Any:
    """The full Hessian of a scalar function, from vmapped HVPs with the identity basis.

    H[i, j] = d^2 f / dx_i dx_j, computed row block by row block as H [e_i, ..., e_{i+c}].

    Args:
        f: a function of ``x`` returning a scalar Tensor.
        x: a floating Tensor, or a tuple or dict of them.
        chunk_size: basis vectors per vmapped batch of HVPs; smaller uses less memory, the result
            is the same. None uses a default of 128.
        flat: return one (x numel, x numel) matrix, in the order of ``curvscope.flatten``.

    Returns:
        For a Tensor, shape ``x.shape + x.shape``; for a tuple or dict, blocks ``H[a][b]`` of
        shape ``x[a].shape + x[b].shape`` nested as ``torch.func.hessian`` does.

    Example:
        >>> f = lambda x: x[0] ** 2 + x[0] * x[1] + 3 * x[1] ** 2
        >>> hessian(f, torch.tensor([1.0, 2.0]))
        tensor([[2., 1.],
                [1., 6.]])
    """
    check_function("hessian", f)
    chunk_size = check_chunk_size("hessian", chunk_size)
    check_input("hessian", "x", x)
    return _hessian("hessian", f, x, chunk_size, bool(flat))


def batch_hessian(
    f: Callable[[Any], torch.Tensor], xs: Any, *, chunk_size: int | None = None
) -> Any:
    """One Hessian per example, vectorised over the batch, without cross-example blocks.

    H_b = d^2 f(xs[b]) / dxs[b]^2 for every b, as ``vmap(hessian(f))(xs)``.

    Args:
        f: a scalar function of ONE example.
        xs: floating Tensors (or a tuple or dict of them) with a shared leading batch dimension.
        chunk_size: basis vectors per vmapped batch of HVPs, as in ``hessian``.

    Returns:
        Shape ``(B, *in, *in)`` for Tensors; structures are nested as in ``hessian``.

    Example:
        >>> batch_hessian(lambda x: (x**3).sum(), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([[[ 6.,  0.],
                 [ 0., 12.]],
        <BLANKLINE>
                [[18.,  0.],
                 [ 0., 24.]]])
    """
    check_function("batch_hessian", f)
    chunk_size = check_chunk_size("batch_hessian", chunk_size)
    check_batched_input("batch_hessian", xs)
    with composite_norms():  # torch's fused norm backwards cannot be vmapped
        return torch.func.vmap(lambda x: _hessian("batch_hessian", f, x, chunk_size, False))(xs)


def hessian_diagonal(
    f: Callable[[Any], torch.Tensor], x: Any, *, chunk_size: int | None = None
) -> Any:
    """The exact diagonal of the Hessian, never holding more than ``chunk_size`` rows of it.

    diag(H)_i = e_i^T H e_i, from vmapped HVPs with chunks of the identity basis.

    Args:
        f: a function of ``x`` returning a scalar Tensor.
        x: a floating Tensor, or a tuple or dict of them.
        chunk_size: basis vectors per vmapped batch; memory is about ``chunk_size`` HVPs.
            None uses a default of 128.

    Returns:
        The diagonal with the structure and shapes of ``x``.

    Example:
        >>> hessian_diagonal(lambda x: (x**3).sum(), torch.tensor([1.0, 2.0]))
        tensor([ 6., 12.])
    """
    check_function("hessian_diagonal", f)
    chunk_size = check_chunk_size("hessian_diagonal", chunk_size)
    check_input("hessian_diagonal", "x", x)
    function = FlatFunction(f, x, "hessian_diagonal", scalar=True)
    vector = function.vector

    def run(composition: str) -> torch.Tensor:
        product = _row_product(function, composition)
        chunks = basis_products(product, vector.numel(), vector, chunk_size)
        return torch.cat([vector.new_zeros(0), *(rows.diagonal(start) for start, rows in chunks)])

    return split(_with_composition(run), *function.inputs)
