"""Shared pieces of the training tools: argument checks and the flat <-> parameter plumbing."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._checks import type_error, value_error


def check_model(func: str, model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise type_error(func, "model", "a torch.nn.Module", model)
    if not any(p.requires_grad for p in model.parameters()):
        raise value_error(
            func,
            "model",
            "a model with at least one parameter with requires_grad=True",
            model,
            "Unfreeze some parameters with p.requires_grad_(True).",
        )
    return model


def check_loss_fn(func: str, loss_fn: Any) -> Any:
    if not callable(loss_fn):
        raise type_error(
            func, "loss_fn", "a callable loss_fn(output, targets)", loss_fn, "Pass nn.MSELoss()."
        )
    return loss_fn


def check_bool(func: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise type_error(func, arg, "True or False", value)
    return value


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with requires_grad, by name, in model order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def add_flat(params: dict[str, nn.Parameter], names: list[str], delta: torch.Tensor) -> None:
    """``θ_name += delta[slice of name]`` in place, in the order ``names``."""
    start = 0
    for name in names:
        param = params[name]
        size = math.prod(param.shape)
        param.add_(delta[start : start + size].view_as(param).to(param.dtype))
        start += size
