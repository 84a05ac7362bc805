"""The shared base of KFAC, EKFAC and the GGN diagonal: options, label sampling, the loss
Hessian's square root on the output, and the per-batch forward/backward with the layers' inputs
and output gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_choice, check_int, value_error
from .._random import make_generator
from ..derivatives import kernel
from ._layer_pass import InPlaceOutput, forward_backward
from ._loss_sqrt import output_columns
from ._structured import StructuredOperator
from .distributed import rank_and_world_size
from .losses import loss_hessian_matmat
from .model import _ModelOperator

FISHERS = ("ggn", "monte_carlo", "empirical")


class LayerOperator(StructuredOperator, _ModelOperator):
    """Shared set-up of KFAC/EKFAC and the GGN diagonal: options, sampling, and the per-batch
    forward/backward with the layers' inputs and output gradients."""

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Any, **options: Any) -> None:
        fisher, seed = options.pop("fisher"), options.pop("seed")
        super().__init__(model, loss_fn, data, **options)
        check_choice(self._func, "fisher", fisher, FISHERS)
        check_int(self._func, "seed", seed, minimum=0)
        if fisher == "monte_carlo" and not self._loss_spec.samplable:
            raise value_error(
                self._func,
                "loss_fn",
                "nn.CrossEntropyLoss (no class weights or label smoothing) or nn.MSELoss for "
                "Monte Carlo sampling",
                loss_fn,
                "Use the exact GGN ('ggn'/'exact') or the empirical Fisher for other losses.",
            )
        if options.get("eval_mode") is False:
            training = [
                name
                for name, module in model.named_modules()
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
            ]
            if training:
                raise value_error(
                    self._func,
                    "eval_mode",
                    f"True or None for a model whose BatchNorm layers {training} are in "
                    "training mode",
                    False,
                    "Their batch statistics couple the examples, which this operator treats "
                    "one by one; call model.eval() or pass eval_mode=True.",
                )
        self._fisher, self._seed = fisher, seed
        self._generator: torch.Generator | None = None
        self._copy_outputs = False
        self._options = {k: v for k, v in options.items() if k != "params"}

    def _start_pass(self) -> None:
        rank, _ = rank_and_world_size()
        self._generator = make_generator(self._seed + 1_000_003 * rank)

    def _columns(self, batch: Any, scale: float, positions: str, num_samples: int = 1):
        def columns(output: torch.Tensor) -> torch.Tensor:
            return output_columns(
                self._loss_spec,
                output,
                batch,
                fisher=self._fisher,
                scale=scale,
                hessian_matmat=lambda block: self._hessian_matmat(batch, output, block),
                generator=self._generator,
                num_samples=num_samples,
                positions=positions,
            )

        return columns

    def _hessian_matmat(
        self, batch: Any, output: torch.Tensor, block: torch.Tensor
    ) -> torch.Tensor:
        """``(∂²S_b/∂f²) U``: closed form where there is one, else by autograd on the output."""
        output = output.detach()
        closed = loss_hessian_matmat(self._loss_spec, output, batch.targets, batch.size, block)
        if closed is not None:
            return closed
        return kernel.output_hessian_matmat(lambda out: self._batch_loss(batch, out), output, block)

    def _per_column(self, batch: Any, layers: list, columns: Callable):
        """``(inputs, grads)`` per column, copying layer outputs if an in-place op follows."""
        while True:
            try:
                steps = forward_backward(
                    lambda: self._forward(batch, self._leaves()),
                    layers,
                    columns,
                    self._func,
                    self._copy_outputs,
                )
                first = next(steps, None)
                break
            except InPlaceOutput:
                self._copy_outputs = True
        if first is not None:
            yield first
            yield from steps


def add_statistics(stats: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for key, value in new.items():
        if key in stats:
            stats[key] = stats[key] + value
        else:
            stats[key] = value
