"""Flattening a structure of tensors (a Tensor, or tuples, lists and dicts of them) to one vector.

The order is the one of ``torch.utils._pytree`` (the order ``torch.func`` uses): tuple and list
items in order, dict items in insertion order, each tensor in row-major order. Every ``flat=True``
matrix of curvscope uses this order for its rows and columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .._checks import type_error, value_error

__all__ = ["flatten"]


def leaves_of(tree: Any, func: str, arg: str) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """The tensors of ``tree`` and its structure; raises if a leaf is not a Tensor."""
    leaves, spec = pytree.tree_flatten(tree)
    if not leaves:
        raise value_error(
            func, arg, "a Tensor, or a tuple or dict of Tensors", tree, "Pass at least one Tensor."
        )
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise type_error(
                func,
                arg,
                "a Tensor, or a tuple or dict of Tensors",
                leaf,
                "Wrap numbers with torch.tensor(..., dtype=torch.float64).",
            )
    return leaves, spec


def join(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors, each flattened, into one vector (no copy for a single tensor)."""
    if len(leaves) == 1:
        return leaves[0].reshape(-1)
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


def split(vector: torch.Tensor, shapes: Sequence[torch.Size], spec: pytree.TreeSpec) -> Any:
    """The inverse of ``join``: cut ``vector`` into tensors of ``shapes`` in structure ``spec``."""
    if len(shapes) == 1:
        return pytree.tree_unflatten([vector.view(shapes[0])], spec)
    pieces = vector.split([math.prod(shape) for shape in shapes])
    return pytree.tree_unflatten(
        [piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)], spec
    )


def split_matrix(
    matrix: torch.Tensor,
    out: tuple[Sequence[torch.Size], pytree.TreeSpec],
    inp: tuple[Sequence[torch.Size], pytree.TreeSpec],
) -> Any:
    """Cut a (out numel, in numel) matrix into blocks of shape ``out_shape + in_shape``.

    The result nests the input structure inside the output structure, as ``torch.func.jacrev``.
    """
    (out_shapes, out_spec), (in_shapes, in_spec) = out, inp
    rows = matrix.split([math.prod(shape) for shape in out_shapes], dim=0)
    in_sizes = [math.prod(shape) for shape in in_shapes]
    blocks = []
    for row, out_shape in zip(rows, out_shapes, strict=True):
        cells = row.split(in_sizes, dim=1)
        blocks.append(
            pytree.tree_unflatten(
                [
                    cell.reshape(out_shape + in_shape)
                    for cell, in_shape in zip(cells, in_shapes, strict=True)
                ],
                in_spec,
            )
        )
    return pytree.tree_unflatten(blocks, out_spec)


def flatten(tree: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """Flatten a Tensor, or a tuple/list/dict of Tensors, into one vector.

    vector = concat(vec(leaf) for leaf in tree), in ``torch.utils._pytree`` order.

    Args:
        tree: a Tensor, or a (nested) tuple, list or dict of Tensors of one dtype and device.

    Returns:
        ``(vector, unflatten)``: the 1-D vector of all entries, and a function mapping any vector
        of that length back to the structure and shapes of ``tree``.

    Example:
        >>> vector, unflatten = flatten({"w": torch.ones(2, 2), "b": torch.zeros(1)})
        >>> vector
        tensor([1., 1., 1., 1., 0.])
        >>> unflatten(torch.arange(5.0))["b"]
        tensor([4.])
    """
    leaves, spec = leaves_of(tree, "flatten", "tree")
    first = leaves[0]
    for leaf in leaves[1:]:
        if leaf.dtype != first.dtype or leaf.device != first.device:
            raise value_error(
                "flatten",
                "tree",
                f"Tensors of one dtype and device (the first is {first.dtype} on {first.device})",
                leaf,
                "Convert all tensors with .to(dtype, device) first.",
            )
    shapes = [leaf.shape for leaf in leaves]
    size = sum(leaf.numel() for leaf in leaves)

    def unflatten(vector: torch.Tensor) -> Any:
        expected = f"a 1-D Tensor of length {size}"
        fix = "Pass a vector shaped like the one flatten returned."
        if not isinstance(vector, torch.Tensor):
            raise type_error("flatten.unflatten", "vector", expected, vector, fix)
        if vector.shape != (size,):
            raise value_error(
                "flatten.unflatten",
                "vector",
                expected,
                vector,
                fix,
            )
        return split(vector, shapes, spec)

    return join(leaves), unflatten


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """Every Tensor in a nested structure (tuples, lists, dicts), in ``pytree`` order."""
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``tree`` with ``fn`` applied to every Tensor; other leaves are kept as they are."""
    return pytree.tree_map_only(torch.Tensor, fn, tree)


def split_flat(vector: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Cut a flat vector (or the last dimension of a (k, n) block) into views of ``shapes``."""
    lead = vector.shape[:-1]
    pieces = vector.split([math.prod(shape) for shape in shapes], dim=-1)
    return [piece.view(*lead, *shape) for piece, shape in zip(pieces, shapes, strict=True)]
