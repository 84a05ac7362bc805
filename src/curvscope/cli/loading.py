"""Loading a user's model, checkpoint, data and loss for ``curvscope analyze``.

Every problem with the input raises :class:`BadInputError` (a ``ValueError``) with a one-line
message that names the option and the fix; the command turns it into exit status 2.
Checkpoints are read with ``torch.load(..., weights_only=True)``: a checkpoint can never run
code.
"""

from __future__ import annotations

import fnmatch
import importlib
import pickle
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

LOSSES = ("cross_entropy", "mse")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class BadInputError(ValueError):
    """The user's input (module, factory, checkpoint, data, loss, option) is unusable."""


def load_object(spec: str, *, option: str) -> Any:
    """Resolve ``"package.module:name"`` (``name`` may be dotted) to the object it names.

    Example:
        >>> load_object("math:sqrt", option="--model")(4.0)
        2.0
    """
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise BadInputError(
            f"{option} {spec!r}: expected 'package.module:name', e.g. 'mypkg.models:build'."
        )
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise BadInputError(
            f"{option} {spec!r}: cannot import module {module_name!r} ({error}). Check the name "
            "and that its directory is on PYTHONPATH."
        ) from error
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise BadInputError(
                f"{option} {spec!r}: module {module_name!r} has no attribute {attribute!r}."
            )
        value = getattr(value, part)
    return value


def _call_factory(spec: str, option: str) -> Any:
    factory = load_object(spec, option=option)
    if not callable(factory):
        raise BadInputError(
            f"{option} {spec!r}: expected a callable factory, got {type(factory).__name__}."
        )
    try:
        return factory()
    except Exception as error:
        raise BadInputError(
            f"{option} {spec!r}: the factory raised {type(error).__name__}: {error}"
        ) from error


def load_model(spec: str) -> nn.Module:
    """Call the factory ``spec`` ("package.module:factory") and check it returns an nn.Module."""
    model = _call_factory(spec, "--model")
    if not isinstance(model, nn.Module):
        raise BadInputError(
            f"--model {spec!r}: the factory returned {type(model).__name__}, expected a "
            "torch.nn.Module."
        )
    return model


def load_data(spec: str) -> list[Any] | Iterable[Any]:
    """Call the factory ``spec`` and check it returns an iterable of batches (kept re-iterable)."""
    data = _call_factory(spec, "--data")
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise BadInputError(
            f"--data {spec!r}: the factory returned {type(data).__name__}, expected an iterable "
            "of (inputs, targets) batches (a list or a DataLoader)."
        )
    return list(data) if isinstance(data, Iterator) else data


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict saved with ``torch.save`` into ``model`` (``weights_only=True``).

    Raises:
        BadInputError: unreadable file, pickled code, or keys/shapes that do not match (the
            missing and unexpected keys are listed).
    """
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise BadInputError(f"--checkpoint {str(path)!r}: no such file.") from error
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise BadInputError(
            f"--checkpoint {str(path)!r}: refused to load: it is not a plain state dict of "
            f"tensors (weights_only=True forbids pickled code). {first}"
        ) from error
    except Exception as error:
        raise BadInputError(
            f"--checkpoint {str(path)!r}: unreadable ({type(error).__name__}: {error})."
        ) from error
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise BadInputError(
            f"--checkpoint {str(path)!r}: expected a state dict (name -> tensor), got "
            f"{type(state).__name__}. Save it with torch.save(model.state_dict(), path)."
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BadInputError(
            f"--checkpoint {str(path)!r} does not match the model: missing keys {missing}, "
            f"unexpected keys {unexpected}."
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise BadInputError(
            f"--checkpoint {str(path)!r} does not match the model: {detail}"
        ) from error
    return model


def resolve_loss(spec: str) -> Callable[..., torch.Tensor]:
    """``cross_entropy``, ``mse`` or ``package.module:callable`` (a class is instantiated)."""
    if spec == "cross_entropy":
        return nn.CrossEntropyLoss()
    if spec == "mse":
        return nn.MSELoss()
    if ":" not in spec:
        raise BadInputError(
            f"--loss {spec!r}: unknown loss; expected cross_entropy, mse or "
            "'package.module:callable'."
        )
    loss = load_object(spec, option="--loss")
    if isinstance(loss, type):
        loss = loss()
    if not callable(loss):
        raise BadInputError(f"--loss {spec!r}: expected a callable, got {type(loss).__name__}.")
    return loss


def resolve_choice(value: str, choices: Iterable[str], option: str) -> str:
    """Check an option value against its choices."""
    choices = tuple(choices)
    if value not in choices:
        raise BadInputError(f"{option} {value!r}: unknown; expected one of {', '.join(choices)}.")
    return value


def resolve_device(spec: str) -> torch.device:
    """``auto`` (cuda when available), ``cpu`` or ``cuda``; refuses cuda without a GPU."""
    resolve_choice(spec, ("auto", "cpu", "cuda"), "--device")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA GPU is available here; use --device cpu.")
    return torch.device(spec)


def resolve_params(model: nn.Module, spec: str | None) -> list[str] | None:
    """Parameter names from a comma-separated list of names, glob patterns or regexes.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> resolve_params(model, "2.*")
        ['2.weight', '2.bias']
    """
    if spec is None or not spec.strip():
        return None
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    chosen: list[str] = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        if item in names:
            matches = [item]
        else:
            matches = fnmatch.filter(names, item)
            if not matches:
                try:
                    pattern = re.compile(item)
                except re.error:
                    pattern = None
                matches = [n for n in names if pattern and pattern.fullmatch(n)]
        if not matches:
            raise BadInputError(f"--params {item!r}: matches no parameter; the model has {names}.")
        chosen.extend(name for name in matches if name not in chosen)
    return [name for name in names if name in chosen]


def prepare(
    model: nn.Module, data: Any, *, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, list[Any]]:
    """Move the model and every batch to ``device``, floating tensors to ``dtype``."""
    model = model.to(device=device, dtype=dtype)
    return model, [_move(batch, dtype, device) for batch in data]


def _move(value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(item, dtype, device) for item in value)
    if isinstance(value, Mapping):
        return {key: _move(item, dtype, device) for key, item in value.items()}
    return value


def check_batches(model: nn.Module, loss_fn: Callable[..., Any], data: list[Any]) -> None:
    """Run the model and the loss on the first batch; a batch that does not fit is bad input."""
    if not data:
        raise BadInputError("--data: the factory returned no batches.")
    batch = data[0]
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise BadInputError(
            f"--data: each batch must be a pair (inputs, targets), got {type(batch).__name__}."
        )
    inputs, targets = batch
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                outputs = model(**inputs)
            elif isinstance(inputs, (list, tuple)):
                outputs = model(*inputs)
            else:
                outputs = model(inputs)
            loss = loss_fn(outputs, targets)
    except Exception as error:
        detail = " ".join(str(error).split())
        raise BadInputError(
            f"--data: the first batch does not fit the model and loss "
            f"({type(error).__name__}: {detail})."
        ) from error
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise BadInputError(
            "--loss: the loss must return a scalar tensor for a batch; use reduction='mean'."
        )
