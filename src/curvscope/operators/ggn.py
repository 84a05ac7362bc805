"""The generalized Gauss-Newton matrix ``Jᵀ (∂²loss/∂output²) J`` as an operator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import forward_ad
from torch.func import jvp, vjp, vmap

from .._checks import describe
from .data import Batch
from .losses import loss_hessian_matmat
from .model import _ModelOperator, _PassState, first_is_faster


class _OutputSpaceOperator(_ModelOperator):
    """Operators of the form ``Σ_b w_b J_bᵀ M_b J_b``, with ``J_b`` the Jacobian of the model
    output on batch b w.r.t. the parameters and ``M_b`` a matrix on the output space.

    Per batch and column: one JVP (J v), one output-space product (M J v), one VJP (Jᵀ M J v);
    no second derivative of the network is ever taken.
    """

    #: One column uses one dual-number pass until an op turns out to lack forward mode.
    _dual_pass = True
    #: Blocks of columns: vmapped (True) or looped (False), timed once on first use.
    _batched: bool | None = None

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

    def _batch_matmat(self, state: _PassState, batch: Batch, matrix: torch.Tensor) -> torch.Tensor:
        output_fn, theta = self._output_of(state, batch), state.theta
        if matrix.shape[1] == 1:
            return self._column(output_fn, theta, batch, matrix[:, 0])[:, None]
        if self._batched is None:  # vmapped products are slower for some layers (conv)
            block = matrix[:, :4]
            self._batched = first_is_faster(
                lambda: self._block(output_fn, theta, batch, block),
                lambda: self._looped(output_fn, theta, batch, block),
                theta.device,
            )
        if self._batched:
            return self._block(output_fn, theta, batch, matrix)
        return self._looped(output_fn, theta, batch, matrix)

    def _looped(
        self, output_fn: Callable, theta: torch.Tensor, batch: Batch, matrix: torch.Tensor
    ) -> torch.Tensor:
        columns = [self._column(output_fn, theta, batch, column) for column in matrix.T]
        return torch.stack(columns, dim=1)

    def _column(
        self, output_fn: Callable, theta: torch.Tensor, batch: Batch, vector: torch.Tensor
    ) -> torch.Tensor:
        if self._dual_pass:
            try:
                return self._batch_matvec(output_fn, theta, batch, vector)
            except NotImplementedError:  # an op without forward mode: no dual pass from now on
                self._dual_pass = False
        return self._block(output_fn, theta, batch, vector[:, None])[:, 0]

    def _block(
        self, output_fn: Callable, theta: torch.Tensor, batch: Batch, matrix: torch.Tensor
    ) -> torch.Tensor:
        """All k columns at once: one VJP graph, vmapped JVPs and pullbacks."""
        output, pullback = vjp(output_fn, theta)
        try:
            jv = vmap(lambda v: jvp(output_fn, (theta,), (v,))[1])(matrix.T)
        except NotImplementedError:  # an op without forward mode: J V as the transpose of Jᵀ
            _, transpose = vjp(lambda u: pullback(u)[0], torch.zeros_like(output))
            jv = vmap(lambda v: transpose(v)[0])(matrix.T)
        mjv = self._output_matmat(output.detach(), batch, jv)
        return vmap(lambda u: pullback(u)[0])(mjv).T

    def _batch_matvec(
        self, output_fn: Callable, theta: torch.Tensor, batch: Batch, vector: torch.Tensor
    ) -> torch.Tensor:
        """One column: a single forward pass carries both the graph for the VJP and the JVP
        (dual numbers), which saves the second forward pass of separate jvp and vjp calls."""
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            with forward_ad.dual_level():
                output, jv = forward_ad.unpack_dual(output_fn(forward_ad.make_dual(leaf, vector)))
            # outside the dual level: the loss-Hessian product may use forward mode itself
            mjv = self._output_matmat(output.detach(), batch, jv.unsqueeze(0))[0]
            return torch.autograd.grad(output, leaf, mjv)[0]


class GGNOperator(_OutputSpaceOperator):
    """The generalized Gauss-Newton matrix ``G = Σ_b w_b J_bᵀ (∂²L_b/∂f²) J_b`` (P, P).

    ``J_b`` is the Jacobian of the model output ``f`` on batch b with respect to the parameters,
    ``L_b`` the loss on that batch, ``w_b = n_b / N`` (reduction "mean") or 1 ("sum")
    (Schraudolph, 2002, "Fast curvature matrix-vector products for second-order gradient
    descent"; Martens, 2020, "New insights and perspectives on the natural gradient method").
    Products go JVP -> loss-Hessian product -> VJP, never through a second derivative of the
    network. The loss Hessian is closed-form for cross-entropy (``diag(p) - p pᵀ`` per position)
    and MSE (``2 I``, over the number of elements for reduction "mean"); autograd on the output
    for any other loss. G is positive semi-definite for convex losses.

    Args:
        model: the network; it must return one Tensor (the input of ``loss_fn``).
        loss_fn: ``loss_fn(output, targets) -> scalar``; an nn loss module or a callable.
        data: an iterable of ``(inputs, targets)`` batches, or one such batch.
        params: names of the parameters (None: all with requires_grad).
        max_batch_size: split batches into micro-batches of at most this many examples.
        progress: show a progress bar over batches.
        reduction: "mean" or "sum" for plain-callable losses (read from nn loss modules).
        eval_mode: evaluate the model in eval mode (default); False keeps its current mode.
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
        return loss_hessian_matmat(self._loss_spec, self._loss_fn, output, batch.targets, block)
