"""Calling a model with substitute tensors for some of its parameters or buffers.

``torch.func.functional_call`` does this generally; this is the lean version the products use
on every batch: the places (module, attribute) of each tensor are found once, tied weights
included, and swapped in and back out around one call. The model is as it was afterwards,
also when the call raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class Slots:
    """Every (module, dict, attribute) place that holds one of the named tensors of ``model``.

    Args:
        model: the model.
        names: names from ``model.named_parameters()`` (or ``named_buffers()`` with buffers).
        buffers: look in the buffers instead of the parameters.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, buffers: bool = False) -> None:
        named = dict(model.named_buffers() if buffers else model.named_parameters())
        index = {id(named[name]): i for i, name in enumerate(names)}
        self.places: list[tuple[dict, str, int]] = []
        for _, module in model.named_modules(remove_duplicate=False):
            holder = module._buffers if buffers else module._parameters
            for attr, tensor in holder.items():
                if tensor is not None and id(tensor) in index:
                    self.places.append((holder, attr, index[id(tensor)]))
        self.count = len(names)

    @contextlib.contextmanager
    def substituted(self, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        """Within the block, the model holds ``tensors[i]`` wherever it held the i-th name."""
        saved = [(holder, attr, holder[attr]) for holder, attr, _ in self.places]
        try:
            for holder, attr, i in self.places:
                holder[attr] = tensors[i]
            yield
        finally:
            for holder, attr, tensor in saved:
                holder[attr] = tensor
