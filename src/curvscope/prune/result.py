"""The result of :func:`curvscope.prune`: masks, the pruned copy, achieved sparsity, losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..estimators._results import Result, _plain


class Sparsity(float):
    """The achieved sparsity: a float (the overall fraction of zeros among the pruned weights)
    that also carries the fraction per pruned parameter.

    ``float(s)``, ``s.overall`` and ``s["overall"]`` give the overall sparsity; ``s.per_layer``
    (a dict name -> fraction) and ``s[name]`` the sparsity of one pruned parameter.
    """

    per_layer: dict[str, float]

    def __new__(cls, overall: float, per_layer: dict[str, float]) -> Sparsity:
        value = super().__new__(cls, overall)
        value.per_layer = dict(per_layer)
        return value

    @property
    def overall(self) -> float:
        return float(self)

    def __getitem__(self, key: str) -> float:
        if key == "overall":
            return float(self)
        if key not in self.per_layer:
            raise KeyError(f"no pruned parameter named {key!r}; names are {list(self.per_layer)}")
        return self.per_layer[key]

    def to_dict(self) -> dict[str, Any]:
        return {"overall": float(self), "per_layer": dict(self.per_layer)}

    def __repr__(self) -> str:
        return f"Sparsity(overall={float(self):.4f}, per_layer={self.per_layer})"


@dataclass(frozen=True, eq=False)
class PruneResult(Result):
    """What :func:`curvscope.prune` returns.

    Attributes:
        masks: name -> bool tensor shaped like the parameter; True = kept, False = pruned.
        model: a pruned deep copy of the model (the pruned weights are exactly zero, the kept
            ones moved by the OBS update for ``"obs"``/``"layer_obs"``); the input is untouched.
        sparsity: the achieved :class:`Sparsity` (overall float, ``.per_layer`` by name).
        saliency: name -> tensor shaped like the parameter: the criterion of each weight before
            pruning (|w| for magnitude, ½ w² C_qq for OBD, w² / (2 [C⁻¹]_qq) for OBS,
            w² / [H⁻¹]_qq of the layer reconstruction for layer_obs; per row for "channel").
        loss_before: the full-data loss of the input model.
        loss_after: the full-data loss of the pruned model.
        method: "magnitude", "obd", "obs" or "layer_obs".
        curvature: the curvature used ("-" for magnitude and layer_obs).
        scope: "layer" or "global".
        structure: None, "n:m" or "channel".
        seconds: wall-clock time of the call.
        status: "ok", or what had to be adjusted (damping raised where a block was not positive
            definite, weights removed without update where the inverse broke down).
    """

    masks: dict[str, torch.Tensor]
    model: nn.Module
    sparsity: Sparsity
    saliency: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float
    method: str
    curvature: str
    scope: str
    structure: str | None
    seconds: float
    status: str

    _omit = ("model", "masks", "saliency", "sparsity")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without the model, masks and saliencies)."""
        out = super().to_dict()
        out["sparsity"] = _plain(self.sparsity.to_dict())
        return out
