"""Normalisation layers from elementary operations, so that derivatives of every order are exact.

torch's fused ``layer_norm``, ``batch_norm`` and ``instance_norm`` kernels have wrong nested
forward-mode rules (a second directional derivative through ``F.layer_norm`` is off by a factor of
about 2 in torch 2.13; see pytorch/pytorch#196700 and #196699), wrong reverse-mode rules from the
third order on, and backward kernels that cannot be vmapped over a batch of examples. Inside
``composite_norms()`` these functions are evaluated by the same formulas written with mean,
products and ``rsqrt``, whose derivatives of every order are exact; the values are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _normalise(
    x: torch.Tensor, dims: Sequence[int], eps: float, mean: Any = None, var: Any = None
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps), with the biased mean and variance over ``dims`` by default."""
    if mean is None:
        mean = x.mean(dim=tuple(dims), keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=tuple(dims), keepdim=True)
    else:
        centred = x - mean
    return centred * torch.rsqrt(var + eps)


def _affine(x: torch.Tensor, weight: Any, bias: Any, shape: Sequence[int]) -> torch.Tensor:
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


def _channel_shape(x: torch.Tensor) -> list[int]:
    """(1, C, 1, ..., 1): per-channel tensors broadcast against an (N, C, ...) input."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *_: Any,
) -> torch.Tensor:
    """``F.layer_norm`` from elementary operations."""
    count = len(tuple(normalized_shape))
    out = _normalise(input, range(input.dim() - count, input.dim()), eps)
    return _affine(out, weight, bias, tuple(normalized_shape))


def batch_norm(
    input: torch.Tensor,
    running_mean: Any,
    running_var: Any,
    weight: Any = None,
    bias: Any = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` from elementary operations, unless it updates running statistics."""
    shape = _channel_shape(input)
    updates = training and (running_mean is not None or running_var is not None)
    if updates or (not training and (running_mean is None or running_var is None)):
        return F.batch_norm(  # the mode is off in here: torch's own (it updates or it raises)
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if training:
        dims = [0, *range(2, input.dim())]
        return _affine(_normalise(input, dims, eps), weight, bias, shape)
    mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    return _affine(_normalise(input, (), eps, mean, var), weight, bias, shape)


def instance_norm(
    input: torch.Tensor,
    running_mean: Any = None,
    running_var: Any = None,
    weight: Any = None,
    bias: Any = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.instance_norm`` from elementary operations."""
    if not use_input_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if running_mean is not None or running_var is not None:
        return F.instance_norm(  # the mode is off in here: torch's own
            input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
        )
    out = _normalise(input, range(2, input.dim()), eps)
    return _affine(out, weight, bias, _channel_shape(input))


_COMPOSITES: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    F.layer_norm: layer_norm,
    torch.layer_norm: layer_norm,
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
}


class composite_norms(TorchFunctionMode):
    """Within this context, normalisation layers are computed from elementary operations.

    Training-mode batch and instance normalisation that updates running statistics is left to
    torch (torch.func refuses that in-place update anyway).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        return _COMPOSITES.get(func, func)(*args, **(kwargs or {}))
