"""The Hessian of the full-data loss with respect to the parameters, as an operator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .._checks import check_choice
from .data import Batch
from .model import _ModelOperator, _PassState, first_is_faster

_MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")


def _forward_over_reverse(
    loss: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, matrix: torch.Tensor
) -> torch.Tensor:
    """``H V`` by forward-mode differentiation of the gradient (torch.func), vmapped over V."""
    gradient = grad(loss)
    if matrix.shape[1] == 1:
        return jvp(gradient, (theta,), (matrix[:, 0],))[1][:, None]
    return vmap(lambda v: jvp(gradient, (theta,), (v,))[1])(matrix.T).T


def _reverse_over_reverse(
    loss: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    matrix: torch.Tensor,
    *,
    batched: bool = True,
) -> torch.Tensor:
    """``H V`` by differentiating ``∇L · v`` (Pearlmutter) on a detached leaf, so no ``.grad``
    is ever written. The k columns share one forward and backward pass; their double backward
    passes are vmapped (``batched``) or run one after another on the retained graph."""
    leaf = theta.detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(loss(leaf), leaf, create_graph=True)
        if matrix.shape[1] == 1 or not batched:
            columns = [
                torch.autograd.grad(gradient, leaf, column, retain_graph=True)[0]
                for column in matrix.T
            ]
            return torch.stack(columns, dim=1)
        (product,) = torch.autograd.grad(gradient, leaf, matrix.T, is_grads_batched=True)
    return product.T


_PRODUCTS = {
    "forward-over-reverse": _forward_over_reverse,
    "reverse-over-reverse": _reverse_over_reverse,
}


class HessianOperator(_ModelOperator):
    """The Hessian ``H = ∇²_θ L(θ)`` of the full-data loss, as a (P, P) operator.

    ``L`` is ``loss_fn`` over the whole of ``data``: ``L = Σ_b (n_b/N) L_b`` for reduction
    "mean" (weighted by true batch sizes) and ``Σ_b L_b`` for "sum". A product ``H v`` is one
    Hessian-vector product per batch (Pearlmutter, 1994, "Fast exact multiplication by the
    Hessian"), vmapped over the k columns of a block.

    Args:
        model: the network; evaluated in eval mode and never modified.
        loss_fn: ``loss_fn(output, targets) -> scalar``; an nn loss module or a callable.
        data: an iterable of ``(inputs, targets)`` batches, or one such batch.
        params: names of the parameters to differentiate (None: all with requires_grad).
        hvp_mode: "forward-over-reverse", "reverse-over-reverse", or "auto" (time both on the
            first batch once and keep the faster; the one that works if one fails).
        max_batch_size: split batches into micro-batches of at most this many examples.
        progress: show a progress bar over batches.
        reduction: "mean" or "sum" for plain-callable losses (read from nn loss modules).
        eval_mode: evaluate the model in eval mode (default); False keeps its current mode.
        check_deterministic: on first use, check that two passes give the same batches.

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> data = (torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.zeros(2, 1))
        >>> op = curvscope.HessianOperator(model, torch.nn.MSELoss(), data)
        >>> op.to_dense()  # mean of 2 x^2 over x = 1, 2
        tensor([[5.]], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        params: Sequence[str] | None = None,
        hvp_mode: str = "auto",
        max_batch_size: int | None = None,
        progress: bool = False,
        reduction: str | None = None,
        eval_mode: bool = True,
        check_deterministic: bool = True,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            reduction=reduction,
            max_batch_size=max_batch_size,
            progress=progress,
            eval_mode=eval_mode,
            check_deterministic=check_deterministic,
        )
        check_choice(self._func, "hvp_mode", hvp_mode, _MODES)
        self._options["hvp_mode"] = hvp_mode
        self._hvp_mode = hvp_mode

    @property
    def hvp_mode(self) -> str:
        """The product mode in use ("auto" until the first product has chosen one)."""
        return self._hvp_mode

    def _batch_matmat(self, state: _PassState, batch: Batch, matrix: torch.Tensor) -> torch.Tensor:
        loss = self._loss_of(state, batch)
        if self._hvp_mode == "auto":
            self._hvp_mode = self._choose_mode(loss, state.theta, matrix[:, :1])
        if self._hvp_mode != "reverse-over-reverse" or matrix.shape[1] == 1:
            return _PRODUCTS[self._hvp_mode](loss, state.theta, matrix)
        if self._batched is None:  # vmapped double backward is slower for some layers (conv)
            self._batched = self._faster_batched(loss, state.theta, matrix)
        return _reverse_over_reverse(loss, state.theta, matrix, batched=self._batched)

    _batched: bool | None = None

    def _faster_batched(
        self, loss: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, block: torch.Tensor
    ) -> bool:
        """Whether vmapped double backward beats a loop over the columns (timed once, on up to
        four columns of this batch)."""
        block = block[:, :4]
        return first_is_faster(
            lambda: _reverse_over_reverse(loss, theta, block, batched=True),
            lambda: _reverse_over_reverse(loss, theta, block, batched=False),
            theta.device,
        )

    def _choose_mode(
        self,
        loss: Callable[[torch.Tensor], torch.Tensor],
        theta: torch.Tensor,
        column: torch.Tensor,
    ) -> str:
        """Time both modes on one column; keep the faster of those that work."""
        errors = {}
        for mode, product in _PRODUCTS.items():
            try:
                product(loss, theta, column)
            except (RuntimeError, NotImplementedError) as err:
                errors[mode] = err
        working = [mode for mode in _PRODUCTS if mode not in errors]
        if len(working) < 2:
            if not working:
                raise errors["reverse-over-reverse"]
            return working[0]
        forward = first_is_faster(
            lambda: _forward_over_reverse(loss, theta, column),
            lambda: _reverse_over_reverse(loss, theta, column),
            theta.device,
        )
        return "forward-over-reverse" if forward else "reverse-over-reverse"
