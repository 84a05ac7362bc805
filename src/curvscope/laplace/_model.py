"""The network as a function of the flat subset parameters: outputs, per-example Jacobians.

Everything goes through ``torch.func.functional_call`` on detached copies of the parameters and
buffers, in eval mode, with the module flags restored afterwards: the user's model is never
changed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from .._checks import type_error, value_error
from ..operators._pass import differentiable_attention as _differentiable_attention
from ..operators.data import iterate_batches, model_arguments, slice_examples, tensor_leaves

#: Per-example Jacobians are built in chunks of at most this many entries (examples x C x P).
JACOBIAN_CHUNK_ENTRIES = 2**24


def last_layer_names(model: nn.Module) -> list[str]:
    """The trainable parameters of the last module (in registration order) that owns some."""
    owners: list[list[str]] = []
    for module_name, module in model.named_modules():
        names = [
            f"{module_name}.{name}" if module_name else name
            for name, p in module.named_parameters(recurse=False)
            if p.requires_grad
        ]
        if names:
            owners.append(names)
    return owners[-1] if owners else []


def select_subset(model: nn.Module, subset: Any, func: str) -> list[str]:
    """Parameter names for ``subset``: "all", "last_layer" or a list of names (model order)."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if subset == "all":
        names = trainable
    elif subset == "last_layer":
        names = last_layer_names(model)
    elif isinstance(subset, str) or not isinstance(subset, Sequence):
        raise type_error(
            func,
            "subset",
            "'all', 'last_layer' or a list of parameter names",
            subset,
            f"Names come from model.named_parameters(): {trainable}.",
        )
    else:
        known = dict(model.named_parameters())
        unknown = [name for name in subset if name not in known]
        if unknown or len(set(subset)) != len(subset) or not subset:
            raise value_error(
                func,
                "subset",
                f"a non-empty list of distinct parameter names from {list(known)}",
                subset,
                f"Unknown names: {unknown}. Names come from model.named_parameters().",
            )
        names = [name for name in known if name in set(subset)]
    if not names:
        raise value_error(
            func, "model", "a model with trainable parameters", model, "Unfreeze some parameters."
        )
    return names


class ModelFunction:
    """``θ -> model(x)`` over the flat parameters of a subset, on copies (model untouched).

    Args:
        model: the network.
        names: the parameters in θ, in model order.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        named = dict(model.named_parameters())
        self.model, self.names = model, list(names)
        self.shapes = {name: named[name].shape for name in self.names}
        self.theta = torch.cat([named[name].detach().reshape(-1).clone() for name in self.names])
        self.constants = {n: p.detach() for n, p in named.items() if n not in self.shapes}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.dtype, self.device = self.theta.dtype, self.theta.device

    @property
    def num_params(self) -> int:
        return int(self.theta.numel())

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [math.prod(shape) for shape in self.shapes.values()]
        pieces = theta.split(sizes)
        return {n: p.view(s) for (n, s), p in zip(self.shapes.items(), pieces, strict=True)}

    def __call__(self, theta: torch.Tensor, inputs: Any) -> torch.Tensor:
        """The model output at flat parameters ``theta`` on ``inputs`` (one batch)."""
        args, kwargs = model_arguments(inputs)
        params = self.unflatten(theta)
        return functional_call(self.model, (params, self.constants, self.buffers), args, kwargs)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode and differentiable attention kernels; module flags restored after."""
        flags = [(module, module.training) for module in self.model.modules()]
        try:
            with _differentiable_attention():
                self.model.eval()
                yield
        finally:
            for module, flag in flags:
                module.training = flag

    def batches(self, data: Any, func: str) -> Iterator[Any]:
        """The (inputs, targets, size) of each batch of ``data`` on the model's device."""
        for batch in iterate_batches(data, device=self.device, max_batch_size=None, func=func):
            yield batch.inputs, batch.targets, batch.size

    def outputs(self, inputs: Any, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Model outputs (no gradient) at ``theta`` (default θ_MAP)."""
        theta = self.theta if theta is None else theta
        with self.evaluating(), torch.no_grad():
            return self(theta, inputs)

    def jacobians(self, inputs: Any, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks of (outputs (n, C), Jacobians (n, C, P)) of the flattened per-example outputs.

        One vmapped reverse-mode Jacobian per example (C backward passes each); a model that
        vmap cannot trace falls back to a loop over examples.
        """
        with self.evaluating():
            first = self(self.theta, slice_examples(inputs, 0, 1)).detach()
            width = max(first[0].numel(), 1)
            step = max(1, JACOBIAN_CHUNK_ENTRIES // (width * max(self.num_params, 1)))
            for start in range(0, size, step):
                part = slice_examples(inputs, start, min(start + step, size))
                yield self._chunk_jacobian(part)

    def _chunk_jacobian(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        def single(theta: torch.Tensor, example: Any) -> torch.Tensor:
            batched = _unsqueeze(example)
            output = self(theta, batched)
            return output.reshape(-1), output.reshape(-1)

        one = jacrev(single, has_aux=True)
        try:
            jac, out = vmap(one, in_dims=(None, 0))(self.theta, inputs)
        except (RuntimeError, NotImplementedError, ValueError):  # vmap-incompatible models
            count = _leading_size(inputs)
            pairs = [one(self.theta, _example(inputs, i)) for i in range(count)]
            jac = torch.stack([pair[0].reshape(-1, self.num_params) for pair in pairs])
            out = torch.stack([pair[1].reshape(-1) for pair in pairs])
        return out.detach(), jac.detach()


def _unsqueeze(example: Any) -> Any:
    """Add back a batch dimension of 1 to every tensor of one example (inside vmap)."""
    if isinstance(example, torch.Tensor):
        return example.unsqueeze(0)
    if isinstance(example, dict):
        return {key: _unsqueeze(value) for key, value in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_unsqueeze(value) for value in example)
    return example


def _example(inputs: Any, index: int) -> Any:
    """Example ``index`` of every tensor of a batch, without its batch dimension."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, dict):
        return {key: _example(value, index) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_example(value, index) for value in inputs)
    return inputs


def _leading_size(inputs: Any) -> int:
    return next(t.shape[0] for t in tensor_leaves(inputs) if t.ndim > 0)
