"""Argument checks of :func:`curvscope.prune`, and the pruned parameters as layers."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_float, check_int, type_error, value_error
from ..operators._inputs import select_params as _select_params
from ..operators.data import check_data

FUNC = "prune"
METHODS = ("magnitude", "obd", "obs", "layer_obs")
SCOPES = ("layer", "global")
CURVATURES = ("ggn", "fisher", "hessian", "kfac", "diagonal")
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Layer:
    """One pruned parameter, seen as a (rows, cols) matrix: rows are output units/channels,
    cols the flattened input dimension (``in * kernel`` for convolutions, in that order)."""

    name: str
    shape: torch.Size
    module: nn.Module | None

    @property
    def rows(self) -> int:
        return int(self.shape[0]) if len(self.shape) >= 2 else 1

    @property
    def cols(self) -> int:
        return math.prod(self.shape) // self.rows

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Structure:
    """The parsed ``structure`` argument: kind None, "n:m" (with n, m) or "channel"."""

    kind: str | None
    n: int = 0
    m: int = 0

    @property
    def text(self) -> str | None:
        return f"{self.n}:{self.m}" if self.kind == "n:m" else self.kind


def parse_structure(structure: Any) -> Structure:
    """None, "channel" or "n:m" with integers 1 <= n < m (e.g. "2:4": 2 zeros in every 4)."""
    expected = 'None, "channel", or "n:m" with integers 1 <= n < m such as "2:4"'
    if structure is None:
        return Structure(None)
    if not isinstance(structure, str):
        raise type_error(FUNC, "structure", expected, structure)
    if structure == "channel":
        return Structure("channel")
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if not found or not 1 <= int(found[1]) < int(found[2]):
        raise value_error(
            FUNC, "structure", expected, structure, "n counts the zeros in every m weights."
        )
    return Structure("n:m", int(found[1]), int(found[2]))


def check_sparsity(sparsity: Any, structure: Structure) -> float:
    """A number in [0, 1); with "n:m" it must equal n / m."""
    expected = "a number in [0, 1)"
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise type_error(FUNC, "sparsity", expected, sparsity, "Pass e.g. sparsity=0.5.")
    value = float(sparsity)
    if not 0.0 <= value < 1.0:
        raise value_error(
            FUNC, "sparsity", expected, sparsity, "It is the fraction of pruned weights set to 0."
        )
    if structure.kind == "n:m" and not math.isclose(value, structure.n / structure.m):
        raise value_error(
            FUNC,
            "sparsity",
            f"{structure.n / structure.m:g} for structure={structure.text!r}",
            sparsity,
            f"n:m fixes the sparsity: pass sparsity={structure.n}/{structure.m}.",
        )
    return value


def check_arguments(
    model: Any, loss_fn: Any, data: Any, options: dict[str, Any]
) -> tuple[float, Structure]:
    """Validate every argument of prune at the boundary; returns (sparsity, structure)."""
    if not isinstance(model, nn.Module):
        raise type_error(FUNC, "model", "a torch.nn.Module", model)
    if not callable(loss_fn):
        raise type_error(FUNC, "loss_fn", "a callable loss_fn(output, targets)", loss_fn)
    check_data(data, FUNC)
    structure = parse_structure(options["structure"])
    sparsity = check_sparsity(options["sparsity"], structure)
    check_choice(FUNC, "method", options["method"], METHODS)
    check_choice(FUNC, "scope", options["scope"], SCOPES)
    check_choice(FUNC, "curvature", options["curvature"], CURVATURES)
    check_float(FUNC, "damping", options["damping"], minimum=0.0)
    check_int(FUNC, "seed", options["seed"])
    if not isinstance(options["progress"], bool):
        raise type_error(FUNC, "progress", "True or False", options["progress"])
    return sparsity, structure


def _module_of(model: nn.Module, name: str) -> nn.Module | None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return module if attribute == "weight" and isinstance(module, PRUNABLE) else None


def select_layers(
    model: nn.Module, params: Sequence[str] | None, structure: Structure, method: str
) -> list[Layer]:
    """The pruned parameters: weights of Linear/Conv layers by default, or ``params``."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad and _module_of(model, n)]
        if not names:
            raise value_error(
                FUNC,
                "model",
                "a model with Linear or Conv layers to prune",
                model,
                f"Choose the parameters with params=[...] from {list(named)}.",
            )
    else:
        names = _select_params(model, params, FUNC)
    layers = [Layer(n, named[n].shape, _module_of(model, n)) for n in names]
    _check_layers(layers, named, structure, method)
    return layers


def _check_layers(
    layers: list[Layer], named: dict[str, torch.Tensor], structure: Structure, method: str
) -> None:
    for layer in layers:
        if not named[layer.name].is_floating_point():
            raise type_error(FUNC, "params", "floating-point parameters", named[layer.name])
        if structure.kind == "n:m" and layer.cols % structure.m:
            raise value_error(
                FUNC,
                "structure",
                f"rows whose length is a multiple of m={structure.m}",
                structure.text,
                f"Parameter {layer.name!r} of shape {tuple(layer.shape)} has rows of "
                f"{layer.cols} weights; leave it out with params=[...].",
            )
        if method == "layer_obs" and not _layer_obs_supported(layer.module):
            raise value_error(
                FUNC,
                "params",
                "weights of Linear or Conv1d/Conv2d layers (groups=1, zero padding) for "
                "method='layer_obs'",
                layer.name,
                f"{layer.name!r} is not such a weight; use method='obs' for it or leave it "
                "out with params=[...].",
            )


def _layer_obs_supported(module: nn.Module | None) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros"
    return False
