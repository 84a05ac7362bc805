"""Boundary checks shared by the derivative functions: inputs, tangents, options, outputs of f."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .._checks import check_choice, type_error, value_error
from .tree import leaves_of

STRUCTURE = "a Tensor, or a tuple or dict of Tensors"

#: How to get a real function from a complex one: every derivative here is of real numbers.
SPLIT_COMPLEX = (
    "Split complex numbers into real and imaginary parts with torch.view_as_real(z) (and back "
    "inside f with torch.view_as_complex): derivatives of real functions are exact in every mode."
)


def check_function(func: str, f: Any) -> None:
    """``f`` must be callable."""
    if not callable(f):
        raise type_error(func, "f", "a callable", f, "Pass a function of x returning Tensors.")


def check_input(func: str, arg: str, x: Any) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """``x`` must be a structure of floating-point Tensors; returns its leaves and structure."""
    leaves, spec = leaves_of(x, func, arg)
    for leaf in leaves:
        if not leaf.is_floating_point():
            fix = (
                SPLIT_COMPLEX
                if leaf.is_complex()
                else f"Convert with {arg}.to(torch.float64) (or float32)."
            )
            raise type_error(
                func, arg, "floating-point Tensors (derivatives need real numbers)", leaf, fix
            )
    return leaves, spec


def check_batched_input(func: str, xs: Any) -> None:
    """``xs`` must be floating Tensors that share a leading batch dimension."""
    leaves, _ = check_input(func, "xs", xs)
    size = leaves[0].shape[0] if leaves[0].dim() else None
    for leaf in leaves:
        if leaf.dim() == 0 or leaf.shape[0] != size:
            raise value_error(
                func,
                "xs",
                "Tensors with one shared leading batch dimension"
                + ("" if size is None else f" of size {size}"),
                leaf,
                "Stack the examples along a new first dimension, e.g. torch.stack(examples).",
            )


def check_like(func: str, arg: str, value: Any, reference: Any, name: str) -> None:
    """``value`` must have the structure, shapes, dtypes and devices of ``reference``."""
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    fix = f"Pass {arg} with the same structure, shape, dtype and device as {name}."
    leaves, spec = pytree.tree_flatten(value)
    if spec != ref_spec:
        expected = f"the structure of {name} ({describe_tree(reference)})"
        raise type_error(func, arg, expected, value, fix)
    for leaf, ref in zip(leaves, ref_leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            raise type_error(func, arg, f"Tensors like {name}", leaf, fix)
        if leaf.shape != ref.shape or leaf.dtype != ref.dtype or leaf.device != ref.device:
            expected = (
                f"a Tensor like {name}: shape {tuple(ref.shape)}, dtype {ref.dtype}, "
                f"device {ref.device}"
            )
            raise value_error(func, arg, expected, leaf, fix)


def describe_tree(tree: Any) -> str:
    """A short description of a structure of tensors."""
    if isinstance(tree, torch.Tensor):
        return "a Tensor"
    if isinstance(tree, dict):
        return f"a dict with keys {sorted(map(str, tree))}"
    if isinstance(tree, (tuple, list)):
        return f"a {type(tree).__name__} of length {len(tree)}"
    return f"an object of type {type(tree).__name__}"


def check_chunk_size(func: str, chunk_size: Any) -> int | None:
    """``chunk_size`` must be None or an integer >= 1."""
    if chunk_size is None:
        return None
    expected = "an integer >= 1 or None"
    fix = "Pass the number of basis vectors per batch (smaller uses less memory), or None."
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise type_error(func, "chunk_size", expected, chunk_size, fix)
    if chunk_size < 1:
        raise value_error(func, "chunk_size", expected, chunk_size, fix)
    return int(chunk_size)


def check_mode(func: str, mode: Any, choices: tuple[str, ...]) -> str:
    """``mode`` must be one of ``choices``."""
    return check_choice(func, "mode", mode, choices)


def check_order(func: str, order: Any) -> int:
    """``order`` must be an integer >= 1."""
    fix = "Pass order=1 for the first derivative, order=2 for the second, and so on."
    if isinstance(order, bool) or not isinstance(order, numbers.Integral):
        raise type_error(func, "order", "an integer >= 1", order, fix)
    if order < 1:
        raise value_error(func, "order", "an integer >= 1", order, fix)
    return int(order)


def check_real_output(func: str, leaf: torch.Tensor) -> None:
    """An output of ``f`` must be real floating point: complex and integer values are refused.

    Reverse mode would silently keep only the real part of a complex output, and integer or
    boolean outputs (argmax, comparisons) have no derivative, so every mode refuses both alike.
    """
    if leaf.is_floating_point():
        return
    if leaf.is_complex():
        expected = "a function returning real floating-point Tensors (not complex ones)"
        raise type_error(func, "f", expected, leaf, SPLIT_COMPLEX)
    raise type_error(
        func,
        "f",
        "a function returning floating-point Tensors (integer and boolean values, e.g. from "
        "argmax or a comparison, have no derivative)",
        leaf,
        "Return the floating-point values they come from (e.g. the logits instead of their "
        "argmax), and compute integer results outside f.",
    )


def check_output(func: str, out: Any, *, scalar: bool) -> list[torch.Tensor]:
    """The value of ``f`` must be real floating Tensors (one element if ``scalar``)."""
    if scalar:
        if not isinstance(out, torch.Tensor):
            raise type_error(
                func,
                "f",
                "a function returning a scalar Tensor",
                out,
                "Return a torch.Tensor, e.g. torch.as_tensor(value).",
            )
        if out.numel() != 1:
            raise value_error(
                func,
                "f",
                "a function returning a scalar Tensor (one element)",
                out,
                "Reduce the output, e.g. return loss.sum() or loss.mean().",
            )
        check_real_output(func, out)
        return [out]
    leaves, _ = pytree.tree_flatten(out)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise type_error(
                func,
                "f",
                f"a function returning {STRUCTURE}",
                out,
                "Return torch.Tensors, e.g. torch.as_tensor(value).",
            )
    if not leaves:
        raise type_error(func, "f", f"a function returning {STRUCTURE}", out, "Return a Tensor.")
    for leaf in leaves:
        check_real_output(func, leaf)
    return leaves


def checked(f: Callable[..., Any], func: str, *, scalar: bool = False) -> Callable[[Any], Any]:
    """``f`` with its output validated on every call (a scalar output is reshaped to ``()``)."""

    def wrapped(x: Any) -> Any:
        out = f(x)
        check_output(func, out, scalar=scalar)
        return out.reshape(()) if scalar else out

    return wrapped
