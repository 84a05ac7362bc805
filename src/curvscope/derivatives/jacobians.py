"""Full Jacobians: vmapped JVPs over input basis vectors (forward) or VJPs over output ones.

Forward mode costs one JVP per input entry, reverse mode one VJP per output entry, so the cheaper
mode is the one over the smaller side (Griewank & Walther, "Evaluating Derivatives", SIAM 2008).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func

from ._basis import FlatFunction, basis_matrix
from ._norms import composite_norms
from ._validate import (
    check_batched_input,
    check_chunk_size,
    check_function,
    check_input,
    check_mode,
)
from .products import forward_or_reverse
from .tree import split_matrix

__all__ = ["batch_jacobian", "jacobian"]

JACOBIAN_MODES = ("auto", "forward", "reverse")


def _forward(flat: FlatFunction, chunk_size: int | None) -> torch.Tensor:
    """J as (out numel, in numel) from JVPs with the input basis."""
    x = flat.vector

    def column(tangent: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(flat, (x,), (tangent,))[1]

    return basis_matrix(column, x.numel(), x, chunk_size).T.contiguous()


def _flat_jacobian(flat: FlatFunction, mode: str, chunk_size: int | None) -> torch.Tensor:
    """The (out numel, in numel) Jacobian of a flat function at ``flat.vector``."""
    if mode == "auto":
        with torch.no_grad():  # only the output size is needed: the cheapest evaluation
            out_size = flat(flat.vector).numel()
        if flat.vector.numel() >= out_size:
            return _flat_jacobian(flat, "reverse", chunk_size)
        return forward_or_reverse(
            lambda: _forward(flat, chunk_size), lambda: _flat_jacobian(flat, "reverse", chunk_size)
        )
    if mode == "forward":
        return _forward(flat, chunk_size)
    out, pullback = torch.func.vjp(flat, flat.vector)
    return basis_matrix(lambda u: pullback(u)[0], out.numel(), out, chunk_size)


def _jacobian(
    func: str, f: Callable[[Any], Any], x: Any, mode: str, chunk_size: int | None, flat: bool
) -> Any:
    function = FlatFunction(f, x, func, scalar=False)
    matrix = _flat_jacobian(function, mode, chunk_size)
    return matrix if flat else split_matrix(matrix, function.outputs, function.inputs)


def jacobian(
    f: Callable[[Any], Any],
    x: Any,
    *,
    mode: str = "auto",
    chunk_size: int | None = None,
    flat: bool = False,
) -> Any:
    """The full Jacobian of ``f`` at ``x``, from vmapped products with basis vectors.

    J[i, j] = d f_i / d x_j: forward mode stacks J e_j, reverse mode stacks J^T e_i.

    Args:
        f: a function of ``x`` returning a Tensor, or a tuple or dict of Tensors.
        x: a floating Tensor, or a tuple or dict of them.
        mode: ``"forward"``, ``"reverse"`` or ``"auto"``: forward when x has fewer entries than
            f(x), else reverse (falling back to reverse if an operation lacks forward-mode AD).
        chunk_size: basis vectors per vmapped batch; smaller uses less memory, the result is the
            same. None uses a default of 128.
        flat: return one (f(x) numel, x numel) matrix, in the order of ``curvscope.flatten``.

    Returns:
        For Tensors, shape ``f(x).shape + x.shape``; for structures, blocks nested as
        ``torch.func.jacrev`` does (input structure inside output structure).

    Example:
        >>> f = lambda x: torch.stack([x[0] + x[1], x[0] * x[1], x[0] ** 2])
        >>> jacobian(f, torch.tensor([2.0, 3.0]))
        tensor([[1., 1.],
                [3., 2.],
                [4., 0.]])
    """
    check_function("jacobian", f)
    check_mode("jacobian", mode, JACOBIAN_MODES)
    chunk_size = check_chunk_size("jacobian", chunk_size)
    check_input("jacobian", "x", x)
    return _jacobian("jacobian", f, x, mode, chunk_size, bool(flat))


def batch_jacobian(
    f: Callable[[Any], Any], xs: Any, *, mode: str = "auto", chunk_size: int | None = None
) -> Any:
    """One Jacobian per example, vectorised over the batch, without cross-example blocks.

    J_b = d f(xs[b]) / d xs[b] for every b, as ``vmap(jacobian(f))(xs)``.

    Args:
        f: a function of ONE example returning a Tensor, or a tuple or dict of Tensors.
        xs: floating Tensors (or a tuple or dict of them) with a shared leading batch dimension.
        mode: ``"forward"``, ``"reverse"`` or ``"auto"`` as in ``jacobian``, per example.
        chunk_size: basis vectors per vmapped batch, as in ``jacobian``.

    Returns:
        Shape ``(B, *out, *in)`` for Tensors; structures are nested as in ``jacobian``.

    Example:
        >>> batch_jacobian(lambda x: x**2, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([[[2., 0.],
                 [0., 4.]],
        <BLANKLINE>
                [[6., 0.],
                 [0., 8.]]])
    """
    check_function("batch_jacobian", f)
    check_mode("batch_jacobian", mode, JACOBIAN_MODES)
    chunk_size = check_chunk_size("batch_jacobian", chunk_size)
    check_batched_input("batch_jacobian", xs)
    with composite_norms():  # torch's fused norm backwards cannot be vmapped
        return torch.func.vmap(
            lambda x: _jacobian("batch_jacobian", f, x, mode, chunk_size, False)
        )(xs)
