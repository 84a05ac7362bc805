"""The built-in example: a small MLP trained on scikit-learn's bundled digits data (no download).

The 64-32-10 tanh MLP has 2,410 parameters. Training is deterministic and takes about a second
on a CPU; it never touches the global RNG (initialisation runs under a forked, seeded RNG).
"""

from __future__ import annotations

import torch
from torch import nn


def load_digits(
    *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digit images as (inputs (1797, 64) scaled to [0, 1], labels (1797,))."""
    try:
        from sklearn.datasets import load_digits as _sklearn_load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "curvscope's built-in example needs scikit-learn: pip install 'curvscope[report]'"
        ) from error
    bunch = _sklearn_load_digits()
    inputs = torch.as_tensor(bunch.data / 16.0, dtype=dtype, device=device)
    labels = torch.as_tensor(bunch.target, dtype=torch.long, device=device)
    return inputs, labels


def digits_mlp(*, seed: int = 0, hidden: int = 32, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A fresh 64-hidden-10 tanh MLP, initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    return model.to(dtype)


def train_digits_mlp(
    *,
    seed: int = 0,
    steps: int = 300,
    lr: float = 0.01,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    held_out: int = 0,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Train the digits MLP with full-batch Adam; deterministic for a given seed.

    The last ``held_out`` digits (see :func:`digits_held_out`) are left out of training.

    Returns:
        (model in eval mode, inputs (1797 - held_out, 64), labels (1797 - held_out,)).
    """
    inputs, labels = load_digits(dtype=dtype, device=device)
    keep = len(labels) - held_out
    inputs, labels = inputs[:keep], labels[:keep]
    model = digits_mlp(seed=seed, dtype=dtype).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
    for parameter in model.parameters():
        parameter.grad = None
    return model.eval(), inputs, labels


def digits_example(
    *,
    seed: int = 0,
    batch_size: int = 256,
    steps: int = 300,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    held_out: int = 0,
) -> tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The built-in example, ready for analysis: (trained model, loss function, batches).

    The batches are a list of (inputs, labels) of at most ``batch_size`` examples covering all
    1,797 digits once, in a fixed order (the last batch is short); with ``held_out`` > 0 the
    last ``held_out`` digits are left out of training and of the batches (get them with
    :func:`digits_held_out`).

    Example:
        >>> model, loss_fn, data = digits_example(steps=1)
        >>> sum(p.numel() for p in model.parameters()), sum(len(y) for _, y in data)
        (2410, 1797)
    """
    model, inputs, labels = train_digits_mlp(
        seed=seed, steps=steps, dtype=dtype, device=device, held_out=held_out
    )
    batches = [
        (inputs[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]
    return model, nn.CrossEntropyLoss(), batches


def digits_held_out(
    held_out: int,
    *,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The last ``held_out`` digits, as batches: the data ``digits_example(held_out=...)``
    did not train on.

    Example:
        >>> sum(len(y) for _, y in digits_held_out(360))
        360
    """
    inputs, labels = load_digits(dtype=dtype, device=device)
    inputs, labels = inputs[len(labels) - held_out :], labels[len(labels) - held_out :]
    return [
        (inputs[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


def digits_train_test(
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    batch_size: int = 2048,
    steps: int = 300,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, nn.Module, list, list]:
    """The digits MLP trained on a fixed split, for measuring held-out accuracy.

    The split is a permutation drawn from ``seed`` (no global RNG): the last ``test_fraction``
    of it is held out. Training is full-batch Adam as in :func:`train_digits_mlp`.

    Returns:
        (trained model in eval mode, loss function, training batches, test batches).
    """
    inputs, labels = load_digits(dtype=dtype, device=device)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = len(labels) - round(test_fraction * len(labels))
    train, test = order[:cut].to(inputs.device), order[cut:].to(inputs.device)
    model = digits_mlp(seed=seed, dtype=dtype).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs[train]), labels[train]).backward()
        optimizer.step()
    for parameter in model.parameters():
        parameter.grad = None

    def batches(index: torch.Tensor) -> list:
        return [
            (inputs[index[i : i + batch_size]], labels[index[i : i + batch_size]])
            for i in range(0, len(index), batch_size)
        ]

    return model.eval(), loss_fn, batches(train), batches(test)
