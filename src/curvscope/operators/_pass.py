"""One pass over the data: batching, the dataset normaliser, guards, checks and the all-reduce.

Every operator of a model over a dataset is ``A = c Σ_b A_b``, with ``A_b`` what the operator
multiplies on batch b (for the summed loss of that batch, see ``losses``) and ``c = 1/Z`` for
reduction "mean" (Z counted from the data) or 1 for "sum". This module knows nothing of what
``A_b`` is: it iterates the (micro-)batches, sets up once (counts examples and Z, validates the
first batch, checks that the targets and the model's outputs are finite, then that a second pass
sees the same batches and outputs), sums ``c · batch_fn(batch)`` with a NaN/Inf check that names
the batch, and all-reduces over processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._checks import value_error
from .._progress import progress_bar
from .data import (
    Batch,
    describe_batch,
    fingerprint,
    iterate_batches,
    same_fingerprint,
    tensor_leaves,
)
from .distributed import all_reduce_sum, is_main_process, rank_and_world_size

DETERMINISM_FIX = (
    "Products re-iterate the data and must see the same batches and outputs every pass. Use "
    "DataLoader(shuffle=False), no random augmentation, and eval_mode=True (no dropout); or pass "
    "check_deterministic=False if you know the differences are harmless."
)


@dataclass
class PassOptions:
    """How the data is passed over (set by the operator's constructor)."""

    func: str
    device: torch.device
    max_batch_size: int | None
    progress: bool
    check_deterministic: bool


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Attention through composite kernels: the fused ones (flash, the transformer fast path)
    have neither forward-mode derivatives nor double backward."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def rank_text() -> str:
    rank, world = rank_and_world_size()
    return f" on rank {rank} of {world}" if world > 1 else ""


def _nonfinite(obj: Any) -> bool:
    return any(
        t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensor_leaves(obj)
    )


class DataPass:
    """Iterates ``data`` for one operator; see the module docstring.

    Args:
        data: the operator's data (validated by ``check_data``).
        options: batching, progress and checks.
    """

    def __init__(self, data: Any, options: PassOptions) -> None:
        self.data, self.options = data, options
        self.num_examples: int | None = None
        self.normaliser: float | None = None
        self.num_batches = 0

    @property
    def ready(self) -> bool:
        return self.num_examples is not None

    def batches(self) -> Iterator[Batch]:
        """The (micro-)batches of one pass, on the operator's device."""
        o = self.options
        return iterate_batches(
            self.data, device=o.device, max_batch_size=o.max_batch_size, func=o.func
        )

    # -- set-up ----------------------------------------------------------------------------------
    def setup(
        self,
        output_of: Callable[[Batch], Any],
        validate: Callable[[Batch, Any, bool], None],
        normaliser_of: Callable[[Batch], float],
    ) -> None:
        """Count examples and the normaliser over all processes; validate and check the data.

        ``output_of(batch)`` is the model's output (no graph); ``validate(batch, output, first)``
        checks a batch of the first pass (fully when ``first``; it may settle how the loss
        reduces); ``normaliser_of(batch)`` is what the loss averages over in a batch (read
        after ``validate``).
        """
        if self.ready:
            return
        first: list[tuple] = []
        error: Exception | None = None
        try:
            first = self._scan(output_of, validate, normaliser_of)
            if self.options.check_deterministic:
                self._compare(first, self._scan(output_of, None, None))
        except (TypeError, ValueError) as err:  # other processes must not wait for this one
            error = err
        sizes = [sum(r[1] for r in first), sum(r[4] for r in first), error is not None]
        totals = torch.tensor(sizes, dtype=torch.float64, device=self.options.device)
        count, normaliser, failed = all_reduce_sum(totals).tolist()
        if error is not None:
            raise error
        func = self.options.func
        if failed > 0:
            raise ValueError(
                f"curvscope.{func}(data=...): set-up failed on another process (this is"
                f"{rank_text() or ' the only one'}); see the error raised there."
            )
        if int(count) == 0:
            raise empty_data_error(func, self.data)
        self.num_examples, self.normaliser, self.num_batches = int(count), normaliser, len(first)

    def _scan(
        self,
        output_of: Callable[[Batch], Any],
        validate: Callable[[Batch, Any, bool], None] | None,
        normaliser_of: Callable[[Batch], float] | None,
    ) -> list[tuple]:
        records: list[tuple] = []
        for batch in self.batches():
            if _nonfinite(batch.targets):
                raise ValueError(
                    f"curvscope.{self.options.func}(data=...): the targets of "
                    f"{describe_batch(batch)} contain NaN or Inf{rank_text()}. Clean the data "
                    "or drop those examples."
                )
            with torch.no_grad():
                output = output_of(batch)
            if validate is not None:
                validate(batch, output, not records)
            if _nonfinite(output):
                where = " (its inputs contain NaN or Inf too)" if _nonfinite(batch.inputs) else ""
                raise ValueError(
                    f"curvscope.{self.options.func}(model=...): the model's output on "
                    f"{describe_batch(batch)} contains NaN or Inf{where}{rank_text()}. Check "
                    "that batch's inputs and the model's parameters."
                )
            norm = 0.0 if normaliser_of is None else float(normaliser_of(batch))
            data_print = fingerprint((batch.inputs, batch.targets))
            records.append((batch.index, batch.size, data_print, fingerprint(output), norm))
        return records

    def _compare(self, first: list[tuple], second: list[tuple]) -> None:
        func, fix = self.options.func, DETERMINISM_FIX
        if len(first) != len(second):
            raise ValueError(
                f"curvscope.{func}(data=...): the data gave {len(first)} batches on one "
                f"pass and {len(second)} on the next. {fix}"
            )
        for (index, size, data_a, out_a, _), (_, size_b, data_b, out_b, _) in zip(
            first, second, strict=True
        ):
            if size != size_b or not same_fingerprint(data_a, data_b, 1e-9):
                raise ValueError(
                    f"curvscope.{func}(data=...): batch {index} changed between two passes "
                    f"over the data (shuffling or random augmentation?). {fix}"
                )
            if not same_fingerprint(out_a, out_b, 1e-6):
                raise ValueError(
                    f"curvscope.{func}(model=...): the model's output on batch {index} "
                    "changed between two passes over the same inputs (randomness in the model, "
                    f"such as dropout in train mode?). {fix}"
                )

    # -- products --------------------------------------------------------------------------------
    def accumulate(
        self, batch_fn: Callable[[Batch], torch.Tensor], total: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """``scale · Σ_b batch_fn(b)`` over the local data, then one all-reduce over processes.

        Raises ValueError naming the first batch whose result holds NaN or Inf.
        """
        flags = []
        enabled = self.options.progress and is_main_process()
        with progress_bar(enabled, f"{self.options.func} product", self.num_batches) as advance:
            for batch in self.batches():
                result = batch_fn(batch)
                flags.append((batch, torch.isfinite(result).all()))
                total = total + result
                advance()
        total = all_reduce_sum(total * scale)
        if not bool(torch.isfinite(total).all()):
            bad = next((b for b, ok in flags if not bool(ok)), None)
            where = describe_batch(bad) if bad is not None else "a batch on another process"
            raise ValueError(
                f"curvscope.{self.options.func}: NaN or Inf in the result of {where}"
                f"{rank_text()}. Check that batch's inputs and targets, the model's "
                "parameters, and the loss (e.g. log of 0) at this point."
            )
        return total


def empty_data_error(func: str, data: Any) -> ValueError:
    return value_error(
        func,
        "data",
        "at least one example (a batch with a non-empty dimension 0)",
        data,
        "The data is empty, or all its batches are; pass the batches to average over.",
    )


def zero_normaliser_error(func: str, name: str) -> ValueError:
    return ValueError(
        f"curvscope.{func}(data=...): {name} averages over nothing in this data (every target "
        "is ignore_index, or their class weights add up to 0), so the mean loss is undefined. "
        "Pass data with counted targets, or a loss with reduction='sum'."
    )
