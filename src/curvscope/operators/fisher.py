"""The Fisher information matrix (empirical or Monte Carlo) as an operator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_int, value_error
from .._random import make_generator
from .data import Batch
from .distributed import rank_and_world_size
from .ggn import _OutputSpaceOperator
from .losses import output_gradients, sampled_output_gradients

_KINDS = ("empirical", "monte_carlo")


def _outer_products(gradients: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``Σ_s r_sn (r_snᵀ u_kn)`` per example n, for ``gradients`` (S, n, ...) and ``block``
    (k, n, ...); returns (k, n, ...)."""
    coefficients = gradients.unsqueeze(1) * block.unsqueeze(0)
    if block.ndim > 2:  # sum over each example's output entries
        coefficients = coefficients.sum(dim=tuple(range(3, block.ndim + 1)), keepdim=True)
    return (coefficients * gradients.unsqueeze(1)).sum(dim=0)


class FisherOperator(_OutputSpaceOperator):
    """The Fisher information ``F`` of the model over the data, as a (P, P) operator.

    The convention: ``g_n = ∇_θ s_n`` is the gradient of example n's *summed* loss terms ``s_n``
    (all its positions or elements, with their class weights), and ``c = 1/Z`` for reduction
    "mean", Z the number of terms the loss averages over in the whole data (N·T for
    cross-entropy on (N, C, T) outputs, N·D for MSE on (N, D) outputs, the total class weight
    with weights), or 1 for "sum". Then, at labels drawn from the model, ``E[F] = GGN``, and
    the two kinds agree in scale with each other and with ``GGNOperator``:

    - ``kind="empirical"``: ``F = c Σ_n g_n g_nᵀ`` at the data's own targets (Kunstner et al.,
      2019, "Limitations of the empirical Fisher approximation for natural gradient descent").
    - ``kind="monte_carlo"``: ``F = c Σ_n (1/S) Σ_s ĝ_ns ĝ_nsᵀ`` where ``ĝ_ns`` is the gradient
      of example n's summed negative log-likelihood at labels drawn from the model's predictive
      distribution (categorical per position for cross-entropy; Gaussian with variance 1/2 for
      MSE), ``S = num_samples``. Its expectation is the GGN (Martens, 2020).

    Both are computed as ``Jᵀ M J`` with ``M`` built from output gradients: no per-example
    parameter gradients are stored. The samples are the same in every product: the generator is
    re-seeded from ``seed`` at the start of each pass (and offset by the rank when distributed).

    Args:
        model: the network; it must return one Tensor (the input of ``loss_fn``).
        loss_fn: ``loss_fn(output, targets) -> scalar``; for "monte_carlo", cross-entropy or MSE.
        data: an iterable of ``(inputs, targets)`` batches, or one such batch.
        kind: "empirical" or "monte_carlo".
        num_samples: labels drawn per example for "monte_carlo".
        seed: seed of the sampling generator for "monte_carlo".
        params: names of the parameters (None: all with requires_grad).
        max_batch_size: split batches into micro-batches of at most this many examples.
        progress: show a progress bar over batches.
        reduction: "mean" or "sum" for plain-callable losses (read from nn loss modules).
        eval_mode: True evaluates the model in eval mode; False keeps its current mode; None
            (default) is eval mode with a TrainModeWarning when the model is in training mode
            with dropout or batch norm.
        check_deterministic: on first use, check that two passes give the same batches.

    Example:
        >>> import torch, curvscope
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> torch.nn.init.ones_(model.weight)
        Parameter containing:
        tensor([[1.]], dtype=torch.float64, requires_grad=True)
        >>> data = (torch.tensor([[1.0], [2.0]], dtype=torch.float64), torch.zeros(2, 1))
        >>> curvscope.FisherOperator(model, torch.nn.MSELoss(), data).to_dense()  # (4 + 64) / 2
        tensor([[34.]], dtype=torch.float64)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        kind: str = "empirical",
        num_samples: int = 1,
        seed: int = 0,
        params: Sequence[str] | None = None,
        max_batch_size: int | None = None,
        progress: bool = False,
        reduction: str | None = None,
        eval_mode: bool | None = None,
        check_deterministic: bool = True,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            reduction=reduction,
            max_batch_size=max_batch_size,
            progress=progress,
            eval_mode=eval_mode,
            check_deterministic=check_deterministic,
        )
        check_choice(self._func, "kind", kind, _KINDS)
        check_int(self._func, "num_samples", num_samples, minimum=1)
        check_int(self._func, "seed", seed, minimum=0)
        if kind == "monte_carlo" and not self._loss_spec.samplable:
            raise value_error(
                self._func,
                "loss_fn",
                "nn.CrossEntropyLoss (no class weights or label smoothing) or nn.MSELoss for "
                "kind='monte_carlo'",
                loss_fn,
                "Use kind='empirical' or GGNOperator for other losses.",
            )
        self._kind, self._num_samples, self._seed = kind, num_samples, seed
        self._options.update(kind=kind, num_samples=num_samples, seed=seed)
        self._generator: torch.Generator | None = None

    @property
    def kind(self) -> str:
        return self._kind

    def _start_pass(self) -> None:
        rank, _ = rank_and_world_size()
        self._generator = make_generator(self._seed + 1_000_003 * rank)
        self._samples = None

    #: The labels drawn for the current batch: (batch, gradients), reused by every column.
    _samples: tuple[Batch, torch.Tensor] | None = None

    def _output_matmat(
        self, output: torch.Tensor, batch: Batch, block: torch.Tensor
    ) -> torch.Tensor:
        spec = self._loss_spec
        if self._kind == "empirical":
            gradients = output_gradients(spec, output, batch.targets, batch.size)
            return _outer_products(gradients.unsqueeze(0), block)
        if self._samples is None or self._samples[0] is not batch:
            drawn = sampled_output_gradients(
                spec, output, batch.targets, self._generator, self._num_samples
            )
            self._samples = (batch, drawn)
        gradients = self._samples[1]
        return _outer_products(gradients, block) / self._num_samples
