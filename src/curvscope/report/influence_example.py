"""The built-in influence example: the digits MLP trained on digits with some labels flipped.

Deterministic for a seed, never touching the global RNG: a seeded split into training and test
digits, a seeded choice of the training labels to flip (each to a different, random class), and
full-batch Adam from a seeded initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .digits import digits_mlp, load_digits


@dataclass(frozen=True)
class NoisyDigits:
    """The trained model, its loss, the (noisy) training batches and the clean test batch.

    Attributes:
        model: the 64-32-10 tanh MLP (2,410 parameters) trained on the noisy labels, eval mode.
        loss_fn: ``nn.CrossEntropyLoss()``.
        train: a list of one ``(inputs, noisy labels)`` batch.
        test: one ``(inputs, labels)`` batch of held-out digits.
        flipped: indices of the training examples whose label was flipped.
        clean_labels: the training labels before flipping.
    """

    model: nn.Module
    loss_fn: nn.Module
    train: list[tuple[torch.Tensor, torch.Tensor]]
    test: tuple[torch.Tensor, torch.Tensor]
    flipped: torch.Tensor
    clean_labels: torch.Tensor


def noisy_digits_example(
    *,
    seed: int = 0,
    flip_fraction: float = 0.1,
    num_test: int = 297,
    steps: int = 300,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> NoisyDigits:
    """Train the digits MLP on 1,797 − ``num_test`` digits, ``flip_fraction`` of them relabelled.

    Example:
        >>> example = noisy_digits_example(steps=1)
        >>> len(example.train[0][1]), len(example.flipped), len(example.test[1])
        (1500, 150, 297)
    """
    inputs, labels = load_digits(dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    test, train = order[:num_test], order[num_test:]
    clean = labels[train]
    flipped = torch.randperm(len(train), generator=generator)[: int(flip_fraction * len(train))]
    shift = torch.randint(1, 10, (len(flipped),), generator=generator)
    noisy, where = clean.clone(), flipped.to(clean.device)
    noisy[where] = (clean[where] + shift.to(clean.device)) % 10
    model = digits_mlp(seed=seed, dtype=dtype).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs[train]), noisy).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return NoisyDigits(
        model=model.eval(),
        loss_fn=loss_fn,
        train=[(inputs[train], noisy)],
        test=(inputs[test], labels[test]),
        flipped=flipped.sort().values,
        clean_labels=clean,
    )
