"""Issue 10: how close each structured approximation is to the exact GGN, on small models in
float64 (dense matrices): layer-block error, the damped Newton direction, top eigenvalues."""

from __future__ import annotations

import copy
import math

import torch

import curvscope

from . import models
from .harness import Config, Table


def _float64(problem: models.Problem) -> models.Problem:
    model = copy.deepcopy(problem.model).double().eval()
    batches = [(x.double() if x.is_floating_point() else x, y) for x, y in problem.batches]
    return models.Problem(problem.name, model, problem.loss_fn, batches)


def _dense(op, chunk: int = 64) -> torch.Tensor:
    size = op.shape[0]
    columns = []
    for start in range(0, size, chunk):
        stop = min(start + chunk, size)
        eye = torch.zeros(size, stop - start, dtype=op.dtype)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        columns.append(op.matmat(eye))
    dense = torch.cat(columns, dim=1)
    return (dense + dense.T) / 2


def _layer_mask(op) -> torch.Tensor:
    owners = [name.rpartition(".")[0] for name in op.param_names]
    shapes = op.param_shapes.values()
    labels = torch.cat(
        [torch.full((s.numel(),), owners.index(o)) for o, s in zip(owners, shapes, strict=True)]
    )
    return labels[:, None] == labels[None, :]


def quality_case(cfg: Config, problem: models.Problem) -> Table:
    problem = _float64(problem)
    args = (problem.model, problem.loss_fn, problem.batches)
    ggn = curvscope.GGNOperator(*args)
    exact = _dense(ggn)
    mask = _layer_mask(ggn)
    values_exact = torch.linalg.eigvalsh(exact).flip(0)
    damping = 1e-3 * float(values_exact[0])
    _, gradient = ggn.gradient()
    eye = torch.eye(exact.shape[0], dtype=exact.dtype)
    reference = torch.linalg.solve(exact + damping * eye, gradient)
    table = Table(
        f"{problem.name}: structured approximations vs the exact GGN ({ggn.shape[0]:,} "
        f"parameters, {problem.num_examples:,} examples, float64)",
        [
            "approximation",
            "rel. Frobenius error of layer blocks",
            f"angle of (K+λI)⁻¹g to (G+λI)⁻¹g, λ = {damping:.2e} (deg)",
            "top-5 eigenvalues / GGN's",
        ],
    )
    ops = {
        "KFAC (ggn, expand)": curvscope.KFACOperator(*args),
        "KFAC (ggn, reduce)": curvscope.KFACOperator(*args, approx="reduce"),
        "KFAC (empirical)": curvscope.KFACOperator(*args, fisher="empirical"),
        "EKFAC (ggn, expand)": curvscope.EKFACOperator(*args),
        "GGNDiagonalOperator": curvscope.GGNDiagonalOperator(*args),
        "BlockDiagonalOperator(GGN, 'layer')": curvscope.BlockDiagonalOperator(ggn),
    }
    norm = float(torch.linalg.norm(exact[mask]))
    for label, op in ops.items():
        dense = _dense(op)
        error = float(torch.linalg.norm((dense - exact)[mask])) / norm
        direction = op.inverse(damping) @ gradient
        cosine = float(direction @ reference / (direction.norm() * reference.norm()))
        angle = math.degrees(math.acos(max(-1.0, min(1.0, cosine))))
        top = torch.linalg.eigvalsh(dense).flip(0)[:5] / values_exact[:5]
        table.add(label, error, angle, ", ".join(f"{t:.3g}" for t in top.tolist()))
    table.notes.append(
        f"GGN's top-5 eigenvalues: {', '.join(f'{t:.4g}' for t in values_exact[:5].tolist())}; "
        "layer blocks: the diagonal blocks of each module's parameters (weight and bias "
        "together), where KFAC/EKFAC/block-diagonal live; g is the gradient of the mean loss."
    )
    return table
