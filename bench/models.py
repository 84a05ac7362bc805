"""The benchmark problems: the digits MLP, a small CNN and a 2-layer transformer classifier.

Each problem is a model in eval mode, a loss module and a fixed list of (inputs, targets)
batches, built deterministically from a seed without touching the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvscope.report.digits import train_digits_mlp


@dataclass
class Problem:
    """A model, a loss and the data as a list of batches (the whole dataset, fixed order)."""

    name: str
    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_examples(self) -> int:
        return sum(len(y) for _, y in self.batches)

    @property
    def full_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.cat([x for x, _ in self.batches]),
            torch.cat([y for _, y in self.batches]),
        )


def _split(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> list:
    return [
        (inputs[i : i + batch_size], targets[i : i + batch_size])
        for i in range(0, len(targets), batch_size)
    ]


def digits(*, batch_size: int = 256, dtype: torch.dtype = torch.float32, steps: int = 300):
    """The trained 64-32-10 tanh MLP on all 1,797 digits (2,410 parameters)."""
    model, inputs, labels = train_digits_mlp(seed=0, steps=steps, dtype=dtype)
    return Problem("digits MLP", model, nn.CrossEntropyLoss(), _split(inputs, labels, batch_size))


class SmallCNN(nn.Module):
    """conv3x3(3->16) relu pool, conv3x3(16->16) relu pool, avgpool to 2x2, linear(64->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cnn(*, num_images: int = 1024, batch_size: int = 256, dtype: torch.dtype = torch.float32):
    """The small CNN (3,418 parameters) on random 3x32x32 images with random labels."""
    generator = torch.Generator().manual_seed(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = SmallCNN().to(dtype).eval()
    inputs = torch.randn(num_images, 3, 32, 32, generator=generator, dtype=dtype)
    labels = torch.randint(0, 10, (num_images,), generator=generator)
    return Problem("small CNN", model, nn.CrossEntropyLoss(), _split(inputs, labels, batch_size))


class TransformerClassifier(nn.Module):
    """Token embedding + learned positions, 2 encoder layers, mean pooling, linear head."""

    def __init__(self, vocab: int = 64, length: int = 32, width: int = 32, classes: int = 10):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # torch's fused kernels (the eval-mode "fast path" of the encoder layer and of attention,
        # and the fused CPU attention kernel) have neither double backward nor forward-mode AD,
        # so no library can take second derivatives through them: use the plain math path.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH):
                hidden = self.encoder(self.embed(tokens) + self.position)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return self.head(hidden.mean(dim=1))


def transformer(*, num_sequences: int = 512, batch_size: int = 128, dtype=torch.float32):
    """The 2-layer transformer encoder classifier on random token sequences of length 32."""
    generator = torch.Generator().manual_seed(2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = TransformerClassifier().to(dtype).eval()
    tokens = torch.randint(0, 64, (num_sequences, 32), generator=generator)
    labels = torch.randint(0, 10, (num_sequences,), generator=generator)
    return Problem("transformer", model, nn.CrossEntropyLoss(), _split(tokens, labels, batch_size))


def gradient(problem: Problem) -> list[torch.Tensor]:
    """One plain gradient of the mean loss over the whole dataset (the cost unit)."""
    params = [p for p in problem.model.parameters() if p.requires_grad]
    total = problem.num_examples
    grads = [torch.zeros_like(p) for p in params]
    for inputs, targets in problem.batches:
        loss = problem.loss_fn(problem.model(inputs), targets) * (len(targets) / total)
        for g, piece in zip(grads, torch.autograd.grad(loss, params), strict=True):
            g += piece
    return grads


def _unflatten(problem: Problem, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, p in problem.model.named_parameters():
        out[name] = vector[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def reference_product(problem: Problem, v: torch.Tensor, kind: str = "hessian") -> torch.Tensor:
    """An independent reference product with the full-data Hessian or GGN of the mean loss,
    on the whole dataset as one batch, by reverse mode only (double backward; the GGN's J v by
    the double-vjp trick), so that it works for models without forward-mode support."""
    inputs, targets = problem.full_batch
    params = [p for p in problem.model.parameters() if p.requires_grad]
    tangent = list(_unflatten(problem, v).values())
    grad = torch.autograd.grad
    out = problem.model(inputs)
    if kind == "hessian":
        g = grad(problem.loss_fn(out, targets), params, create_graph=True)
        result = grad(g, params, grad_outputs=tangent)
    else:
        u = torch.zeros_like(out, requires_grad=True)
        jtu = grad(out, params, grad_outputs=u, create_graph=True)
        (jv,) = grad(jtu, u, grad_outputs=tangent)
        (g_out,) = grad(problem.loss_fn(out, targets), out, create_graph=True)
        (hjv,) = grad(g_out, out, grad_outputs=jv.detach())
        result = grad(out, params, grad_outputs=hjv)
    return torch.cat([r.detach().reshape(-1) for r in result])
