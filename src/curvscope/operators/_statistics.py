"""One pass over the data that sums per-batch statistics (dicts of tensors) for the structured
operators, with the guards and set-up of every operator pass and one all-reduce for all of them.

This is the one place where the structured operators touch the data pass of ``_ModelOperator``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._progress import progress_bar
from ._pass import rank_text
from .data import Batch
from .distributed import all_reduce_sum, is_main_process


def statistics_pass(
    op: Any,
    batch_fn: Callable[[Batch, float], dict[str, torch.Tensor]],
    shapes: dict[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """``Σ_b batch_fn(batch, c)`` over the local data, then one all-reduce of everything.

    ``c`` is the dataset's loss normalisation (``1/Z`` for a mean, 1 for a sum); ``batch_fn``
    applies it where it belongs (in the output-space columns). ``shapes`` names every statistic
    and its shape, so that every process (also one whose shard is empty) reduces the same
    tensor.
    """
    op._setup()
    totals: dict[str, torch.Tensor] = {}
    enabled = op._pass.options.progress and is_main_process()
    with (
        op._guard(),
        progress_bar(enabled, f"{op._func} statistics", op._pass.num_batches) as advance,
    ):
        op._start_pass()
        for batch in op._pass.batches():
            for key, value in batch_fn(batch, op._scale).items():
                if key in totals:
                    totals[key] += value
                else:
                    totals[key] = value.clone()
            advance()
    unexpected = sorted(set(totals) - set(shapes))
    if unexpected:  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"curvscope.{op._func}: unexpected statistics {unexpected}")
    for key, shape in shapes.items():
        if key not in totals:
            totals[key] = torch.zeros(shape, dtype=op.dtype, device=op.device)
    keys = list(shapes)
    flat = torch.zeros(0, dtype=op.dtype, device=op.device)
    if keys:
        flat = torch.cat([totals[key].reshape(-1).to(op.dtype) for key in keys])
    flat = all_reduce_sum(flat)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(
            f"curvscope.{op._func}: NaN or Inf in the curvature statistics{rank_text()}. "
            "Check the data's inputs and targets, the model's parameters, and the loss at this "
            "point."
        )
    out, start = {}, 0
    for key in keys:
        size = totals[key].numel()
        out[key] = flat[start : start + size].view(totals[key].shape)
        start += size
    return out
