"""Shared model cases for tests: tiny float64 models with a loss and a list of batches.

``MODEL_CASES`` is a list of factories; each returns a fresh ``ModelCase`` (model in train mode,
so that tests see operators switch to eval mode themselves). Use them as

    @pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
    def test_something(make_case):
        case = make_case()

``reference_loss(case)`` gives the full-data loss as a function of the flat parameters, for
dense references with torch.func.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPE = torch.float64


@dataclass
class ModelCase:
    name: str
    model: nn.Module
    loss_fn: Callable[..., torch.Tensor]
    data: list[tuple[Any, torch.Tensor]]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic float64 parameters (and BatchNorm statistics) without the global RNG."""
    gen = _generator(seed)
    model = model.to(DTYPE)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=gen, dtype=DTYPE))
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen, dtype=DTYPE))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=gen, dtype=DTYPE))
    return model.train()


def _split(inputs: Any, targets: torch.Tensor, sizes: list[int]) -> list[tuple[Any, torch.Tensor]]:
    """Cut a full batch into batches of the given sizes (the last one short)."""
    batches, start = [], 0
    for size in sizes:
        stop = start + size
        if isinstance(inputs, dict):
            part = {key: value[start:stop] for key, value in inputs.items()}
        else:
            part = inputs[start:stop]
        batches.append((part, targets[start:stop]))
        start = stop
    return batches


def _classes(n: int, num_classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=_generator(seed))


def mlp() -> ModelCase:
    model = _randomize(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), 0)
    x = torch.randn(11, 4, generator=_generator(1), dtype=DTYPE)
    return ModelCase("mlp", model, nn.CrossEntropyLoss(), _split(x, _classes(11, 3, 2), [4, 4, 3]))


def cnn_batchnorm() -> ModelCase:
    layers = [nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)]
    model = _randomize(nn.Sequential(*layers), 3)
    x = torch.randn(7, 1, 5, 5, generator=_generator(4), dtype=DTYPE)
    y = _classes(7, 3, 5)
    return ModelCase("cnn_batchnorm", model, nn.CrossEntropyLoss(), _split(x, y, [3, 3, 1]))


class _DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(features)) * scale)


def dict_input() -> ModelCase:
    model = _randomize(_DictInput(), 6)
    gen = _generator(7)
    inputs = {
        "features": torch.randn(9, 3, generator=gen, dtype=DTYPE),
        "scale": 1.0 + torch.rand(9, 1, generator=gen, dtype=DTYPE),
    }
    y = torch.randn(9, 2, generator=gen, dtype=DTYPE)
    return ModelCase("dict_input", model, nn.MSELoss(), _split(inputs, y, [4, 4, 1]))


def frozen() -> ModelCase:
    model = _randomize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 8)
    model[0].requires_grad_(False)
    gen = _generator(9)
    x = torch.randn(8, 3, generator=gen, dtype=DTYPE)
    y = torch.randn(8, 2, generator=gen, dtype=DTYPE)
    return ModelCase("frozen", model, nn.MSELoss(reduction="sum"), _split(x, y, [5, 3]))


class _Shared(nn.Module):
    """Two layers that share one weight matrix (but not their biases)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 3)
        self.second.weight = self.first.weight
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


def shared() -> ModelCase:
    model = _randomize(_Shared(), 10)
    x = torch.randn(7, 3, generator=_generator(11), dtype=DTYPE)
    y = _classes(7, 2, 12)
    return ModelCase("shared", model, nn.CrossEntropyLoss(reduction="sum"), _split(x, y, [3, 4]))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def transformer() -> ModelCase:
    model = _randomize(_Transformer(), 13)
    x = torch.randn(6, 3, 4, generator=_generator(14), dtype=DTYPE)
    y = _classes(6, 3, 15)
    return ModelCase("transformer", model, nn.CrossEntropyLoss(), _split(x, y, [4, 2]))


MODEL_CASES: list[Callable[[], ModelCase]] = [
    mlp,
    cnn_batchnorm,
    dict_input,
    frozen,
    shared,
    transformer,
]


def case_id(make_case: Callable[[], ModelCase]) -> str:
    return make_case.__name__


def full_batch(data: list[tuple[Any, torch.Tensor]]) -> tuple[Any, torch.Tensor]:
    """All batches concatenated into one (inputs, targets) batch."""
    inputs = [inputs for inputs, _ in data]
    if isinstance(inputs[0], dict):
        joined = {key: torch.cat([part[key] for part in inputs]) for key in inputs[0]}
    else:
        joined = torch.cat(inputs)
    return joined, torch.cat([targets for _, targets in data])


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def reference_output(
    case: ModelCase, names: list[str] | None = None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(θ0, θ -> model output on all data in eval mode, all targets), θ over ``names``."""
    model = copy.deepcopy(case.model).eval()
    if isinstance(model, _Transformer):  # the fast path has no forward-mode derivatives
        model.encoder.train()  # dropout is 0, so train mode computes the same function
    names = names or trainable_names(model)
    named = dict(model.named_parameters())
    shapes = [named[name].shape for name in names]
    theta0 = torch.cat([named[name].detach().reshape(-1) for name in names])
    inputs, targets = full_batch(case.data)

    def output(theta: torch.Tensor) -> torch.Tensor:
        pieces = theta.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
        with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels lack 2nd derivatives
            return functional_call(model, params, args, kwargs)

    return theta0, output, targets


def reference_loss(
    case: ModelCase, names: list[str] | None = None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(θ0, θ -> loss_fn over all the data at once), θ over ``names`` (default: trainable)."""
    theta0, output, targets = reference_output(case, names)
    return theta0, lambda theta: case.loss_fn(output(theta), targets)


class CubeWithoutForwardMode(torch.autograd.Function):
    """x³ with a backward formula only: forward-mode AD (jvp) raises NotImplementedError."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad
