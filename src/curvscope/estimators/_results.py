"""The base of every estimator result: a frozen dataclass with a JSON-ready ``to_dict``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch


def _plain(value: Any) -> Any:
    """Convert tensors, arrays and numbers to python floats/ints/lists; non-finite -> None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.dtype == torch.bool:
            return value.tolist()
        value = value.to(torch.float64).numpy()
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()] if value.ndim else _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


#: The statuses of the stochastic estimates (trace, diagonal, density, Frobenius norm).
EXACT, ESTIMATED, NO_ERROR_ESTIMATE = "exact", "estimated", "no_error_estimate"


def estimate_status(method: str, error: Any) -> str:
    """``"exact"`` for the exact method; ``"estimated"`` when every standard error is finite;
    ``"no_error_estimate"`` when some could not be estimated (too few probes)."""
    if method == "exact":
        return EXACT
    if isinstance(error, torch.Tensor):
        finite = bool(torch.isfinite(error).all())
    else:
        finite = math.isfinite(float(error))
    return ESTIMATED if finite else NO_ERROR_ESTIMATE


class Result:
    """Mixin for the frozen result dataclasses: ``to_dict`` gives a JSON-ready dict.

    Tensors become (nested) lists of python floats, and non-finite numbers (an infinite standard
    error, say) become ``None``, so that ``json.dumps(result.to_dict(), allow_nan=False)`` works.
    """

    _omit: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (python numbers and lists; non-finite -> None)."""
        out: dict[str, Any] = {"kind": type(self).__name__}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if field.name in self._omit:
                continue
            out[field.name] = _plain(getattr(self, field.name))
        return out
