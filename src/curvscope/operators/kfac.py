"""Kronecker-factored approximate curvature (KFAC) as an operator with an exact inverse."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_choice
from ._kfac_capture import find_layers
from ._kronecker import DiagonalFactor, KroneckerBlock, KroneckerFactor
from ._layer_operator import LayerOperator, add_statistics
from ._layer_pass import (
    input_statistics,
    norm_statistics,
    output_statistics,
)
from ._statistics import statistics_pass

_FISHERS = ("ggn", "monte_carlo", "empirical")
_APPROX = ("expand", "reduce")


class KFACOperator(LayerOperator):
    """Kronecker-factored approximate curvature ``K = blockdiag_l(G_l ⊗ A_l)`` (P, P).

    Per layer (Martens & Grosse, 2015; Grosse & Martens, 2016): the weight and bias of one module
    share one factorisation, the input augmented with a constant 1 (``ā = [a, 1]``);
    ``A = (1/N) Σ_n Σ_r ā_nr ā_nrᵀ / R`` over the N examples and the R positions that share the
    weight, and ``G = Σ_n Σ_r Σ_c g_nrc g_nrcᵀ`` with ``g = Jᵀ c`` the layer's output gradient
    back-propagated from an output-space column ``c``: a column of a square root of the loss
    Hessian (``fisher="ggn"``, the type-2 Fisher), the gradient at one label drawn from the model
    per example (``"monte_carlo"``), or at the true label (``"empirical"``: the gradient of each
    example's summed loss terms, over the m terms per example that the mean divides by, so that
    its expectation under the model is the GGN); the columns carry the loss normalisation of
    the dataset (1/N for a mean). For a single datum, or a deep linear
    network with MSE, ``fisher="ggn"`` gives the exact GGN's layer blocks.

    Weight sharing (Eschenhagen et al., 2023, "Kronecker-factored approximate curvature for
    modern neural network architectures"): ``approx="expand"`` treats positions (a Linear
    layer's sequence dimensions, a convolution's patches) like examples; ``"reduce"`` averages the
    inputs and sums the output gradients over positions first (``A`` then divides by N only).
    Embeddings use their exact diagonal input factor (counts) in both. Cross-entropy columns
    are set at every position at once (one backward pass per class).

    Supported: Linear, Conv1d/Conv2d (stride, padding, dilation, groups: one factorisation per
    group, each from that group's own inputs and outputs; curvlinops instead shares one input
    factor across groups), Embedding, and the affine parameters of LayerNorm/BatchNorm (their
    exact GGN diagonal, a diagonal block). The model is evaluated in eval mode. Tied
    parameters, modules called more than once, and other modules are refused by name: restrict
    ``params=``.

    The factors are computed on first use (one pass over the data) and kept; ``inverse``,
    ``logdet``, ``trace`` and ``diagonal`` are exact for ``K`` (``inverse`` via the factors'
    eigendecompositions: ``(Q_G ⊗ Q_A)(λ_G λ_Aᵀ + λ)⁻¹(Q_G ⊗ Q_A)ᵀ``). Under torch.distributed
    the factors are summed with one all-reduce.

    Args:
        model: the network; it must return one Tensor (the input of ``loss_fn``).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or another loss (its output Hessian by
            autograd; "monte_carlo" needs cross-entropy or MSE).
        data: an iterable of ``(inputs, targets)`` batches, or one such batch.
        params: names of the parameters (None: all with requires_grad).
        fisher: "ggn", "monte_carlo" or "empirical".
        approx: "expand" or "reduce".
        max_batch_size: split batches into micro-batches (never changes the result).
        seed: seed of the label sampling for "monte_carlo".
        progress: show a progress bar over batches.
        reduction: "mean" or "sum" for plain-callable losses (read from nn loss modules).
        eval_mode: True or None (default: eval mode, warning if the model is in training mode
            with dropout or batch norm); False keeps the model's mode, refused while a BatchNorm
            is in training mode (its batch statistics couple the examples).
        check_deterministic: on first use, check that two passes give the same batches.

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(1, 1).double()
        >>> data = (torch.tensor([[2.0]], dtype=torch.float64), torch.zeros(1, 1))
        >>> K = curvscope.KFACOperator(model, torch.nn.MSELoss(), data)
        >>> K.to_dense().round(decimals=12).tolist()  # 2 [2, 1]ᵀ[2, 1]: the exact GGN here
        [[8.0, 4.0], [4.0, 2.0]]
        >>> round(K.logdet(damping=1.0), 6)  # log((1 + 10) · 1)
        2.397895
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        params: Sequence[str] | None = None,
        fisher: str = "ggn",
        approx: str = "expand",
        max_batch_size: int | None = None,
        seed: int = 0,
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
            fisher=fisher,
            seed=seed,
            reduction=reduction,
            max_batch_size=max_batch_size,
            progress=progress,
            eval_mode=eval_mode,
            check_deterministic=check_deterministic,
        )
        check_choice(self._func, "approx", approx, _APPROX)
        self._approx = approx
        self._options.update(fisher=fisher, approx=approx, seed=seed)
        self._layers, _ = find_layers(model, self._names, self._func)
        self._blocks: list[KroneckerBlock] | None = None
        self._norms: dict[str, torch.Tensor] = {}

    @property
    def fisher(self) -> str:
        return self._fisher

    @property
    def approx(self) -> str:
        return self._approx

    @property
    def factors(self) -> dict[str, KroneckerFactor | DiagonalFactor]:
        """Per module name (``name[g]`` per group of a grouped convolution): its factors."""
        blocks = self._ensure()
        out: dict[str, KroneckerFactor | DiagonalFactor] = {}
        for block in blocks:
            key = (
                block.layer.name
                if block.layer.groups == 1
                else f"{block.layer.name}[{block.group}]"
            )
            out[key] = KroneckerFactor(block.a, block.g)
        for layer in self._layers:
            if layer.is_norm:
                names = [n for n in (layer.weight, layer.bias) if n is not None]
                out[layer.name] = DiagonalFactor({n: self._norms[n] for n in names})
        return out

    # -- computing the factors -----------------------------------------------------------------
    def _batch_statistics(self, batch: Any, scale: float) -> dict[str, torch.Tensor]:
        stats: dict[str, torch.Tensor] = {}
        columns = self._columns(batch, scale, "shared")
        for inputs, grads in self._per_column(batch, self._layers, columns):
            for layer in self._layers:
                x = inputs[layer.name]
                if grads is None:  # after the forward pass, before any backward pass
                    if not layer.is_norm:
                        pieces = input_statistics(layer, x, self._approx)
                        named = {f"A {layer.name} {i}": a for i, a in enumerate(pieces)}
                        add_statistics(stats, named)
                elif layer.is_norm:
                    add_statistics(stats, norm_statistics(layer, x, grads[layer.name]))
                else:
                    pieces = output_statistics(layer, grads[layer.name], self._approx)
                    named = {f"G {layer.name} {i}": g for i, g in enumerate(pieces)}
                    add_statistics(stats, named)
        return stats

    def _ensure(self) -> list[KroneckerBlock]:
        if self._blocks is None:
            stats = statistics_pass(self, self._batch_statistics, self._factor_shapes())
            blocks = []
            for layer in self._layers:
                if layer.is_norm:
                    for name in (layer.weight, layer.bias):
                        if name is not None:
                            self._norms[name] = stats[name]
                    continue
                for group in range(layer.groups):
                    a = stats[f"A {layer.name} {group}"] / self.num_examples
                    blocks.append(KroneckerBlock(layer, group, a, stats[f"G {layer.name} {group}"]))
            self._blocks = blocks
            self._after_factors()
        return self._blocks

    def _factor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self._layers:
            if layer.is_norm:
                for name in (layer.weight, layer.bias):
                    if name is not None:
                        shapes[name] = (self._param_shapes[name].numel(),)
                continue
            rows, cols = layer.rows(), layer.columns()
            diagonal = isinstance(layer.module, nn.Embedding)
            for group in range(layer.groups):
                shapes[f"A {layer.name} {group}"] = (cols,) if diagonal else (cols, cols)
                shapes[f"G {layer.name} {group}"] = (rows, rows)
        return shapes

    def _after_factors(self) -> None:
        """Hook for EKFAC: re-fit the eigenvalues after the factors exist."""

    # -- the structured algebra ----------------------------------------------------------------
    def _apply(self, matrix: torch.Tensor, block_fn: Callable, norm_fn: Callable) -> torch.Tensor:
        blocks = self._ensure()
        pieces = self._pieces(matrix.T.contiguous())
        k, size = matrix.shape[1], matrix.shape[0]
        result = torch.empty(k, size, dtype=matrix.dtype, device=matrix.device)
        out = self._pieces(result)  # views into one buffer: no per-parameter allocations
        for block in blocks:
            block.from_matrix(block_fn(block, block.to_matrix(pieces)), out)
        for name, values in self._norms.items():
            out[name].copy_(norm_fn(values, pieces[name]))
        return result.T

    def _pieces(self, columns: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views (k, *shape) per parameter of a contiguous (k, P) block."""
        sizes = [shape.numel() for shape in self._param_shapes.values()]
        return {
            name: piece.view(columns.shape[0], *shape)
            for (name, shape), piece in zip(
                self._param_shapes.items(), columns.split(sizes, dim=1), strict=True
            )
        }

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._apply(matrix, lambda b, m: b.matmat(m), lambda d, v: d * v)

    def _inverse_matmat(self, matrix: torch.Tensor, damping: float) -> torch.Tensor:
        return self._apply(
            matrix, lambda b, m: b.inverse_matmat(m, damping), lambda d, v: v / (d + damping)
        )

    def to_eigenbasis(self, matrix: torch.Tensor) -> torch.Tensor:
        """``Qᵀ M`` for M (P, k): the columns in the operator's eigenbasis (the Kronecker
        eigenvectors ``Q_G ⊗ Q_A`` of each block; the unit vectors of the diagonal parts), laid
        out like the parameters. With :meth:`eigenbasis_values`, ``K = Q diag(values) Qᵀ``: one
        rotation then serves ``(K + D)⁻¹`` for every diagonal D constant on each block.

        Example:
            >>> import torch, curvscope
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
            >>> data = [(torch.randn(8, 3), torch.randn(8, 2))]
            >>> op = curvscope.KFACOperator(net, torch.nn.MSELoss(), data)
            >>> op.to_eigenbasis(torch.randn(op.shape[0], 4)).shape
            torch.Size([8, 4])
        """
        func = f"{type(self).__name__}.to_eigenbasis"
        matrix = self._check_tensor(matrix, func, "matrix", ndim=2)
        return self._apply(matrix, lambda b, m: b.rotate(m), lambda d, v: v)

    def eigenbasis_values(self) -> torch.Tensor:
        """(P,): K's eigenvalues, laid out as :meth:`to_eigenbasis` lays out the columns."""
        return self._laid_out(lambda block: block.eigenvalues())

    def _spectrum(self) -> torch.Tensor:
        return self.eigenbasis_values()

    def _diagonal_flat(self) -> torch.Tensor:
        return self._laid_out(lambda block: block.diagonal())

    def _laid_out(self, of_block: Callable) -> torch.Tensor:
        """(P,) from a (d_out, d_in) matrix per Kronecker block (``of_block(block)``) and the
        diagonal parts' values, laid out like the parameters."""
        out = {
            name: torch.empty(1, *shape, dtype=self.dtype, device=self.device)
            for name, shape in self._param_shapes.items()
        }
        for block in self._ensure():
            block.from_matrix(of_block(block).unsqueeze(0), out)
        for name, values in self._norms.items():
            out[name] = values.unsqueeze(0)
        return torch.cat([out[name].reshape(-1) for name in self._names])

    def trace(self) -> float:
        """``tr K = Σ_l tr(G_l) tr(A_l)`` (plus the diagonal blocks), exact."""
        blocks = self._ensure()
        total = sum(float(block.trace()) for block in blocks)
        return total + sum(float(values.sum()) for values in self._norms.values())
