"""The exact diagonal of the GGN (or of the Monte Carlo Fisher) as an operator."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import vjp, vmap

from .._checks import check_choice, check_int
from ._kfac_capture import capture, find_layers, miscalled
from ._kronecker import layer_from_matrix
from ._layer_operator import LayerOperator, add_statistics
from ._layer_pass import (
    CHUNK_ENTRIES,
    diagonal_squares,
    embedding_gradient_squares,
    finish_diagonal_squares,
    norm_statistics,
    raw_inputs,
)
from ._statistics import statistics_pass
from .data import Batch, slice_examples

_KINDS = ("exact", "monte_carlo")


class GGNDiagonalOperator(LayerOperator):
    """``diag(G)`` of the generalized Gauss-Newton matrix, exactly, as a diagonal (P, P) operator.

    ``diag(G) = Σ_n Σ_c (J_nᵀ c_nc)²`` with ``c_nc`` the columns of a square root of example n's
    loss Hessian (over its whole output: C·T columns for cross-entropy on (n, C, T)), scaled by
    the loss normalisation, so that it equals ``torch.diagonal(GGNOperator(...).to_dense())``
    (Dangel et al., 2020, "BackPACK: packing more into backprop"). ``kind="monte_carlo"`` uses
    ``num_samples`` labels drawn from the model per example instead, the diagonal of
    ``FisherOperator(kind="monte_carlo")`` with the same seed.

    Any architecture the GGNOperator handles works: the parameters of Linear, Conv1d/Conv2d,
    Embedding and LayerNorm/BatchNorm modules (called once per forward pass) go through one
    backward pass per column with their inputs recorded; every other parameter (tied weights,
    attention projections, recurrent layers, ...) through per-example vector-Jacobian products
    (``torch.func.vmap``, or a loop over the examples where vmap is not supported). The model
    is evaluated in eval mode. The diagonal is computed on first use and kept; ``inverse``,
    ``logdet``, ``trace`` and ``diagonal`` are exact and trivial.

    Args:
        model: the network; it must return one Tensor (the input of ``loss_fn``).
        loss_fn: ``loss_fn(output, targets) -> scalar``; "monte_carlo" needs cross-entropy/MSE.
        data: an iterable of ``(inputs, targets)`` batches, or one such batch.
        params: names of the parameters (None: all with requires_grad).
        kind: "exact" or "monte_carlo".
        num_samples: labels drawn per example for "monte_carlo".
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
        >>> data = (torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.zeros(2, 1))
        >>> D = curvscope.GGNDiagonalOperator(model, torch.nn.MSELoss(), data)
        >>> round(D.diagonal()["weight"].item(), 12)  # (2/2) (1² + 2²), as GGNOperator
        5.0
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        params: Sequence[str] | None = None,
        kind: str = "exact",
        num_samples: int = 1,
        max_batch_size: int | None = None,
        seed: int = 0,
        progress: bool = False,
        reduction: str | None = None,
        eval_mode: bool | None = None,
        check_deterministic: bool = True,
    ) -> None:
        func = type(self).__name__
        check_choice(func, "kind", kind, _KINDS)
        check_int(func, "num_samples", num_samples, minimum=1)
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            fisher="ggn" if kind == "exact" else "monte_carlo",
            seed=seed,
            reduction=reduction,
            max_batch_size=max_batch_size,
            progress=progress,
            eval_mode=eval_mode,
            check_deterministic=check_deterministic,
        )
        self._kind, self._num_samples = kind, num_samples
        self._options.update(kind=kind, num_samples=num_samples, seed=seed)
        self._layers, self._generic = find_layers(model, self._names, func, strict=False)
        self._by_name = {layer.name: layer for layer in self._layers}
        self._values: torch.Tensor | None = None
        self._vmap_examples = True

    @property
    def kind(self) -> str:
        return self._kind

    # -- computing the diagonal ----------------------------------------------------------------
    def _batch_statistics(self, batch: Any, scale: float) -> dict[str, torch.Tensor]:
        saved: list[torch.Tensor] = []
        columns = self._columns(batch, scale, "exact", self._num_samples)

        def keep(output: torch.Tensor) -> torch.Tensor:
            if not saved:
                saved.append(columns(output))
            return saved[0]

        stats: dict[str, torch.Tensor] = {}
        raw: dict[str, Any] = {}
        if self._layers:
            for inputs, grads in self._per_column(batch, self._layers, keep):
                for layer in self._layers:
                    x = inputs[layer.name]
                    if grads is not None:
                        squares = _layer_squares(layer, x, grads[layer.name], raw.get(layer.name))
                        add_statistics(stats, squares)
                    elif not (layer.is_norm or isinstance(layer.module, nn.Embedding)):
                        raw[layer.name] = raw_inputs(layer, x)
            for name, inputs in raw.items():
                finish_diagonal_squares(self._by_name[name], inputs, stats)
        if self._generic and not saved:
            with torch.no_grad():
                keep(self._forward(batch, self._leaves()))
        if self._generic:
            stats["generic"] = self._generic_squares(batch, saved[0])
        return stats

    def _check_calls(self) -> None:
        """Layers not called exactly once (e.g. attention's out_proj, which
        nn.MultiheadAttention uses directly) move to the per-example path: checked on the
        first batch, before the pass."""
        self._setup()
        batch = next(iter(self._pass.batches()), None)
        if batch is None or not self._layers:
            return
        with self._guard(), torch.no_grad(), capture(self._layers) as records:
            self._forward(batch, self._leaves())
        bad = set(miscalled(records))
        moved = {n for x in self._layers if x.name in bad for n in (x.weight, x.bias)}
        self._layers = [layer for layer in self._layers if layer.name not in bad]
        self._generic = [n for n in self._names if n in moved or n in self._generic]

    def _generic_squares(self, batch: Any, columns: torch.Tensor) -> torch.Tensor:
        """``Σ_n Σ_c (J_nᵀ c_nc)²`` over the generic parameters, by per-example VJPs."""
        leaves = [leaf.detach() for leaf in self._leaves()]
        chosen = [i for i, name in enumerate(self._names) if name in set(self._generic)]

        def one(inputs: Any, cols: torch.Tensor) -> torch.Tensor:
            single = Batch(batch.index, _unsqueeze(inputs), None, 1)

            def output(*pieces: torch.Tensor) -> torch.Tensor:
                tensors = list(leaves)
                for i, piece in zip(chosen, pieces, strict=True):
                    tensors[i] = piece
                return self._forward(single, tensors)[0]

            _, pull = vjp(output, *[leaves[i] for i in chosen])
            flat = vmap(lambda c: torch.cat([g.reshape(-1) for g in pull(c)]))(cols)
            return (flat**2).sum(dim=0)

        per_example = columns.transpose(0, 1)  # (n, k, *output)
        size = sum(leaves[i].numel() for i in chosen)
        chunk = max(1, CHUNK_ENTRIES // max(columns.shape[0] * size, 1))
        if self._vmap_examples:
            try:
                return vmap(one, chunk_size=chunk)(batch.inputs, per_example).sum(dim=0)
            except (RuntimeError, NotImplementedError, ValueError):
                self._vmap_examples = False
        total = torch.zeros(size, dtype=self.dtype, device=self.device)
        for n in range(batch.size):
            inputs = slice_examples(batch.inputs, n, n + 1)
            total += one(_squeeze(inputs), per_example[n])
        return total

    def _statistic_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every statistic a batch can give, by key (the layers as of the first batch)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self._layers:
            if layer.is_norm:
                for name in (layer.weight, layer.bias):
                    if name is not None:
                        shapes[name] = (self._param_shapes[name].numel(),)
            elif isinstance(layer.module, nn.Embedding):
                shapes[f"D {layer.name} 0"] = (layer.rows(), layer.columns())
            else:
                for group in range(layer.groups):
                    width = layer.columns() - (layer.bias is not None)
                    if layer.weight is not None:
                        shapes[f"W {layer.name} {group}"] = (layer.rows(), width)
                    if layer.bias is not None:
                        shapes[f"B {layer.name} {group}"] = (layer.rows(),)
        if self._generic:
            shapes["generic"] = (sum(self._param_shapes[n].numel() for n in self._generic),)
        return shapes

    def _ensure(self) -> torch.Tensor:
        if self._values is None:
            self._check_calls()
            stats = statistics_pass(self, self._batch_statistics, self._statistic_shapes())
            out = {
                name: torch.zeros(1, *shape, dtype=self.dtype, device=self.device)
                for name, shape in self._param_shapes.items()
            }
            for layer in self._layers:
                for group in range(layer.groups if not layer.is_norm else 0):
                    parts = [stats.get(f"{kind} {layer.name} {group}") for kind in "WBD"]
                    if parts[1] is not None:
                        parts[1] = parts[1][:, None]
                    matrix = torch.cat([p for p in parts if p is not None], dim=1)
                    layer_from_matrix(layer, group, matrix.unsqueeze(0), out)
                for name in (layer.weight, layer.bias) if layer.is_norm else ():
                    if name is not None:
                        out[name] = stats[name].reshape(out[name].shape)
            if self._generic:
                start = 0
                for name in self._generic:
                    size = math.prod(self._param_shapes[name])
                    out[name] = stats["generic"][start : start + size].reshape(out[name].shape)
                    start += size
            self._values = torch.cat([out[name].reshape(-1) for name in self._names])
        return self._values

    # -- the structured algebra ----------------------------------------------------------------
    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._ensure().unsqueeze(1) * matrix

    def _inverse_matmat(self, matrix: torch.Tensor, damping: float) -> torch.Tensor:
        return matrix / (self._ensure().unsqueeze(1) + damping)

    def _spectrum(self) -> torch.Tensor:
        return self._ensure()

    def _diagonal_flat(self) -> torch.Tensor:
        return self._ensure().clone()


def _layer_squares(layer: Any, x: torch.Tensor, grad: torch.Tensor, raw: Any) -> dict:
    """One column's ``Σ_n (per-example gradient)²`` for one recorded layer."""
    if layer.is_norm:
        return norm_statistics(layer, x, grad)
    if isinstance(layer.module, nn.Embedding):
        return {f"D {layer.name} 0": embedding_gradient_squares(layer, x, grad, None)}
    return diagonal_squares(layer, raw, grad)


def _unsqueeze(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.unsqueeze(0)
    if isinstance(inputs, dict):
        return {key: _unsqueeze(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_unsqueeze(value) for value in inputs)
    return inputs


def _squeeze(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.squeeze(0)
    if isinstance(inputs, dict):
        return {key: _squeeze(value) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_squeeze(value) for value in inputs)
    return inputs
