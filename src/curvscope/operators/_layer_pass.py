"""The per-batch work of KFAC, EKFAC and the GGN diagonal: one forward pass with the layers'
inputs recorded, then one backward pass per output-space column to the layers' outputs.

Everything here is a function of a model output function, a batch and the loss; the operators
only sum what these functions return over the data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._checks import describe
from ._kfac_capture import (
    Layer,
    capture,
    check_records,
    embedding_counts,
    norm_example_grads,
    output_gradients,
    unfold_patches,
)

#: Per-example gradients are formed in chunks of at most this many entries.
CHUNK_ENTRIES = 2**22


def check_output(output: object, func: str) -> None:
    if not isinstance(output, torch.Tensor) or output.ndim == 0:
        raise TypeError(
            f"curvscope.{func}(model=...): expected a model that returns one Tensor with a "
            f"batch dimension, got {describe(output)}. Wrap the model so that it returns the "
            "tensor loss_fn takes (e.g. the logits)."
        )


def forward_backward(
    forward: Callable[[], torch.Tensor],
    layers: list[Layer],
    columns_fn: Callable[[torch.Tensor], torch.Tensor],
    func: str,
    copy_outputs: bool,
):
    """Yield ``(inputs, None)`` after one forward pass (``forward()``, with a graph), so that
    input statistics are taken before any gradient exists, then ``(inputs, grads)`` per column:
    each layer's raw input and ``Jᵀ column`` at its output, one backward pass per column.
    Raises ``InPlaceOutput`` if a layer output was modified in place (retry with
    ``copy_outputs=True``)."""
    with torch.enable_grad(), capture(layers, copy_outputs) as records:
        output = forward()
    check_output(output, func)
    if check_records(records, func) and not copy_outputs:
        raise InPlaceOutput
    inputs = {name: record.inputs[0] for name, record in records.items()}
    yield inputs, None
    for column in columns_fn(output):
        yield inputs, output_gradients(output, records, column)


class InPlaceOutput(Exception):
    """A recorded layer output was changed in place by a later operation."""


def _gram(features: torch.Tensor, columns: bool, reduce: str | None) -> tuple[torch.Tensor, ...]:
    """(Σ f fᵀ, Σ f, count) over examples and positions of ``features``: (n, R, d) rows, or
    (n, d, R) with ``columns=True``; ``reduce`` "mean"/"sum" over positions first."""
    if reduce is not None:
        dim = 2 if columns else 1
        features = features.mean(dim=dim) if reduce == "mean" else features.sum(dim=dim)
        return features.T @ features, features.sum(dim=0), features.shape[0]
    if columns:
        n, d, positions = features.shape
        sums = features.sum(dim=(0, 2))
        if d <= positions:  # n small (d, d) products: no copy, no more memory than the input
            return torch.bmm(features, features.transpose(1, 2)).sum(dim=0), sums, n * positions
        flat = features.transpose(0, 1).reshape(d, -1)  # one copy, then one large product
        return flat @ flat.T, sums, n * positions
    flat = features.reshape(-1, features.shape[-1])
    return flat.T @ flat, flat.sum(dim=0), flat.shape[0]


def raw_inputs(layer: Layer, x: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """Unaugmented inputs per group, and whether they are (n, d, R) (convolutions)."""
    if isinstance(layer.module, nn.Linear):
        return [x.reshape(x.shape[0], -1, x.shape[-1])], False
    return list(unfold_patches(layer.module, x).chunk(layer.groups, dim=1)), True


def input_statistics(layer: Layer, x: torch.Tensor, approx: str) -> list[torch.Tensor]:
    """Per group: ``Σ_{n,r} ā āᵀ / R`` (expand) or ``Σ_n â âᵀ`` with â the mean over positions
    (reduce), ā = [a, 1] with a bias; for an Embedding the diagonal counts."""
    if isinstance(layer.module, nn.Embedding):
        return [embedding_counts(layer, x.reshape(x.shape[0], -1))]
    groups, columns = raw_inputs(layer, x)
    out = []
    for features in groups:
        positions = features.shape[2] if columns else features.shape[1]
        gram, sums, count = _gram(features, columns, "mean" if approx == "reduce" else None)
        if layer.weight is None:
            gram, sums = gram[:0, :0], sums[:0]
        if layer.bias is not None:
            corner = sums.new_full((1, 1), float(count))
            top = torch.cat([gram, sums[:, None]], 1)
            gram = torch.cat([top, torch.cat([sums[None], corner], 1)])
        out.append(gram if approx == "reduce" else gram / positions)
    return out


def output_statistics(layer: Layer, grad: torch.Tensor, approx: str) -> list[torch.Tensor]:
    """Per group: ``Σ_{n,r} g gᵀ`` (expand) or ``Σ_n ĝ ĝᵀ`` with ĝ the sum over positions."""
    n = grad.shape[0]
    if isinstance(layer.module, (nn.Linear, nn.Embedding)):
        groups, columns = [grad.reshape(n, -1, grad.shape[-1])], False
    else:
        groups, columns = list(grad.reshape(n, grad.shape[1], -1).chunk(layer.groups, 1)), True
    reduce = "sum" if approx == "reduce" and not isinstance(layer.module, nn.Embedding) else None
    return [_gram(g, columns, reduce)[0] for g in groups]


def norm_statistics(layer: Layer, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """``Σ_n (per-example gradient)²`` of a norm layer's selected parameters, by name."""
    names = [name for name in (layer.weight, layer.bias) if name is not None]
    grads = norm_example_grads(layer, x, grad)
    return {name: (g**2).sum(dim=0) for name, g in zip(names, grads, strict=True)}


def rotated_inputs(
    layer: Layer, x: torch.Tensor, rotations: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``ā Q_A`` per group (n, R, d_in) from the raw inputs, without the augmented copy:
    ``ā Q = a Q[:d] + Q[d]`` (the constant 1 of the bias)."""
    groups, columns = raw_inputs(layer, x)
    out = []
    for features, rotation in zip(groups, rotations, strict=True):
        rows = features.transpose(1, 2) if columns else features  # (n, R, d), a view
        width = rows.shape[-1] if layer.weight is not None else 0
        if width:
            rotated = rows @ rotation[:width]
            if layer.bias is not None:
                rotated = rotated + rotation[width]
        else:
            rotated = rotation[0].expand(*rows.shape[:-1], rotation.shape[1])
        out.append(rotated)
    return out


def rotated_squares(grads: torch.Tensor, rotated: torch.Tensor) -> torch.Tensor:
    """``Σ_n (Σ_r g_nr ā_nrᵀ)²`` (d_out, d_in) for rotated ``grads`` (n, R, d_out) and inputs
    ``rotated`` (n, R, d_in); per-example products in chunks."""
    if grads.shape[1] == 1:
        return (grads[:, 0] ** 2).T @ (rotated[:, 0] ** 2)
    return _weight_squares(grads, rotated, columns=False)


def example_gradient_squares(
    grads: torch.Tensor,
    features: torch.Tensor,
    rotate_out: torch.Tensor | None = None,
    rotate_in: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_n (Q_Gᵀ (Σ_r g_nr ā_nrᵀ) Q_A)²`` (d_out, d_in): the squared per-example gradients of
    a layer in a rotated basis (none: the coordinate basis); ``grads`` (n, R, d_out),
    ``features`` (n, R, d_in)."""
    if rotate_out is not None:
        grads = grads @ rotate_out
    if rotate_in is not None:
        features = features @ rotate_in
    n, positions, d_out = grads.shape
    d_in = features.shape[-1]
    if positions == 1:
        return (grads[:, 0] ** 2).T @ (features[:, 0] ** 2)
    total = grads.new_zeros(d_out, d_in)
    step = max(1, CHUNK_ENTRIES // max(d_out * d_in, 1))
    for start in range(0, n, step):
        example = torch.einsum(
            "nro,nri->noi", grads[start : start + step], features[start : start + step]
        )
        total += (example**2).sum(dim=0)
    return total


def _output_groups(layer: Layer, grad: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    n = grad.shape[0]
    if isinstance(layer.module, nn.Linear):
        return [grad.reshape(n, -1, grad.shape[-1])], False
    return list(grad.reshape(n, grad.shape[1], -1).chunk(layer.groups, dim=1)), True


def diagonal_squares(
    layer: Layer, raw: tuple[list[torch.Tensor], bool], grad: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One column's share of ``Σ_n (per-example gradient)²`` per group: "W name g" (d_out, d_in)
    and "B name g" (d_out,), from the unaugmented inputs ``raw`` (``raw_inputs``). With one
    position, "G2 name g" = g² (n, d_out) instead, summed over columns first and finished by
    ``finish_diagonal_squares`` with one product per batch."""
    groups, columns = _output_groups(layer, grad)
    out = {}
    for i, (g, a) in enumerate(zip(groups, raw[0], strict=True)):
        positions = g.shape[2] if columns else g.shape[1]
        if positions == 1:
            out[f"G2 {layer.name} {i}"] = g.reshape(g.shape[0], -1) ** 2
            continue
        if layer.weight is not None:
            out[f"W {layer.name} {i}"] = _weight_squares(g, a, columns)
        if layer.bias is not None:
            out[f"B {layer.name} {i}"] = (g.sum(dim=2 if columns else 1) ** 2).sum(dim=0)
    return out


def finish_diagonal_squares(
    layer: Layer, raw: tuple[list[torch.Tensor], bool], stats: dict[str, torch.Tensor]
) -> None:
    """Turn the column sums "G2 name g" into "W"/"B" entries (in place)."""
    for i, a in enumerate(raw[0]):
        squares = stats.pop(f"G2 {layer.name} {i}", None)
        if squares is None:
            continue
        if layer.weight is not None:
            stats[f"W {layer.name} {i}"] = squares.T @ a.reshape(a.shape[0], -1) ** 2
        if layer.bias is not None:
            stats[f"B {layer.name} {i}"] = squares.sum(dim=0)


def _weight_squares(g: torch.Tensor, a: torch.Tensor, columns: bool) -> torch.Tensor:
    d_out, d_in = (g.shape[1], a.shape[1]) if columns else (g.shape[2], a.shape[2])
    total = g.new_zeros(d_out, d_in)
    step = max(1, CHUNK_ENTRIES // max(d_out * d_in, 1))
    for start in range(0, g.shape[0], step):
        chunk = slice(start, start + step)
        if columns:
            example = torch.bmm(g[chunk], a[chunk].transpose(1, 2))
        else:
            example = torch.bmm(g[chunk].transpose(1, 2), a[chunk])
        total += (example**2).sum(dim=0)
    return total


def embedding_gradient_squares(
    layer: Layer, indices: torch.Tensor, grads: torch.Tensor, rotate_out: torch.Tensor | None
) -> torch.Tensor:
    """The same for an Embedding (diagonal input factor, identity Q_A): (D, V)."""
    module = layer.module
    n = indices.shape[0]
    flat = indices.reshape(n, -1)
    g = grads.reshape(n, flat.shape[1], -1)
    if rotate_out is not None:
        g = g @ rotate_out
    if module.padding_idx is not None:
        g = g * (flat != module.padding_idx).unsqueeze(-1).to(g.dtype)
    rows = torch.arange(n, device=flat.device).unsqueeze(1) * module.num_embeddings + flat
    keys, where = torch.unique(rows.reshape(-1), return_inverse=True)
    summed = g.new_zeros(keys.numel(), g.shape[-1]).index_add_(0, where, g.reshape(-1, g.shape[-1]))
    out = g.new_zeros(module.num_embeddings, g.shape[-1])
    return out.index_add_(0, keys % module.num_embeddings, summed**2).T
