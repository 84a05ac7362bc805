"""The generalized Gauss-Newton matrix ``Jᵀ (∂²loss/∂output²) J`` as an operator."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import describe
from ..derivatives import kernel
from .data import Batch
from .losses import loss_hessian_matmat
from .model import _ModelOperator


class _OutputSpaceOperator(_ModelOperator):
    """Operators of the form ``Σ_b J_bᵀ M_b J_b``, with ``J_b`` the Jacobian of the model
    output on batch b w.r.t. the parameters and ``M_b`` a matrix on the output space.

    Per batch: ``J V`` (one column: a dual-number forward pass; a block, or where an operation
    lacks forward mode: the double-VJP trick on the plain forward pass), one output-space
    product ``M (J V)`` for all k columns, and the pullback ``Jᵀ (M J V)``. No second
    derivative of the network is ever taken. Subclasses implement ``_output_matmat``.
    """

    #: One column uses one dual-number pass until an op turns out to lack forward mode.
    _dual_pass = True

    def _output_matmat(
        self, output: torch.Tensor, batch: Batch, block: torch.Tensor
    ) -> torch.Tensor:
        """``M_b U`` for a stack ``block`` (k, *output.shape) of output-space tangents."""
        raise NotImplementedError

    def _check_output(self, output: Any, batch: Batch) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim == 0:
            raise TypeError(
                f"curvscope.{self._func}(model=...): expected a model that returns one Tensor "
                f"with a batch dimension, got {describe(output)}. Wrap the model so that it "
                "returns the tensor loss_fn takes (e.g. the logits), or use HessianOperator."
            )

    def _batch_matmat(
        self, batch: Batch, block: list[torch.Tensor], batched: bool
    ) -> list[torch.Tensor]:
        leaves = self._leaves()
        if block[0].shape[0] == 1 and self._dual_pass:
            try:
                output, jv = kernel.jvp_dual(
                    lambda tensors: self._forward(batch, tensors), leaves, [b[0] for b in block]
                )
                jv = jv.unsqueeze(0)
            except (NotImplementedError, RuntimeError) as err:
                if not kernel.lacks_forward_ad(err):
                    raise
                self._dual_pass = False  # an op without forward mode: no dual pass from now on
                return self._batch_matmat(batch, block, batched)
        else:
            output = self._forward(batch, leaves)
            jv = kernel.jvp_by_vjp(output, leaves, block, batched)
        return kernel.ggn_matmat(
            output,
            leaves,
            jv,
            lambda u: self._output_matmat(output.detach(), batch, u),
            batched=batched,
        )


class GGNOperator(_OutputSpaceOperator):
    """The generalized Gauss-Newton matrix ``G = c Σ_b J_bᵀ (∂²S_b/∂f²) J_b`` (P, P).

    ``J_b`` is the Jacobian of the model output ``f`` on batch b with respect to the parameters,
    ``S_b`` the summed loss on that batch, ``c = 1/Z`` (reduction "mean"; Z is what the loss
    averages over in the whole data, e.g. the class weights of the counted targets) or 1 ("sum")
    (Schraudolph, 2002, "Fast curvature matrix-vector products for second-order gradient
    descent"; Martens, 2020, "New insights and perspectives on the natural gradient method").
    Products go JVP -> loss-Hessian product -> VJP, never through a second derivative of the
    network. The loss Hessian is closed-form for cross-entropy with class indices (``diag(p) -
    p pᵀ`` per position, times its class weight and smoothing factor) and MSE (``2 I``);
    a double VJP on the output for any other loss that torch can differentiate twice (piecewise
    losses such as ``HuberLoss`` get their almost-everywhere second derivative). A loss whose
    backward torch cannot differentiate (``MultiMarginLoss``) raises a ValueError naming it.
    G is positive semi-definite for convex losses.

    Args:
        model: the network; it must return one Tensor (the input of ``loss_fn``).
        loss_fn: ``loss_fn(output, targets) -> scalar``; an nn loss module or a callable.
        data: an iterable of ``(inputs, targets)`` batches, or one such batch.
        params: names of the parameters (None: all with requires_grad).
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
        >>> curvscope.GGNOperator(model, torch.nn.MSELoss(), data).to_dense()
        tensor([[5.]], dtype=torch.float64)
    """

    def _output_matmat(
        self, output: torch.Tensor, batch: Batch, block: torch.Tensor
    ) -> torch.Tensor:
        spec = self._loss_spec
        closed = loss_hessian_matmat(spec, output, batch.targets, batch.size, block)
        if closed is not None:
            return closed
        return kernel.output_hessian_matmat(lambda out: self._batch_loss(batch, out), output, block)
