"""Input validation, in one place.

Every public function validates at its boundary with these helpers, so that every message has
the same form: ``"curvscope.<func>(<arg>=...): expected <what>, got <what came>. <fix>"``.
Only ``TypeError`` and ``ValueError`` are raised; never a bare ``assert``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch


def describe(value: Any) -> str:
    """A short description of ``value`` for an error message."""
    if isinstance(value, torch.Tensor):
        return f"a Tensor of shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (bool, numbers.Number, str)) or value is None:
        return repr(value)
    return f"an object of type {type(value).__name__}"


def message(func: str, arg: str, expected: str, got: Any, fix: str = "") -> str:
    """Format an error message naming the call, the argument, the expectation and the fix."""
    text = f"curvscope.{func}({arg}=...): expected {expected}, got {describe(got)}."
    return f"{text} {fix}".rstrip()


def type_error(func: str, arg: str, expected: str, got: Any, fix: str = "") -> TypeError:
    return TypeError(message(func, arg, expected, got, fix))


def value_error(func: str, arg: str, expected: str, got: Any, fix: str = "") -> ValueError:
    return ValueError(message(func, arg, expected, got, fix))


def check_choice(func: str, arg: str, value: Any, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of ``choices`` (strings)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise value_error(func, arg, f"one of {listed}", value, f"Pass one of {listed}.")
    return value


def check_int(
    func: str, arg: str, value: Any, *, minimum: int | None = None, allow_none: bool = False
) -> int | None:
    """Check that ``value`` is an integer (not a bool), at least ``minimum``."""
    if value is None and allow_none:
        return None
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    if allow_none:
        expected += " or None"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise type_error(func, arg, expected, value)
    if minimum is not None and value < minimum:
        raise value_error(func, arg, expected, value)
    return int(value)


def check_float(
    func: str,
    arg: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_interval: bool = False,
) -> float:
    """Check that ``value`` is a real number in [minimum, maximum] (or the open interval)."""
    lo = "(" if open_interval else "["
    hi = ")" if open_interval else "]"
    if minimum is not None and maximum is not None:
        expected = f"a number in {lo}{minimum}, {maximum}{hi}"
    elif minimum is not None:
        expected = f"a number {'>' if open_interval else '>='} {minimum}"
    elif maximum is not None:
        expected = f"a number {'<' if open_interval else '<='} {maximum}"
    else:
        expected = "a real number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_error(func, arg, expected, value)
    value = float(value)
    if value != value:  # NaN
        raise value_error(func, arg, expected, value)
    if minimum is not None and (value < minimum or (open_interval and value == minimum)):
        raise value_error(func, arg, expected, value)
    if maximum is not None and (value > maximum or (open_interval and value == maximum)):
        raise value_error(func, arg, expected, value)
    return value


def check_generator_or_seed(func: str, arg: str, value: Any) -> None:
    """Check that ``value`` is an integer seed or a ``torch.Generator``."""
    if isinstance(value, torch.Generator):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise type_error(
            func, arg, "an integer seed or a torch.Generator", value, "Pass e.g. seed=0."
        )


def check_dtype_and_device(
    func: str, arg: str, value: torch.Tensor, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Check that the tensor ``value`` has the operator's ``dtype`` and ``device``."""
    if value.dtype != dtype:
        raise value_error(func, arg, f"dtype {dtype}", value, f"Cast it with .to({dtype}).")
    if torch.device(value.device) != torch.device(device):
        raise value_error(func, arg, f"device {device}", value, f"Move it with .to('{device}').")


def check_not_inference_mode(func: str) -> None:
    """Refuse to run under ``torch.inference_mode()``, where autograd cannot record anything.

    For code that needs ``torch.autograd`` (operators, estimators over them): one clear error
    instead of torch's messages about inference tensors. ``torch.no_grad()`` is fine, because
    curvscope turns gradients back on where it needs them.

    Raises:
        RuntimeError: if inference mode is on; the message names ``func`` and the fix.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"curvscope.{func}: cannot run under torch.inference_mode(), which switches autograd "
            "off for everything inside it, and curvature needs autograd. Call it outside "
            "torch.inference_mode(), e.g. under torch.no_grad() (curvscope enables gradients "
            "where it needs them) or with no context manager at all."
        )
