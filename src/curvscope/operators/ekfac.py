"""Eigenvalue-corrected KFAC (EKFAC) as an operator with an exact inverse."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._kfac_capture import layer_grads
from ._layer_operator import add_statistics
from ._layer_pass import embedding_gradient_squares, rotated_inputs, rotated_squares
from ._statistics import statistics_pass
from .kfac import KFACOperator


class EKFACOperator(KFACOperator):
    """KFAC's eigenbasis with the eigenvalues re-fitted to the per-example curvature (P, P).

    ``K = blockdiag_l (Q_G ⊗ Q_A) diag(S) (Q_G ⊗ Q_A)ᵀ`` with ``Q_A``, ``Q_G`` the eigenvectors
    of the KFAC factors and ``S = Σ_n Σ_c (Q_Gᵀ ∇_W ℓ_nc Q_A)²`` the second moment of the
    per-example (and per output-space column) gradients in that basis, summed over positions
    before squaring (George et al., 2018, "Fast approximate natural gradient descent in a
    Kronecker-factored eigenbasis"). For each layer it is the best diagonal in that eigenbasis,
    so its Frobenius error to the exact block is never larger than KFAC's (for one position per
    example, where the columns give the exact per-example curvature). Costs a second pass over
    the data. Same arguments and conventions as ``KFACOperator``; the norm layers' blocks are
    their exact GGN diagonals as in KFAC.

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(1, 1).double()
        >>> data = (torch.tensor([[2.0]], dtype=torch.float64), torch.zeros(1, 1))
        >>> E = curvscope.EKFACOperator(model, torch.nn.MSELoss(), data)
        >>> torch.allclose(E.to_dense(), torch.tensor([[8.0, 4.0], [4.0, 2.0]]).double())
        True
    """

    def _after_factors(self) -> None:
        shapes = {
            f"S {b.layer.name} {b.group}": (b.layer.rows(), b.layer.columns()) for b in self._blocks
        }
        stats = statistics_pass(self, self._correction_statistics, shapes)
        for block in self._blocks:
            block.spectrum = stats[f"S {block.layer.name} {block.group}"]

    def _correction_statistics(self, batch: Any, scale: float) -> dict[str, torch.Tensor]:
        stats: dict[str, torch.Tensor] = {}
        layers = [layer for layer in self._layers if not layer.is_norm]
        by_layer: dict[str, list] = {}
        for block in self._blocks:
            by_layer.setdefault(block.layer.name, []).append(block)
        columns = self._columns(batch, scale, "shared")
        rotated: dict[str, list[torch.Tensor]] = {}
        for inputs, grads in self._per_column(batch, layers, columns):
            for layer in layers:
                x, blocks = inputs[layer.name], by_layer[layer.name]
                if isinstance(layer.module, nn.Embedding):
                    if grads is not None:
                        q_g = blocks[0].eigen()[2]
                        squares = embedding_gradient_squares(layer, x, grads[layer.name], q_g)
                        add_statistics(stats, {f"S {layer.name} 0": squares})
                elif grads is None:  # rotate the inputs once per batch
                    rotated[layer.name] = rotated_inputs(layer, x, [b.eigen()[0] for b in blocks])
                else:
                    grouped = layer_grads(layer, grads[layer.name])
                    pairs = zip(grouped, rotated[layer.name], strict=True)
                    for block, (g, a) in zip(blocks, pairs, strict=True):
                        squares = rotated_squares(g @ block.eigen()[2], a)
                        add_statistics(stats, {f"S {layer.name} {block.group}": squares})
        return stats
