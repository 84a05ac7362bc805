"""Products with the Jacobian and the Hessian without forming them: JVP, VJP and HVP.

Forward mode pushes a tangent through ``f`` (one pass gives ``J v``); reverse mode pulls a
cotangent back (one pass gives ``J^T u``); composing both on the gradient gives ``H v``
(Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994). See Griewank &
Walther, "Evaluating Derivatives" (SIAM 2008) for the two modes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.func

from ._validate import check_function, check_input, check_like, check_mode, checked
from .kernel import MODES, lacks_forward_ad

__all__ = ["hvp", "jvp", "vjp"]

HVP_MODES = MODES  # one meaning of mode everywhere: see derivatives.kernel

T = TypeVar("T")


def forward_or_reverse(forward: Callable[[], T], reverse: Callable[[], T]) -> T:
    """Run ``forward()``; if an operation lacks forward-mode AD, run ``reverse()`` instead."""
    try:
        return forward()
    except (NotImplementedError, RuntimeError) as error:
        if not lacks_forward_ad(error):
            raise
    return reverse()


def jvp(f: Callable[[Any], Any], x: Any, v: Any) -> tuple[Any, Any]:
    """Jacobian-vector product in forward mode, with the value of ``f``.

    (f(x), J v) with J = df/dx at x, in one forward pass.

    Args:
        f: a function of ``x`` returning a Tensor, or a tuple or dict of Tensors.
        x: a floating Tensor, or a tuple or dict of them.
        v: the tangent, with the structure, shapes, dtype and device of ``x``.

    Returns:
        ``(f(x), J v)``; ``J v`` has the structure and shapes of ``f(x)``.

    Example:
        >>> f = lambda x: torch.stack([x[0] + x[1], x[0] * x[1], x[0] ** 2])
        >>> jvp(f, torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))[1]
        tensor([1., 3., 4.])
    """
    check_function("jvp", f)
    check_input("jvp", "x", x)
    check_like("jvp", "v", v, x, "x")
    return torch.func.jvp(checked(f, "jvp"), (x,), (v,))


def vjp(f: Callable[[Any], Any], x: Any, u: Any) -> tuple[Any, Any]:
    """Vector-Jacobian product in reverse mode, with the value of ``f``.

    (f(x), J^T u) with J = df/dx at x, in one forward and one backward pass.

    Args:
        f: a function of ``x`` returning a Tensor, or a tuple or dict of Tensors.
        x: a floating Tensor, or a tuple or dict of them.
        u: the cotangent, with the structure, shapes, dtype and device of ``f(x)``.

    Returns:
        ``(f(x), J^T u)``; ``J^T u`` has the structure and shapes of ``x``.

    Example:
        >>> f = lambda x: torch.stack([x[0] + x[1], x[0] * x[1], x[0] ** 2])
        >>> vjp(f, torch.tensor([2.0, 3.0]), torch.tensor([1.0, 10.0, 100.0]))[1]
        tensor([431.,  21.])
    """
    check_function("vjp", f)
    check_input("vjp", "x", x)
    out, pullback = torch.func.vjp(checked(f, "vjp"), x)
    check_like("vjp", "u", u, out, "f(x)")
    return out, pullback(u)[0]


def hvp(f: Callable[[Any], torch.Tensor], x: Any, v: Any, *, mode: str = "auto") -> Any:
    """Hessian-vector product of a scalar function, without forming the Hessian.

    H v = d/dt grad f(x + t v) at t = 0 (Pearlmutter 1994).

    Args:
        f: a function of ``x`` returning a scalar Tensor.
        x: a floating Tensor, or a tuple or dict of them.
        v: the vector, with the structure, shapes, dtype and device of ``x``.
        mode: ``"forward-over-reverse"`` (a JVP of the gradient), ``"reverse-over-reverse"`` (a
            VJP of the gradient), or ``"auto"``: reverse-over-reverse, measured fastest on a CPU
            (about 2 gradients per product for an MLP, against 3 to 4 for forward-over-reverse,
            whose nested transforms cost more) and needing no forward-mode AD from any operation.

    Returns:
        ``H v`` with the structure and shapes of ``x``.

    Example:
        >>> f = lambda x: x[0] ** 2 + x[0] * x[1] + 3 * x[1] ** 2
        >>> hvp(f, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.5]))
        tensor([2.5000, 4.0000])
    """
    check_function("hvp", f)
    check_mode("hvp", mode, HVP_MODES)
    check_input("hvp", "x", x)
    check_like("hvp", "v", v, x, "x")
    gradient = torch.func.grad(checked(f, "hvp", scalar=True))
    if mode == "forward-over-reverse":
        return torch.func.jvp(gradient, (x,), (v,))[1]
    return torch.func.vjp(gradient, x)[1](v)[0]
