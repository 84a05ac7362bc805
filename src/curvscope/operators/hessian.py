"""The Hessian of the full-data loss with respect to the parameters, as an operator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_choice
from ..derivatives import kernel
from .data import Batch
from .model import _ModelOperator


class HessianOperator(_ModelOperator):
    """The Hessian ``H = ∇²_θ L(θ)`` of the full-data loss, as a (P, P) operator.

    ``L`` is ``loss_fn`` over the whole of ``data`` exactly as torch defines it, whatever the
    batching: ``L = (1/Z) Σ_b S_b`` for reduction "mean", with ``S_b`` the summed loss of batch
    b and ``Z`` what the loss averages over in the whole data (examples, elements, or the class
    weights of the counted targets), and ``Σ_b S_b`` for "sum". A product ``H v`` is one
    Hessian-vector product per batch (Pearlmutter, 1994, "Fast exact multiplication by the
    Hessian"), vmapped over the k columns of a block.

    Args:
        model: the network; evaluated in eval mode and never modified.
        loss_fn: ``loss_fn(output, targets) -> scalar``; an nn loss module or a callable.
        data: an iterable of ``(inputs, targets)`` batches, or one such batch.
        params: names of the parameters to differentiate (None: all with requires_grad).
        hvp_mode: "reverse-over-reverse" (differentiate ∇L·v with autograd on the model's own
            parameters), "forward-over-reverse" (a JVP of the gradient, through a functional
            call), or "auto": reverse-over-reverse, the fastest measured and needing no
            forward-mode rule.
        max_batch_size: split batches into micro-batches of at most this many examples.
        progress: show a progress bar over batches.
        reduction: "mean" or "sum" for plain-callable losses (read from nn loss modules).
        eval_mode: True evaluates the model in eval mode; False keeps its current mode; None
            (default) is eval mode with a TrainModeWarning when the model is in training mode
            with dropout or batch norm.
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
        eval_mode: bool | None = None,
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
        check_choice(self._func, "hvp_mode", hvp_mode, kernel.MODES)
        self._options["hvp_mode"] = hvp_mode
        self._hvp_mode = hvp_mode

    @property
    def hvp_mode(self) -> str:
        """The product mode: "auto" runs as "reverse-over-reverse" (see derivatives.kernel)."""
        return kernel.resolve_mode(self._hvp_mode)

    def _batch_matmat(
        self, batch: Batch, block: list[torch.Tensor], batched: bool
    ) -> list[torch.Tensor]:
        if self.hvp_mode == "forward-over-reverse":
            return kernel.hvp_forward(
                lambda tensors: self._batch_loss(batch, self._forward(batch, tensors)),
                self._leaves(),
                block,
            )
        leaves = self._leaves()
        value = self._batch_loss(batch, self._forward(batch, leaves))
        return kernel.hvp(value, leaves, block, batched=batched)
