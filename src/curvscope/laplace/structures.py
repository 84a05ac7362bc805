"""Building the curvature structure of a Laplace approximation from the public operators.

"full": the dense GGN (from per-example Jacobians for models with (n, K) outputs, see
:mod:`curvscope.laplace._jacobian_ggn`, else ``GGNOperator`` products with the unit vectors);
"diag": the exact GGN diagonal (``GGNDiagonalOperator``); "lowrank": the top ``rank``
eigenpairs of the GGN (Lanczos, residuals below ``LOWRANK_TOL`` times the largest eigenvalue);
"kfac": ``KFACOperator(fisher="ggn")`` with its exact
log-determinant and inverse; any curvscope operator: used as the curvature (structured when it
has ``logdet`` and ``inverse``, else made dense).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import estimators as _estimators
from .. import operators as _operators
from ..operators import GGNDiagonalOperator, KFACOperator
from ._jacobian_ggn import applies, jacobian_ggn
from ._model import ModelFunction
from .likelihood import Likelihood
from .posterior import DenseStructure, DiagonalStructure, LowRankStructure, StructuredStructure

STRUCTURES = ("kfac", "full", "diag", "lowrank")
#: Residual of the "lowrank" eigenpairs relative to the largest eigenvalue (at least 100 eps).
LOWRANK_TOL = 1e-6
#: Default number of eigenpairs of the "lowrank" structure.
DEFAULT_RANK = 50
#: Columns per product block when an operator is made dense.
BLOCK_COLUMNS = 64


def layer_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Parameter names grouped by the module that owns them ("0.weight" -> layer "0")."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return groups


def group_slices(names: Sequence[str], shapes: dict[str, torch.Size]) -> dict[str, slice]:
    """The slice of the flat parameter vector of each layer (a layer's params are contiguous)."""
    offsets, start = {}, 0
    for name in names:
        size = shapes[name].numel()
        offsets[name] = (start, start + size)
        start += size
    return {
        layer: slice(offsets[group[0]][0], offsets[group[-1]][1])
        for layer, group in layer_groups(names).items()
    }


def is_operator(value: Any) -> bool:
    return all(hasattr(value, attr) for attr in ("shape", "dtype", "device", "matmat"))


def build(
    structure: Any,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    names: list[str],
    shapes: dict[str, torch.Size],
    *,
    function: ModelFunction,
    likelihood: Likelihood,
    rank: int | None,
    seed: int,
    progress: bool,
    func: str,
) -> Any:
    """The :class:`~curvscope.laplace.posterior.Structure` for ``structure`` on ``names``."""
    if is_operator(structure):
        return _from_operator(structure)
    if structure == "kfac":
        return _kfac(model, loss_fn, data, names, shapes, seed, progress)
    ggn = _operators.GGNOperator(model, loss_fn, data, params=names, progress=progress)
    if structure == "diag":
        return DiagonalStructure(_exact_diagonal(model, loss_fn, data, names, progress))
    if structure == "full":
        if applies(function, likelihood, data, func):
            return DenseStructure(jacobian_ggn(function, likelihood, data, func), psd=True)
        return DenseStructure(dense_in_blocks(ggn), psd=True)
    size = ggn.shape[0]
    k = min(DEFAULT_RANK if rank is None else rank, size)
    # accuracy relative to the largest eigenvalue, what a low-rank approximation needs: the
    # relative criterion never converges where the tail of the spectrum clusters near 0
    tol = max(LOWRANK_TOL, 100 * torch.finfo(ggn.dtype).eps)
    found = _estimators.eigenvalues(
        ggn, k=k, which="largest", seed=seed, tol=tol, relative_to="norm"
    )
    if not found.all_converged:
        raise ValueError(
            f"curvscope.{func}(rank={rank}): the top {k} eigenpairs of the GGN did not converge "
            f"(status {found.status!r}). Pass a smaller rank, or structure='kfac' or 'diag'."
        )
    values = torch.as_tensor(found.values).to(dtype=ggn.dtype, device=ggn.device)
    return LowRankStructure(found.vectors, values)


def dense_in_blocks(operator: Any, block: int | None = None) -> torch.Tensor:
    """``operator.to_dense()`` from products with blocks of ``block`` unit vectors (memory of a
    vmapped product grows with the columns of the block)."""
    size, block = operator.shape[0], block or BLOCK_COLUMNS
    columns = []
    for start in range(0, size, block):
        stop = min(start + block, size)
        eye = torch.zeros(size, stop - start, dtype=operator.dtype, device=operator.device)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
        columns.append(operator.matmat(eye))
    return torch.cat(columns, dim=1)


def _from_operator(operator: Any) -> Any:
    if hasattr(operator, "logdet") and hasattr(operator, "inverse"):
        return StructuredStructure(operator)
    if isinstance(operator, _operators.DenseOperator):
        return DenseStructure(operator.to_dense())
    return DenseStructure(dense_in_blocks(operator))


def _exact_diagonal(model, loss_fn, data, names, progress) -> torch.Tensor:
    """The exact GGN diagonal in one pass (no per-example Jacobians), flat in ``names`` order."""
    op = GGNDiagonalOperator(model, loss_fn, data, params=names, kind="exact", progress=progress)
    by_name = op.diagonal()
    return torch.cat([by_name[name].reshape(-1) for name in names])


def _kfac(model, loss_fn, data, names, shapes, seed, progress) -> Any:
    def make(params: list[str]) -> Any:
        return KFACOperator(
            model, loss_fn, data, params=params, fisher="ggn", seed=seed, progress=progress
        )

    def blocks() -> list[tuple[slice, Any]]:
        slices = group_slices(names, shapes)
        return [(slices[layer], make(group)) for layer, group in layer_groups(names).items()]

    return StructuredStructure(make(names), blocks=blocks)
