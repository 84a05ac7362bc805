"""Per-example gradients of a model's loss, streamed batch by batch.

``ℓ_j`` is ``loss_fn`` on a batch of one example: ``loss_fn(model(x_j[None]), y_j[None])``.
For the usual mean-reduced losses (unweighted cross-entropy, MSE) the mean training loss is then
``L = (1/n) Σ_j ℓ_j``, the loss whose curvature the operators compute.

Gradients are taken with ``torch.func`` (``vmap(grad(...))`` over ``functional_call``) on
detached copies of the parameters, in eval mode: the model, its buffers, its ``.grad`` and its
training flags are left exactly as they were. Ops that ``vmap`` cannot batch fall back to a loop
over the examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..operators.data import (
    check_data,
    describe_batch,
    iterate_batches,
    model_arguments,
    slice_examples,
)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode, every module's training flag restored afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _unsqueeze(obj: Any) -> Any:
    """Add a batch dimension of one to every tensor in a nested structure."""
    if isinstance(obj, torch.Tensor):
        return obj.unsqueeze(0)
    if isinstance(obj, dict):
        return {key: _unsqueeze(value) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_unsqueeze(value) for value in obj)
    return obj


class PerExampleGradients:
    """Flat per-example gradients ``∇_θ ℓ_j`` (n, P) over the parameters ``names``, in order.

    Args:
        model: the network.
        loss_fn: ``loss_fn(output, targets) -> scalar``.
        names: the parameter names, in the flattening order (P = their total size).
        max_batch_size: split batches into chunks of at most this many examples.
        func: the public call, for error messages.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        names: Sequence[str],
        *,
        max_batch_size: int | None,
        func: str,
    ) -> None:
        self.model, self.loss_fn, self.names = model, loss_fn, list(names)
        self.max_batch_size, self.func = max_batch_size, func
        named = dict(model.named_parameters())
        first = named[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self._vmap_works = True

    def _state(self) -> tuple[dict, dict, dict]:
        named = dict(self.model.named_parameters())
        params = {name: named[name].detach() for name in self.names}
        constants = {n: p.detach() for n, p in named.items() if n not in params}
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        return params, constants, buffers

    def _one_example_loss(self, constants: dict, buffers: dict) -> Callable:
        def loss(params: dict, inputs: Any, targets: Any) -> torch.Tensor:
            args, kwargs = model_arguments(_unsqueeze(inputs))
            output = functional_call(self.model, (params, constants, buffers), args, kwargs)
            return self.loss_fn(output, _unsqueeze(targets))

        return loss

    def _parts(self, gradients: dict, count: int) -> list[torch.Tensor]:
        return [gradients[name].detach().reshape(count, -1) for name in self.names]

    def batch(self, inputs: Any, targets: Any, size: int, *, flat: bool = True) -> Any:
        """Per-example gradients of one batch of ``size`` examples: (size, P), or with
        ``flat=False`` one (size, P_k) block per parameter, in order (no concatenated copy)."""
        params, constants, buffers = self._state()
        loss = self._one_example_loss(constants, buffers)
        with eval_mode(self.model):
            parts = None
            if self._vmap_works:
                try:
                    gradients = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
                    parts = self._parts(gradients, size)
                except (RuntimeError, NotImplementedError):  # ops vmap cannot batch
                    self._vmap_works = False
            if parts is None:
                rows = []
                for index in range(size):
                    one_in = _squeeze_one(slice_examples(inputs, index, index + 1))
                    one_out = _squeeze_one(slice_examples(targets, index, index + 1))
                    rows.append(self._parts(grad(loss)(params, one_in, one_out), 1))
                parts = [torch.cat(column) for column in zip(*rows, strict=True)]
        return torch.cat(parts, dim=1) if flat else parts

    def stream(self, data: Any, arg: str, *, flat: bool = True) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(batch index, offset, gradients)`` for the examples of ``data``, in order (a
        batch split by ``max_batch_size`` keeps its index); gradients as :meth:`batch` gives
        them."""
        check_data(data, self.func)
        offset = 0
        batches = iterate_batches(
            data, device=self.device, max_batch_size=self.max_batch_size, func=self.func
        )
        for batch in batches:
            try:
                gradients = self.batch(batch.inputs, batch.targets, batch.size, flat=flat)
            except Exception as error:
                detail = " ".join(str(error).split())
                raise ValueError(
                    f"curvscope.{self.func}({arg}=...): the per-example loss failed on "
                    f"{describe_batch(batch)} ({type(error).__name__}: {detail}). Check that "
                    f"{arg} holds (inputs, targets) batches that fit the model and loss_fn, like "
                    "the training data."
                ) from error
            yield batch.index, offset, gradients
            del gradients  # not alive while the next batch's are computed (memory: 2x less)
            offset += batch.size

    def count(self, data: Any) -> int:
        """The number of examples in ``data`` (no model evaluation)."""
        batches = iterate_batches(data, device=self.device, max_batch_size=None, func=self.func)
        return sum(batch.size for batch in batches)


def _squeeze_one(obj: Any) -> Any:
    """Remove the leading dimension of one from every tensor (inverse of ``_unsqueeze``)."""
    if isinstance(obj, torch.Tensor):
        return obj[0]
    if isinstance(obj, dict):
        return {key: _squeeze_one(value) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_squeeze_one(value) for value in obj)
    return obj
