"""Kronecker-factored and diagonal blocks: products, exact inverses, spectra and diagonals.

A Kronecker block acts on the parameters of one layer (one group of a grouped convolution)
arranged as a matrix ``M`` (d_out, d_in): the weight rows with the bias as a last column (the
input augmented with a constant 1), or the transposed weight for an Embedding. Then
``K vec(M) = vec(G M A)`` (A symmetric), i.e. ``K = G ⊗ A`` on the row-major flattening. In the
eigenbases ``A = Q_A Λ_A Q_Aᵀ``, ``G = Q_G Λ_G Q_Gᵀ`` the block is
``(Q_G ⊗ Q_A) diag(S) (Q_G ⊗ Q_A)ᵀ`` with ``S = λ_G λ_Aᵀ`` (KFAC) or a re-fitted ``S`` (EKFAC),
so ``(K + λI)⁻¹ = (Q_G ⊗ Q_A) diag(1 / (S + λ)) (Q_G ⊗ Q_A)ᵀ`` exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ._kfac_capture import Layer


@dataclass(frozen=True)
class KroneckerFactor:
    """One layer's (or convolution group's) factors: ``input`` A (d_in, d_in), or its diagonal
    (d_in,) for an Embedding, and ``output`` G (d_out, d_out). The block is ``G ⊗ A``."""

    input: torch.Tensor
    output: torch.Tensor


@dataclass(frozen=True)
class DiagonalFactor:
    """The exact GGN diagonal of a normalisation layer's affine parameters, by name."""

    values: dict[str, torch.Tensor]


def layer_to_matrix(layer: Layer, group: int, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
    """(k, d_out, d_in) from the parameter pieces (k, *shape) of this layer and group."""
    if isinstance(layer.module, nn.Embedding):
        return pieces[layer.weight].transpose(1, 2)
    rows = slice(group * layer.rows(), (group + 1) * layer.rows())
    parts = []
    if layer.weight is not None:
        weight = pieces[layer.weight]
        parts.append(weight.reshape(weight.shape[0], weight.shape[1], -1)[:, rows])
    if layer.bias is not None:
        parts.append(pieces[layer.bias][:, rows, None])
    return torch.cat(parts, dim=2)


def layer_from_matrix(
    layer: Layer, group: int, matrix: torch.Tensor, out: dict[str, torch.Tensor]
) -> None:
    """Write (k, d_out, d_in) back into the pieces (k, *shape) of this layer and group."""
    if isinstance(layer.module, nn.Embedding):
        out[layer.weight].copy_(matrix.transpose(1, 2))
        return
    rows = slice(group * layer.rows(), (group + 1) * layer.rows())
    width = 0
    if layer.weight is not None:
        weight = out[layer.weight]
        view = weight.view(weight.shape[0], weight.shape[1], -1)
        width = view.shape[2]
        view[:, rows] = matrix[:, :, :width]
    if layer.bias is not None:
        out[layer.bias][:, rows] = matrix[:, :, width]


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: the factors are PSD) and eigenvectors, with a canonical basis
    in every eigenspace of (numerically) equal eigenvalues, e.g. the null space of a factor
    from fewer examples than its size: eigh's basis there is arbitrary and changes with
    round-off (with the batching, say), which would change EKFAC's re-fitted diagonal. Such a
    basis is rotated to the eigenvectors of ``P diag(1, ..., 2) P`` (P the projector onto the
    eigenspace), unique up to signs; its eigenvalues are set to their mean (0 for the null
    space: eigenvalues below ``size · eps · λ_max`` are round-off). Computed in float64 (and
    returned in the factor's dtype), so that float32 factors lose no accuracy here."""
    dtype = matrix.dtype
    values, vectors = _eigh64(matrix.to(torch.float64))
    return values.to(dtype), vectors.to(dtype)


def _eigh64(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(0)
    size = values.numel()
    if size < 2:
        return values, vectors
    tol = float(values.max()) * size * torch.finfo(values.dtype).eps
    values = torch.where(values <= tol, torch.zeros_like(values), values)  # exact null space
    gaps = (values[1:] - values[:-1]) > tol
    starts = [0, *(torch.nonzero(gaps).reshape(-1) + 1).tolist(), size]
    generic = torch.linspace(1.0, 2.0, size, dtype=matrix.dtype, device=matrix.device)
    groups = [(a, b) for a, b in itertools.pairwise(starts) if b - a >= 2]
    if groups:  # one copy, not one per group: a (4608, 4608) float64 basis is 170 MB
        vectors, values = vectors.clone(), values.clone()
    for start, stop in groups:
        basis = vectors[:, start:stop]
        _, rotation = torch.linalg.eigh(basis.T @ (generic[:, None] * basis))
        vectors[:, start:stop] = basis @ rotation
        values[start:stop] = values[start:stop].mean()
    return values, vectors


class KroneckerBlock:
    """``G ⊗ A`` for one layer and group; see the module docstring."""

    def __init__(self, layer: Layer, group: int, a: torch.Tensor, g: torch.Tensor) -> None:
        self.layer, self.group, self.a, self.g = layer, group, a, g
        self.diagonal_input = a.ndim == 1
        self._eigen: tuple[torch.Tensor, ...] | None = None
        self.spectrum: torch.Tensor | None = None  # set by EKFAC; KFAC uses λ_G λ_Aᵀ

    def to_matrix(self, pieces: dict[str, torch.Tensor]) -> torch.Tensor:
        return layer_to_matrix(self.layer, self.group, pieces)

    def from_matrix(self, matrix: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        layer_from_matrix(self.layer, self.group, matrix, out)

    # -- algebra -------------------------------------------------------------------------------
    def eigen(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_A or None for a diagonal A, λ_A, Q_G, λ_G), eigenvalues clamped at 0 (PSD)."""
        if self._eigen is None:
            if self.diagonal_input:
                q_a, lam_a = None, self.a.clamp_min(0)
            else:
                lam_a, q_a = _eigh(self.a)
            lam_g, q_g = _eigh(self.g)
            self._eigen = (q_a, lam_a, q_g, lam_g)
        return self._eigen

    def eigenvalues(self) -> torch.Tensor:
        """S (d_out, d_in): the block's eigenvalues in the Kronecker eigenbasis."""
        if self.spectrum is not None:
            return self.spectrum
        _, lam_a, _, lam_g = self.eigen()
        return lam_g[:, None] * lam_a[None, :]

    def rotate(self, matrix: torch.Tensor, back: bool = False) -> torch.Tensor:
        """``Q_Gᵀ M Q_A`` (or ``Q_G M Q_Aᵀ`` with ``back=True``)."""
        q_a, _, q_g, _ = self.eigen()
        left = q_g if back else q_g.T
        rotated = left @ matrix
        if q_a is not None:
            rotated = rotated @ (q_a.T if back else q_a)
        return rotated

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        if self.spectrum is not None:
            return self.rotate(self.spectrum * self.rotate(matrix), back=True)
        right = matrix * self.a if self.diagonal_input else matrix @ self.a
        return self.g @ right

    def inverse_matmat(self, matrix: torch.Tensor, damping: float) -> torch.Tensor:
        return self.rotate(self.rotate(matrix) / (self.eigenvalues() + damping), back=True)

    def diagonal(self) -> torch.Tensor:
        """diag(K) as (d_out, d_in)."""
        if self.spectrum is None:
            diag_a = self.a if self.diagonal_input else torch.diagonal(self.a)
            return torch.diagonal(self.g)[:, None] * diag_a[None, :]
        q_a, _, q_g, _ = self.eigen()
        right = self.spectrum if q_a is None else self.spectrum @ (q_a**2).T
        return (q_g**2) @ right

    def trace(self) -> torch.Tensor:
        if self.spectrum is not None:
            return self.spectrum.sum()
        trace_a = self.a.sum() if self.diagonal_input else torch.trace(self.a)
        return torch.trace(self.g) * trace_a
