"""The one base class of every curvature operator of a model over a dataset.

It owns everything but the per-batch product: parameter selection, batch iteration and
micro-batching, weighting by true batch sizes, the determinism check on first use, the NaN/Inf
check, the progress bar, the side-effect guard and the distributed reduction. A concrete operator
implements ``_batch_matmat(state, batch, V)``: the curvature of ``loss_fn`` on one batch (reduced
as ``loss_fn`` reduces it) times a (P, k) block. The operator is then

    A = Σ_b (n_b / N) A_b  (reduction "mean"),   A = Σ_b A_b  (reduction "sum").
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._checks import check_int, describe, type_error, value_error
from .base import LinearOperator
from .data import (
    Batch,
    check_data,
    describe_batch,
    fingerprint,
    iterate_batches,
    model_arguments,
    same_fingerprint,
)
from .distributed import all_reduce_sum, is_main_process, rank_and_world_size
from .losses import resolve_loss

_DETERMINISM_FIX = (
    "Products re-iterate the data and must see the same batches and outputs every pass. Use "
    "DataLoader(shuffle=False), no random augmentation, and eval_mode=True (no dropout); or pass "
    "check_deterministic=False if you know the differences are harmless."
)


@dataclass(frozen=True)
class _PassState:
    """What one pass over the data uses: flat selected parameters, detached other parameters,
    and copies of the buffers."""

    theta: torch.Tensor
    constants: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


def _select_params(model: nn.Module, params: Any, func: str) -> list[str]:
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


@contextlib.contextmanager
def _differentiable_attention() -> Iterator[None]:
    """Attention through composite kernels: the fused ones (flash, the transformer fast path)
    have neither forward-mode derivatives nor double backward."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _check_bool(func: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise type_error(func, arg, "True or False", value)
    return value


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
        eval_mode: bool = True,
        check_deterministic: bool = True,
    ) -> None:
        func = self._func = type(self).__name__
        if not isinstance(model, nn.Module):
            raise type_error(func, "model", "a torch.nn.Module", model)
        self._loss_spec = resolve_loss(loss_fn, reduction, func)
        check_data(data, func)
        check_int(func, "max_batch_size", max_batch_size, minimum=1, allow_none=True)
        for arg, value in [("progress", progress), ("eval_mode", eval_mode)]:
            _check_bool(func, arg, value)
        _check_bool(func, "check_deterministic", check_deterministic)
        self._model, self._loss_fn, self._data = model, loss_fn, data
        self._names = _select_params(model, params, func)
        named = dict(model.named_parameters())
        self._param_shapes = {name: named[name].shape for name in self._names}
        first = named[self._names[0]]
        if any(named[n].dtype != first.dtype or named[n].device != first.device for n in named):
            raise value_error(
                func, "model", "parameters that share one dtype and device", model, "Call .to()."
            )
        self._dtype, self._device, self._num_matvecs = first.dtype, first.device, 0
        self._max_batch_size, self._progress = max_batch_size, progress
        self._eval_mode, self._check_deterministic = eval_mode, check_deterministic
        self._num_examples: int | None = None
        self._num_batches = 0
        self._options: dict[str, Any] = {
            "reduction": reduction,
            "max_batch_size": max_batch_size,
            "progress": progress,
            "eval_mode": eval_mode,
            "check_deterministic": check_deterministic,
        }

    # -- the one thing a subclass implements -------------------------------------------------
    def _batch_matmat(self, state: _PassState, batch: Batch, matrix: torch.Tensor) -> torch.Tensor:
        """Curvature of ``loss_fn`` on ``batch`` times ``matrix`` (P, k)."""
        raise NotImplementedError

    def _start_pass(self) -> None:
        """Hook called before every pass over the data (e.g. to re-seed sampling)."""

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
        return int(self._num_examples)

    @property
    def reduction(self) -> str:
        """``"mean"`` or ``"sum"``: how the loss, and so the operator, is reduced."""
        return self._loss_spec.reduction

    def loss(self, delta: torch.Tensor | Mapping[str, torch.Tensor] | None = None) -> float:
        """The full-data loss at ``θ + delta`` (``delta`` flat (P,) or a dict); model untouched."""
        shift = self._delta(delta)

        def batch_loss(state: _PassState, batch: Batch) -> torch.Tensor:
            with torch.no_grad():
                return self._loss_of(state, batch)(state.theta + shift).detach()

        total = self._accumulate(batch_loss, torch.zeros((), dtype=self.dtype, device=self.device))
        return float(total)

    def gradient(self) -> tuple[float, torch.Tensor]:
        """The full-data loss and its gradient, flat (P,), with respect to the selected params."""

        def batch_grad(state: _PassState, batch: Batch) -> torch.Tensor:
            gradient, value = grad_and_value(self._loss_of(state, batch))(state.theta)
            return torch.cat([value.detach().reshape(1), gradient.detach()])

        total = self._accumulate(batch_grad, torch.zeros(self.shape[0] + 1, dtype=self.dtype))
        return float(total[0]), total[1:]

    def block(self, names: Sequence[str]) -> _ModelOperator:
        """The same kind of operator restricted to the parameters ``names``."""
        return type(self)(self._model, self._loss_fn, self._data, params=names, **self._options)

    # -- the product ---------------------------------------------------------------------------
    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._accumulate(
            lambda state, batch: self._batch_matmat(state, batch, matrix), torch.zeros_like(matrix)
        )

    def _accumulate(
        self, batch_fn: Callable[[_PassState, Batch], torch.Tensor], total: torch.Tensor
    ) -> torch.Tensor:
        """``Σ_b w_b batch_fn(b)`` over the local data, then one all-reduce over processes."""
        self._setup()
        total = total.to(self.device)
        flags = []
        with self._guard(), self._progress_bar() as advance:
            state = self._pass_state()
            self._start_pass()
            for batch in self._batches():
                result = batch_fn(state, batch)
                flags.append((batch, torch.isfinite(result).all()))
                total = total + self._weight(batch) * result
                advance()
        total = all_reduce_sum(total)
        if not bool(torch.isfinite(total).all()):
            bad = next((b for b, ok in flags if not bool(ok)), None)
            where = describe_batch(bad) if bad is not None else "a batch on another process"
            raise ValueError(
                f"curvscope.{self._func}: NaN or Inf in the result of {where}"
                f"{self._rank_text()}. Check that batch's inputs and targets, the model's "
                "parameters, and the loss (e.g. log of 0) at this point."
            )
        return total

    def _weight(self, batch: Batch) -> float:
        if self._loss_spec.reduction == "sum":
            return 1.0
        return batch.size / self._num_examples

    # -- set-up on first use ---------------------------------------------------------------------
    def _setup(self) -> None:
        """Count N (one all-reduce), validate the first batch, and check determinism."""
        if self._num_examples is not None:
            return
        first: list[tuple] = []
        error: Exception | None = None
        try:
            with self._guard():
                state = self._pass_state()
                first = self._scan(state, validate=True)
                if self._check_deterministic:
                    self._compare(first, self._scan(state, validate=False))
        except (TypeError, ValueError) as err:  # other processes must not wait for this one
            error = err
        local = sum(size for _, size, _, _ in first)
        flags = [float(local), float(error is not None)]
        count, failed = all_reduce_sum(torch.tensor(flags, dtype=torch.float64, device=self.device))
        if error is not None:
            raise error
        if failed > 0:
            raise ValueError(
                f"curvscope.{self._func}(data=...): set-up failed on another process (this is"
                f"{self._rank_text() or ' the only one'}); see the error raised there."
            )
        if int(count.item()) == 0:
            raise value_error(
                self._func, "data", "at least one example", self._data, "The data is empty."
            )
        self._num_examples, self._num_batches = int(count.item()), len(first)

    def _scan(self, state: _PassState, *, validate: bool) -> list[tuple]:
        records = []
        for batch in self._batches():
            with torch.no_grad():
                if validate and not records:
                    output = self._first_output(state, batch)
                else:
                    output = self._output_of(state, batch)(state.theta)
            records.append(
                (
                    batch.index,
                    batch.size,
                    fingerprint((batch.inputs, batch.targets)),
                    fingerprint(output),
                )
            )
        return records

    def _first_output(self, state: _PassState, batch: Batch) -> Any:
        try:
            output = self._output_of(state, batch)(state.theta)
        except Exception as err:
            raise ValueError(
                f"curvscope.{self._func}(data=...): model(inputs) failed on "
                f"{describe_batch(batch)}: {err}. Check that the inputs fit the model (a Tensor is "
                "passed as model(x), a tuple as model(*x), a dict as model(**x))."
            ) from err
        try:
            loss = self._loss_fn(output, batch.targets)
        except Exception as err:
            raise ValueError(
                f"curvscope.{self._func}(loss_fn=...): loss_fn(output, targets) failed on "
                f"{describe_batch(batch)} with output {describe(output)} and targets "
                f"{describe(batch.targets)}: {err}. Check that data yields targets that fit "
                "loss_fn (class indices of dtype long for cross-entropy, the output's shape "
                "for MSE)."
            ) from err
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
        return output

    def _compare(self, first: list[tuple], second: list[tuple]) -> None:
        fix = _DETERMINISM_FIX
        if len(first) != len(second):
            raise ValueError(
                f"curvscope.{self._func}(data=...): the data gave {len(first)} batches on one "
                f"pass and {len(second)} on the next. {fix}"
            )
        for (index, size, data_a, out_a), (_, size_b, data_b, out_b) in zip(
            first, second, strict=True
        ):
            if size != size_b or not same_fingerprint(data_a, data_b, 1e-9):
                raise ValueError(
                    f"curvscope.{self._func}(data=...): batch {index} changed between two passes "
                    f"over the data (shuffling or random augmentation?). {fix}"
                )
            if not same_fingerprint(out_a, out_b, 1e-6):
                raise ValueError(
                    f"curvscope.{self._func}(model=...): the model's output on batch {index} "
                    "changed between two passes over the same inputs (randomness in the model, "
                    f"such as dropout in train mode?). {fix}"
                )

    # -- helpers for subclasses ------------------------------------------------------------------
    def _pass_state(self) -> _PassState:
        named = dict(self._model.named_parameters())
        theta = torch.cat([named[name].detach().reshape(-1) for name in self._names])
        constants = {n: p.detach() for n, p in named.items() if n not in self._param_shapes}
        buffers = {n: b.detach().clone() for n, b in self._model.named_buffers()}
        return _PassState(theta, constants, buffers)

    def _unflatten_params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [math.prod(shape) for shape in self._param_shapes.values()]
        pieces = theta.split(sizes)
        return {
            name: piece.view(shape)
            for (name, shape), piece in zip(self._param_shapes.items(), pieces, strict=True)
        }

    def _output_of(self, state: _PassState, batch: Batch) -> Callable[[torch.Tensor], Any]:
        """θ (flat) -> model output on ``batch``, via functional_call (the model is untouched)."""
        args, kwargs = model_arguments(batch.inputs)

        def output(theta: torch.Tensor) -> Any:
            params = self._unflatten_params(theta)
            buffers = state.buffers
            if not self._eval_mode:  # train-mode BatchNorm updates buffers: fresh copies here
                buffers = {name: buffer.clone() for name, buffer in buffers.items()}
            return functional_call(self._model, (params, state.constants, buffers), args, kwargs)

        return output

    def _loss_of(self, state: _PassState, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
        """θ (flat) -> loss on ``batch``."""
        output = self._output_of(state, batch)
        return lambda theta: self._loss_fn(output(theta), batch.targets)

    def _batches(self) -> Iterator[Batch]:
        return iterate_batches(
            self._data, device=self.device, max_batch_size=self._max_batch_size, func=self._func
        )

    def _delta(self, delta: Any) -> torch.Tensor:
        func = f"{self._func}.loss"
        if delta is None:
            return torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        if isinstance(delta, Mapping):
            return self.flatten_dict(delta, func=func, arg="delta")
        return self._check_tensor(delta, func, "delta", ndim=1)

    def _rank_text(self) -> str:
        rank, world = rank_and_world_size()
        return f" on rank {rank} of {world}" if world > 1 else ""

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Eval mode (unless eval_mode=False), the global RNG state and attention kernels that
        support second derivatives; everything restored afterwards."""
        flags = [(module, module.training) for module in self._model.modules()]
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else 0]
        try:
            with torch.random.fork_rng(devices=devices), _differentiable_attention():
                if self._eval_mode:
                    self._model.eval()
                yield
        finally:
            for module, flag in flags:
                module.training = flag

    @contextlib.contextmanager
    def _progress_bar(self) -> Iterator[Callable[[], None]]:
        if not self._progress or not is_main_process():
            yield lambda: None
            return
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"{self._func} product", total=self._num_batches)
            yield lambda: bar.advance(task)
