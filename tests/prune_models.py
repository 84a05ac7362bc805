"""Small float64 problems for the pruning tests."""

from __future__ import annotations

import torch
from torch import nn


def seeded(seed: int):
    return torch.Generator().manual_seed(seed)


def least_squares(num: int = 40, dim: int = 6, seed: int = 0):
    """A Linear(dim, 1) at the least-squares optimum of MSE: the loss is exactly quadratic."""
    gen = seeded(seed)
    x = torch.randn(num, dim, generator=gen) * torch.linspace(0.3, 2.0, dim)
    y = x @ torch.randn(dim, 1, generator=gen) + 0.3 * torch.randn(num, 1, generator=gen)
    design = torch.cat([x, torch.ones(num, 1)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    model = nn.Linear(dim, 1).double()
    with torch.no_grad():
        model.weight.copy_(solution[:dim].T)
        model.bias.copy_(solution[dim])
    return model, nn.MSELoss(), (x, y)


def mlp(seed: int = 0, sizes=(8, 12, 4), num: int = 60):
    """A trained tanh MLP with cross-entropy on random data (rows of 8 and 12 inputs)."""
    gen = seeded(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])
        ).double()
    x = torch.randn(num, sizes[0], generator=gen)
    y = torch.randint(0, sizes[2], (num,), generator=gen)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for parameter in model.parameters():
        parameter.grad = None
    return model.eval(), nn.CrossEntropyLoss(), [(x[:40], y[:40]), (x[40:], y[40:])]


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 4, 2, stride=2, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))  # (n, 4, 4, 4)
        h = torch.tanh(self.conv1d(h.flatten(2)))  # (n, 4, 8)
        return self.head(h.mean(dim=1))


def cnn(seed: int = 0, num: int = 24):
    gen = seeded(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCNN().double().eval()
    x = torch.randn(num, 4, 4, 4, generator=gen)
    y = torch.randint(0, 3, (num,), generator=gen)
    return model, nn.CrossEntropyLoss(), [(x, y)]
