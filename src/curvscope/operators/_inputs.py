"""Checks of what an operator of a model is built from: the parameters to differentiate, the
model's train/eval state, and what messages say about the model and the data."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from .._checks import type_error, value_error


class TrainModeWarning(UserWarning):
    """The model is in training mode with modules that behave differently in eval mode."""


def select_params(model: nn.Module, params: Any, func: str) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
        if not names:
            raise value_error(
                func,
                "model",
                "a model with at least one parameter with requires_grad=True",
                model,
                f"All its parameters are frozen; pass params=[...] from {list(named)}, "
                "or unfreeze some with p.requires_grad_(True).",
            )
        return names
    if isinstance(params, str) or not isinstance(params, Sequence):
        raise type_error(
            func, "params", "None or a list of parameter names", params, f"Valid: {list(named)}."
        )
    unknown = [name for name in params if name not in named]
    if unknown or not params or len(set(params)) != len(params):
        raise value_error(
            func,
            "params",
            f"a non-empty list of distinct names from {list(named)}",
            params,
            f"Unknown: {unknown}. Names come from model.named_parameters().",
        )
    return [name for name in named if name in set(params)]


def check_bool(func: str, arg: str, value: Any, allow_none: bool = False) -> Any:
    if not isinstance(value, bool) and not (allow_none and value is None):
        raise type_error(func, arg, "True or False" + (" or None" if allow_none else ""), value)
    return value


def mode_dependent_modules(model: nn.Module) -> list[str]:
    """Names of the modules in training mode whose output differs in eval mode."""
    names = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        dropout = isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0
        norm = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats
        )
        inner = getattr(module, "dropout", 0.0)
        inner = (
            isinstance(inner, float)
            and inner > 0
            and isinstance(module, (nn.MultiheadAttention, nn.RNNBase))
        )
        if dropout or norm or inner:
            names.append(f"{name or 'model'!r} ({type(module).__name__})")
    return names


def first_layer(model: nn.Module) -> str:
    kinds = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.RNNBase, nn.MultiheadAttention)
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            return f" The model's first layer, {name or 'model'!r}, is {module!r}."
    return ""


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside curvscope (so warnings point at the caller)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("curvscope."):
        frame, level = frame.f_back, level + 1
    return level


def peek_targets(data: Any) -> Any:
    with contextlib.suppress(Exception):
        batch = data if isinstance(data, (tuple, list)) and len(data) == 2 else data[0]
        return batch[1]
    return None


def warn_train_mode(model: nn.Module, func: str) -> None:
    """Warn (TrainModeWarning) when the model is in training mode with modules whose output
    differs in eval mode, which curvscope evaluates in."""
    modules = mode_dependent_modules(model)
    if modules:
        listed = ", ".join(modules[:5]) + (", ..." if len(modules) > 5 else "")
        warnings.warn(
            f"curvscope.{func}: the model is in training mode, and {listed} behave "
            "differently in eval mode; curvscope evaluates the model in eval mode "
            "(deterministic). Call model.eval() first, or pass eval_mode=True (eval, as now) "
            "or eval_mode=False (keep train mode) to silence this warning.",
            TrainModeWarning,
            stacklevel=_user_stacklevel(),
        )
