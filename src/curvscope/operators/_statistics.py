"""One pass over the data that sums per-batch statistics (dicts of tensors) for the structured
operators, with the guards of every operator pass and one all-reduce for all statistics.

This is the one place where the structured operators touch the data layer of ``_ModelOperator``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .distributed import all_reduce_sum


def statistics_pass(
    op: Any, batch_fn: Callable[[Any, Any, float], dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """``Σ_b batch_fn(state, batch, w_b)`` over the local data, then one all-reduce.

    ``w_b`` is the batch's weight in the dataset loss (``n_b / N`` for a mean, 1 for a sum);
    ``batch_fn`` applies it where it belongs (the loss-Hessian square root).
    """
    op._setup()
    totals: dict[str, torch.Tensor] = {}
    with op._guard(), op._progress_bar() as advance:
        state = op._pass_state()
        op._start_pass()
        for batch in op._batches():
            for key, value in batch_fn(state, batch, op._weight(batch)).items():
                if key in totals:
                    totals[key] += value
                else:
                    totals[key] = value.clone()
            advance()
    keys = list(totals)
    flat = torch.cat([totals[key].reshape(-1) for key in keys]) if keys else torch.zeros(0)
    flat = all_reduce_sum(flat.to(op.device))
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(
            f"curvscope.{op._func}: NaN or Inf in the curvature statistics{op._rank_text()}. "
            "Check the data's inputs and targets, the model's parameters, and the loss at this "
            "point."
        )
    out, start = {}, 0
    for key in keys:
        size = totals[key].numel()
        out[key] = flat[start : start + size].view_as(totals[key])
        start += size
    return out
