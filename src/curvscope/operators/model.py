"""The base class of every curvature operator of a model over a dataset.

The contract of a new operator (subclass ``_ModelOperator``):

- implement ``_batch_matmat(batch, block, batched) -> list[Tensor]``: the curvature of the
  *summed* loss of one batch, ``S_b`` (``self._batch_loss``), times ``block``, a list with one
  ``(k, *param.shape)`` stack per selected parameter; return the same form. Use the helpers:
  ``self._leaves()`` (the tensors to differentiate: the model's own parameters where they
  require grad), ``self._forward(batch, tensors)`` (the model's output, a plain call when
  ``tensors`` are the leaves, a functional call otherwise) and the kernel in
  ``curvscope.derivatives.kernel``. ``batched`` says whether to vmap over the k columns or loop
  (decided here once, by timing, for blocks of k > 1; always False for one column).
- optionally ``_start_pass()`` (called before each product pass, e.g. to re-seed sampling) and
  ``_check_output(output, batch)`` (validate the first batch's output).

Everything else lives here or in ``_pass``: parameter selection, the data pass with its
set-up, normalisation ``A = (1/Z) Σ_b A_b`` (mean) or ``Σ_b A_b`` (sum), micro-batching, the
determinism and NaN checks, the guards (eval mode, global RNG, attention kernels,
``torch.inference_mode``), the block policy, error messages naming the batch, and the
all-reduce.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .._checks import check_int, describe, type_error, value_error
from ..derivatives import kernel
from ._inputs import (
    check_bool,
    first_layer,
    peek_targets,
    select_params,
    warn_train_mode,
)
from ._pass import (
    DataPass,
    PassOptions,
    differentiable_attention,
    empty_data_error,
    zero_normaliser_error,
)
from .base import LinearOperator
from .data import Batch, check_data, describe_batch, known_size, model_arguments, shapes_of
from .distributed import rank_and_world_size
from .losses import detect_reduction, resolve_loss, suggest_loss, undetected_reduction


def first_is_faster(
    first: Callable[[], Any], second: Callable[[], Any], device: torch.device
) -> bool:
    """Whether ``first()`` runs at least as fast as ``second()`` (each timed on its second run)."""
    times = {}
    for which, run in [(True, first), (False, second), (True, first), (False, second)]:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times[which] = time.perf_counter() - start
    return times[True] <= times[False]


class _ModelOperator(LinearOperator):
    """Base of HessianOperator, GGNOperator and FisherOperator (see the module docstring)."""

    #: Blocks of columns: vmapped (True) or looped (False); timed once on the first block.
    _batched: bool | None = None

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        data: Any,
        *,
        params: Sequence[str] | None = None,
        reduction: str | None = None,
        max_batch_size: int | None = None,
        progress: bool = False,
        eval_mode: bool | None = None,
        check_deterministic: bool = True,
    ) -> None:
        func = self._func = type(self).__name__
        if not isinstance(model, nn.Module):
            raise type_error(func, "model", "a torch.nn.Module", model)
        self._loss_spec = resolve_loss(loss_fn, reduction, func, peek_targets(data))
        check_data(data, func)
        if known_size(data) == 0 and rank_and_world_size()[1] == 1:
            raise empty_data_error(func, data)
        check_int(func, "max_batch_size", max_batch_size, minimum=1, allow_none=True)
        check_bool(func, "progress", progress)
        check_bool(func, "eval_mode", eval_mode, allow_none=True)
        check_bool(func, "check_deterministic", check_deterministic)
        self._model, self._loss_fn, self._data = model, loss_fn, data
        self._names = select_params(model, params, func)
        named = dict(model.named_parameters())
        self._param_shapes = {name: named[name].shape for name in self._names}
        first = named[self._names[0]]
        if any(named[n].dtype != first.dtype or named[n].device != first.device for n in named):
            raise value_error(
                func, "model", "parameters that share one dtype and device", model, "Call .to()."
            )
        self._dtype, self._device, self._num_matvecs = first.dtype, first.device, 0
        if eval_mode is None:
            warn_train_mode(model, func)
        self._eval_mode = eval_mode is not False
        self._copy_buffers = not self._eval_mode and any(True for _ in model.buffers())
        self._pass = DataPass(
            data, PassOptions(func, self._device, max_batch_size, progress, check_deterministic)
        )
        self._options: dict[str, Any] = {
            "reduction": reduction,
            "max_batch_size": max_batch_size,
            "progress": progress,
            "eval_mode": self._eval_mode,
            "check_deterministic": check_deterministic,
        }

    # -- the contract (see the module docstring) ----------------------------------------------
    def _batch_matmat(
        self, batch: Batch, block: list[torch.Tensor], batched: bool
    ) -> list[torch.Tensor]:
        """Curvature of the summed loss of ``batch`` times ``block`` (one (k, *shape) stack
        per parameter)."""
        raise NotImplementedError

    def _start_pass(self) -> None:
        """Hook called before every product pass over the data (e.g. to re-seed sampling)."""

    def _check_output(self, output: Any, batch: Batch) -> None:
        """Hook: validate the model output on the first batch."""

    # -- public extras -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_examples(self) -> int:
        """N, the number of examples in the data (over all processes)."""
        self._setup()
        return int(self._pass.num_examples)

    @property
    def reduction(self) -> str:
        """``"mean"`` or ``"sum"``: how the loss, and so the operator, is reduced."""
        return self._loss_spec.reduction

    def loss(self, delta: torch.Tensor | Mapping[str, torch.Tensor] | None = None) -> float:
        """The full-data loss at ``θ + delta`` (``delta`` flat (P,) or a dict); model untouched."""
        shift = None if delta is None else self._delta(delta)

        def batch_loss(batch: Batch) -> torch.Tensor:
            with torch.no_grad():
                tensors = self._leaves()
                if shift is not None:
                    pieces = kernel.stack_block(shift[:, None], self._shapes())
                    tensors = [t.detach() + d[0] for t, d in zip(tensors, pieces, strict=True)]
                return self._batch_loss(batch, self._forward(batch, tensors)).detach()

        total = torch.zeros((), dtype=self.dtype, device=self.device)
        return float(self._run(batch_loss, total))

    def gradient(self) -> tuple[float, torch.Tensor]:
        """The full-data loss and its gradient, flat (P,), with respect to the selected params."""

        def batch_grad(batch: Batch) -> torch.Tensor:
            leaves = self._leaves()
            value = self._batch_loss(batch, self._forward(batch, leaves))
            grads = kernel.gradient(value, leaves)
            return torch.cat([value.detach().reshape(1), *(g.reshape(-1) for g in grads)])

        total = torch.zeros(self.shape[0] + 1, dtype=self.dtype, device=self.device)
        total = self._run(batch_grad, total)
        return float(total[0]), total[1:]

    def block(self, names: Sequence[str]) -> _ModelOperator:
        """The same kind of operator restricted to the parameters ``names``."""
        return type(self)(self._model, self._loss_fn, self._data, params=names, **self._options)

    # -- the product ---------------------------------------------------------------------------
    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        self._setup()
        with self._guard():
            matrix = matrix.clone() if matrix.is_inference() else matrix
            block = kernel.stack_block(matrix, self._shapes())
            batched = matrix.shape[1] > 1 and self._block_policy(block)
            self._start_pass()

            def batch_fn(batch: Batch) -> torch.Tensor:
                return kernel.unstack_block(self._batch_matmat(batch, block, batched))

            return self._accumulate(batch_fn, torch.zeros_like(matrix))

    def _block_policy(self, block: list[torch.Tensor]) -> bool:
        """Vmap blocks of columns or loop over them: timed once on the first batch, on up to
        four columns; the loop where the vmapped product fails."""
        if self._batched is None:
            batch = next(iter(self._pass.batches()), None)
            if batch is None:  # this process holds no data
                return False
            part = [b[:4] for b in block]
            try:
                self._batched = first_is_faster(
                    lambda: self._batch_matmat(batch, part, True),
                    lambda: self._batch_matmat(batch, part, False),
                    self.device,
                )
            except (RuntimeError, NotImplementedError):
                self._batched = False
        return self._batched

    def _run(self, batch_fn: Callable[[Batch], torch.Tensor], total: torch.Tensor) -> torch.Tensor:
        self._setup()
        with self._guard():
            return self._accumulate(batch_fn, total)

    def _accumulate(
        self, batch_fn: Callable[[Batch], torch.Tensor], total: torch.Tensor
    ) -> torch.Tensor:
        try:
            return self._pass.accumulate(batch_fn, total, self._scale)
        except kernel.NotTwiceDifferentiableError as err:
            raise self._not_twice_differentiable(err) from err
        except RuntimeError as err:
            if "derivative for" in str(err) and "not implemented" in str(err):
                raise self._not_twice_differentiable(err) from err
            raise

    def _not_twice_differentiable(self, err: BaseException) -> ValueError:
        return ValueError(
            f"curvscope.{self._func}(loss_fn=...): torch cannot take the second derivative "
            f"needed here, of loss_fn {self._loss_spec.name} or of an operation in the model "
            f"({str(err).splitlines()[0]}). Use a twice-differentiable loss (or model), or "
            "FisherOperator(kind='empirical'), which needs first derivatives only."
        )

    # -- set-up on first use ---------------------------------------------------------------------
    def _setup(self) -> None:
        """Count N and the normaliser (one all-reduce), validate the first batch, check the data
        is finite and deterministic."""
        if self._pass.ready:
            return
        with self._guard():

            def output_of(batch: Batch) -> Any:
                return self._forward(batch, self._leaves())

            def normaliser_of(batch: Batch) -> float:
                return self._loss_spec.normaliser(batch.targets, batch.size)

            self._pass.setup(output_of, self._validate, normaliser_of)
        if self._loss_spec.probed:
            raise undetected_reduction(self._loss_spec, self._func)
        if self.reduction == "mean" and self._pass.normaliser <= 0:
            raise zero_normaliser_error(self._func, self._loss_spec.name)

    @property
    def _scale(self) -> float:
        return 1.0 / self._pass.normaliser if self.reduction == "mean" else 1.0

    def _validate(self, batch: Batch, output: Any, first: bool) -> None:
        if first:
            loss = self._call_loss(lambda: self._loss_fn(output, batch.targets), batch, output)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                error = value_error if isinstance(loss, torch.Tensor) else type_error
                raise error(
                    self._func,
                    "loss_fn",
                    "a loss that returns a scalar tensor",
                    loss,
                    "Reduce it with reduction='mean' or 'sum' (not 'none').",
                )
            self._check_output(output, batch)
        if self._loss_spec.probed:
            spec = detect_reduction(
                self._loss_spec, self._loss_fn, output, batch.targets, batch.size, self._func
            )
            if spec is not None:
                self._loss_spec = spec
                self._options["reduction"] = spec.reduction

    # -- helpers for subclasses ------------------------------------------------------------------
    def _shapes(self) -> list[torch.Size]:
        return list(self._param_shapes.values())

    def _leaves(self) -> list[torch.Tensor]:
        """The tensors to differentiate: the model's own parameters (which autograd tracks
        without writing ``.grad``), or detached copies of those that do not require grad."""
        named = dict(self._model.named_parameters())
        params = [named[name] for name in self._names]
        return [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]

    def _forward(self, batch: Batch, tensors: Sequence[torch.Tensor]) -> Any:
        """The model's output on ``batch`` with ``tensors`` for the selected parameters: a plain
        call when they are the model's own, else a functional call; the model is untouched."""
        args, kwargs = model_arguments(batch.inputs)
        named = dict(self._model.named_parameters())
        own = all(t is named[n] for t, n in zip(tensors, self._names, strict=True))
        try:
            if own and not self._copy_buffers:
                return self._model(*args, **kwargs)
            replaced = dict(zip(self._names, tensors, strict=True))
            if self._copy_buffers:  # train-mode BatchNorm updates buffers: fresh copies here
                replaced.update({n: b.clone() for n, b in self._model.named_buffers()})
            return functional_call(self._model, replaced, args, kwargs)
        except Exception as err:
            if kernel.lacks_forward_ad(err):
                raise
            raise self._model_error(batch, err) from err

    def _model_error(self, batch: Batch, err: Exception) -> ValueError:
        return ValueError(
            f"curvscope.{self._func}(data=...): model(inputs) failed on "
            f"{describe_batch(batch)}; inputs {shapes_of(batch.inputs)}, targets "
            f"{shapes_of(batch.targets)}.{first_layer(self._model)} The model said: "
            f"{type(err).__name__}: {err}. Check that the inputs fit the model (a Tensor is "
            "passed as model(x), a tuple as model(*x), a dict as model(**x))."
        )

    def _batch_loss(self, batch: Batch, output: Any) -> torch.Tensor:
        """``S_b``: the summed loss of ``batch`` (see ``losses``)."""
        summed = self._loss_spec.summed
        return self._call_loss(lambda: summed(output, batch.targets, batch.size), batch, output)

    def _call_loss(self, call: Callable[[], Any], batch: Batch, output: Any) -> Any:
        try:
            return call()
        except Exception as err:
            if kernel.lacks_forward_ad(err) or "not implemented" in str(err):
                raise
            raise ValueError(
                f"curvscope.{self._func}(loss_fn=...): loss_fn(output, targets) failed on "
                f"{describe_batch(batch)} with output {describe(output)} and targets "
                f"{describe(batch.targets)}: {err}. Check that data yields targets that fit "
                "loss_fn (class indices of dtype long for cross-entropy, the output's shape "
                f"for MSE); for these targets, {suggest_loss(batch.targets)} fits."
            ) from err

    def _delta(self, delta: Any) -> torch.Tensor:
        func = f"{self._func}.loss"
        if isinstance(delta, Mapping):
            return self.flatten_dict(delta, func=func, arg="delta")
        return self._check_tensor(delta, func, "delta", ndim=1)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Eval mode (unless eval_mode=False), gradients on (also under no_grad or
        inference_mode), the global RNG state and attention kernels that support second
        derivatives; everything restored afterwards."""
        flags = [(module, module.training) for module in self._model.modules()]
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else 0]
        try:
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.random.fork_rng(devices=devices),
                differentiable_attention(),
            ):
                if self._eval_mode:
                    self._model.eval()
                yield
        finally:
            for module, flag in flags:
                module.training = flag
