"""Explicit randomness: every stochastic routine takes a seed or a ``torch.Generator``.

Library code never touches the global RNG.
"""

from __future__ import annotations

import torch


def make_generator(
    seed: int | torch.Generator, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh generator from an integer seed, or ``seed`` itself if it is already a generator.

    Random numbers are always drawn on the CPU generator and then moved, so that the same seed
    gives the same probes on every device and every process of a distributed run.
    """
    if isinstance(seed, torch.Generator):
        return seed
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


def rademacher(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Random signs, +1 or -1 with equal probability, drawn on the CPU then moved."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


def gaussian(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """Standard normal samples, drawn on the CPU in float64 then cast and moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(
        dtype=dtype, device=device
    )
