"""Higher-order directional derivatives by nested forward mode (Taylor mode by nesting).

d^k/dt^k f(x + t v) at t = 0 is k nested JVPs along v; see Griewank & Walther, "Evaluating
Derivatives" (SIAM 2008), ch. 13, and Bettencourt et al., "Taylor-mode automatic differentiation
for higher-order derivatives in JAX" (2019).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func

from .._checks import value_error
from ._norms import composite_norms
from ._validate import check_function, check_input, check_like, check_order, checked
from .products import lacks_forward_ad

__all__ = ["derivative"]


def _along(g: Callable[[Any], Any], direction: Any) -> Callable[[Any], Any]:
    """``y -> d/dt g(y + t direction)`` at t = 0."""
    return lambda y: torch.func.jvp(g, (y,), (direction,))[1]


def derivative(f: Callable[[Any], Any], x: Any, *, order: int, direction: Any = None) -> Any:
    """The order-k directional derivative of ``f`` at ``x``, for any order >= 1.

    d^k/dt^k f(x + t v) at t = 0; for a one-element x and no direction, the ordinary f^(k)(x).

    For order >= 2, ``layer_norm``, ``batch_norm`` and ``instance_norm`` inside ``f`` are computed
    from elementary operations (same values): torch's fused kernels give wrong nested
    forward-mode derivatives (pytorch/pytorch#196700).

    Args:
        f: a function of ``x`` returning a Tensor, or a tuple or dict of Tensors.
        x: a floating Tensor, or a tuple or dict of them.
        order: k, an integer >= 1. The cost grows as 2^k forward passes.
        direction: v, with the structure, shapes, dtype and device of ``x``. Optional (ones) when
            ``x`` is a Tensor with one element.

    Returns:
        The derivative, with the structure and shapes of ``f(x)``.

    Raises:
        NotImplementedError: if an operation in ``f`` has no forward-mode rule in torch.

    Example:
        >>> derivative(lambda x: x**3, torch.tensor(3.0), order=2)
        tensor(18.)
    """
    check_function("derivative", f)
    order = check_order("derivative", order)
    check_input("derivative", "x", x)
    if direction is None:
        if not isinstance(x, torch.Tensor) or x.numel() != 1:
            raise value_error(
                "derivative",
                "direction",
                "a direction shaped like x (it may be omitted only for a one-element Tensor x)",
                direction,
                "Pass direction=v, e.g. a unit vector torch.zeros_like(x) with one entry set to 1.",
            )
        direction = torch.ones_like(x)
    check_like("derivative", "direction", direction, x, "x")
    g = checked(f, "derivative")
    for _ in range(order):
        g = _along(g, direction)
    try:
        if order == 1:
            return g(x)
        with composite_norms():  # torch's fused norms have wrong higher-order rules
            return g(x)
    except (NotImplementedError, RuntimeError) as error:
        if not lacks_forward_ad(error):
            raise
        raise NotImplementedError(
            "curvscope.derivative(f=...): an operation inside f has no forward-mode derivative "
            f"in torch, and derivative nests forward mode ({' '.join(str(error).split())}). For "
            "order 1 use jvp or vjp; for order 2 of a scalar f, v @ hvp(f, x, v) (reverse mode)."
        ) from error
