"""The data layer: what a batch is, how it is passed to a model, sliced and fingerprinted.

``data`` is any re-iterable of ``(inputs, targets)`` batches (a DataLoader, a list) or a single
``(inputs, targets)`` batch. Inputs that are a Tensor are passed as ``model(inputs)``, a tuple as
``model(*inputs)`` and a dict as ``model(**inputs)``. Large batches are split into micro-batches
of at most ``max_batch_size`` examples along dimension 0 of every tensor in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import describe, type_error, value_error
from ..derivatives.tree import map_tensors, tensor_leaves

__all__ = [
    "Batch",
    "check_data",
    "describe_batch",
    "fingerprint",
    "iterate_batches",
    "model_arguments",
    "same_fingerprint",
    "slice_examples",
    "tensor_leaves",
    "to_device",
]

_PAIR_FIX = (
    "Each batch must be a pair (inputs, targets), e.g. from a DataLoader over a TensorDataset."
)


@dataclass(frozen=True)
class Batch:
    """One (micro-)batch: its index in the data, inputs, targets and number of examples."""

    index: int
    inputs: Any
    targets: Any
    size: int


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one ``(inputs, targets)`` batch rather than an iterable of them."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and isinstance(data[0], (torch.Tensor, tuple, list, Mapping))
    )


def check_data(data: Any, func: str) -> None:
    """Refuse data that cannot be iterated more than once."""
    expected = "an iterable of (inputs, targets) batches or one (inputs, targets) batch"
    if is_single_batch(data):
        return
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise type_error(func, "data", expected, data, _PAIR_FIX)
    if iter(data) is data:
        raise type_error(
            func,
            "data",
            "data that can be iterated again for every product",
            data,
            "A generator or iterator is used up after one pass; pass a list of batches or a "
            "DataLoader instead.",
        )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    moved = tensor.to(device)
    return moved.clone() if moved.is_inference() else moved  # usable by autograd


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in ``obj`` to ``device`` (dtypes are left alone); tensors made under
    ``torch.inference_mode`` are copied into ordinary ones, which autograd can use."""
    return map_tensors(obj, lambda t: _to_device(t, device))


def slice_examples(obj: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` (dimension 0) of every tensor in ``obj``."""
    return map_tensors(obj, lambda t: t[start:stop] if t.ndim > 0 else t)


def model_arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for ``model``: x -> (x,), tuple -> *x, dict -> **x."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _batch_size(inputs: Any, targets: Any, func: str, index: int) -> int:
    sizes = {t.shape[0] for t in tensor_leaves((inputs, targets)) if t.ndim > 0}
    if not sizes:
        raise value_error(
            func,
            "data",
            "batches holding tensors with a batch dimension",
            inputs,
            f"Batch {index} has no tensor with a dimension 0 to count its examples.",
        )
    if len(sizes) > 1:
        raise value_error(
            func,
            "data",
            "batches whose tensors all have the same size along dimension 0",
            inputs,
            f"Batch {index} mixes sizes {sorted(sizes)}. Put the batch dimension first.",
        )
    return sizes.pop()


def _unpack(raw: Any, func: str, index: int) -> tuple[Any, Any]:
    if isinstance(raw, Mapping) or not isinstance(raw, (tuple, list)) or len(raw) != 2:
        expected = f"batches that are (inputs, targets) pairs (batch {index})"
        raise type_error(func, "data", expected, raw, _PAIR_FIX)
    return raw[0], raw[1]


def iterate_batches(
    data: Any, *, device: torch.device, max_batch_size: int | None, func: str
) -> Iterator[Batch]:
    """Yield the (micro-)batches of ``data`` on ``device``, one pass.

    A batch of ``n`` examples with ``max_batch_size = m < n`` is yielded as ``ceil(n / m)``
    micro-batches that keep the index of the batch they come from.
    """
    batches = [data] if is_single_batch(data) else data
    for index, raw in enumerate(batches):
        inputs, targets = _unpack(raw, func, index)
        size = _batch_size(inputs, targets, func, index)
        if size == 0:
            continue
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        step = size if max_batch_size is None else max_batch_size
        if step >= size:
            yield Batch(index, inputs, targets, size)
            continue
        for start in range(0, size, step):
            stop = min(start + step, size)
            yield Batch(
                index,
                slice_examples(inputs, start, stop),
                slice_examples(targets, start, stop),
                stop - start,
            )


def fingerprint(obj: Any) -> tuple[float, ...]:
    """A cheap, order-sensitive summary of every tensor in ``obj`` (sum and weighted sum)."""
    values: list[float] = []
    for tensor in tensor_leaves(obj):
        flat = tensor.detach().reshape(-1).to(torch.float64)
        if flat.numel() == 0:
            continue
        weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        stacked = torch.stack([flat.sum(), (flat * weights).sum(), flat.abs().sum()])
        values.extend(stacked.tolist())
    return tuple(values)


def same_fingerprint(first: tuple[float, ...], second: tuple[float, ...], rtol: float) -> bool:
    """Whether two fingerprints agree to a relative tolerance (NaN never agrees)."""
    if len(first) != len(second):
        return False
    return all(
        math.isclose(a, b, rel_tol=rtol, abs_tol=rtol) for a, b in zip(first, second, strict=True)
    )


def describe_batch(batch: Batch) -> str:
    """A short description of a batch for error messages."""
    return f"batch {batch.index} ({batch.size} examples, inputs {describe(batch.inputs)})"


def shapes_of(obj: Any) -> str:
    """The shapes (and dtypes) of the tensors in ``obj``, e.g. ``(11, 4) float64``."""
    parts = [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensor_leaves(obj)]
    return parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"


def known_size(data: Any) -> int | None:
    """The number of examples in ``data`` when it can be told without iterating a loader:
    a single batch, or a list/tuple of batches held in memory; else None."""
    if is_single_batch(data):
        return _leading_size(data)
    if isinstance(data, (list, tuple)):
        sizes = [_leading_size(batch) for batch in data]
        return None if None in sizes else sum(sizes)
    if hasattr(data, "__len__") and len(data) == 0:
        return 0
    return None


def _leading_size(batch: Any) -> int | None:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        return None
    sizes = {t.shape[0] for t in tensor_leaves(batch) if t.ndim > 0}
    return sizes.pop() if len(sizes) == 1 else None
