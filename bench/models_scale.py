"""Real-architecture problems for the speed cases of issue 9 (torchvision cannot be installed
beside the CPU torch build, so the networks are defined here).

- ``resnet18``: the CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlocks 64-128-256-512 with
  BatchNorm), 11.2M parameters, on 3x32x32 images.
- ``bert``: a BERT-base-sized encoder (12 layers, width 768, 12 heads, GELU, post-norm,
  vocabulary 30,522, 512 positions, token types) with a pooled 2-class head, 110M parameters.
- ``gpt2``: a GPT-2-small-sized causal decoder (12 pre-norm layers, width 768, 12 heads,
  vocabulary 50,257, 1,024 positions, language-model head tied to the token embedding),
  124M parameters, next-token loss over every position.
- ``lstm_lm``: the "medium" LSTM language model of Zaremba et al. (2014): 2 layers of 650,
  vocabulary 10,000, 35 steps, batch 20 (19.8M parameters, untied).

Each is a ``models.Problem`` with ONE batch (the speed cases measure a product on one batch),
built from a seed without touching the global RNG, in eval mode. The transformers run attention
through the math kernel with the fast path off, as ``models.TransformerClassifier`` does: the
fused kernels have neither double backward nor forward-mode AD.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .models import Problem


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR variant of ResNet-18 (He et al., 2016): 11,173,962 parameters for 10 classes."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))
        blocks, width = [], 64
        for outputs, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(width, outputs, stride), BasicBlock(outputs, outputs, 1)]
            width = outputs
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.blocks(torch.relu(self.stem(x)))
        return self.head(hidden.mean(dim=(2, 3)))


def _math_attention(run):
    """Run ``run()`` with the transformer fast path off and the math attention kernel."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return run()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class Bert(nn.Module):
    """A BERT-base-sized encoder with a pooled classification head (dropout 0)."""

    def __init__(self, layers: int = 12, width: int = 768, vocab: int = 30522, classes: int = 2):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(512, width)
        self.types = nn.Embedding(2, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        layer = nn.TransformerEncoderLayer(
            width, 12, 4 * width, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.norm(self.tokens(tokens) + self.positions(positions) + self.types.weight[0])
        hidden = _math_attention(lambda: self.encoder(hidden))
        return self.head(torch.tanh(self.pool(hidden[:, 0])))


class Gpt2(nn.Module):
    """A GPT-2-small-sized causal decoder; the output layer is tied to the token embedding.

    Returns next-token logits for every position as (batch, vocab, length), the layout of
    ``nn.CrossEntropyLoss`` for sequences.
    """

    def __init__(self, layers: int = 12, width: int = 768, vocab: int = 50257) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(1024, width)
        layer = nn.TransformerEncoderLayer(
            width, 12, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.tokens.weight  # tied, as in GPT-2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        hidden = self.tokens(tokens) + self.positions(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = _math_attention(lambda: self.decoder(hidden, mask=mask, is_causal=True))
        return self.lm_head(self.norm(hidden)).transpose(1, 2)


class LstmLm(nn.Module):
    """Embedding, a 2-layer LSTM and a linear decoder; logits as (batch, vocab, steps)."""

    def __init__(self, vocab: int = 10000, hidden: int = 650, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.decoder(hidden).transpose(1, 2)


def _build(seed: int, make) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def resnet18(*, batch_size: int = 32) -> Problem:
    """ResNet-18 (CIFAR) on one batch of random 3x32x32 images with random labels."""
    generator = torch.Generator().manual_seed(10)
    model = _build(10, ResNet18)
    inputs = torch.randn(batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    return Problem("ResNet-18 (CIFAR)", model, nn.CrossEntropyLoss(), [(inputs, labels)])


def bert(*, batch_size: int = 4, length: int = 128, layers: int = 12) -> Problem:
    """The BERT-base-sized encoder on one batch of random token sequences, 2 classes."""
    generator = torch.Generator().manual_seed(11)
    model = _build(11, lambda: Bert(layers=layers))
    tokens = torch.randint(0, 30522, (batch_size, length), generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    name = "BERT-base-sized encoder" + ("" if layers == 12 else f" ({layers} of 12 layers)")
    return Problem(name, model, nn.CrossEntropyLoss(), [(tokens, labels)])


def gpt2(*, batch_size: int = 4, length: int = 128, layers: int = 12) -> Problem:
    """The GPT-2-small-sized decoder on one batch of random tokens, next-token loss."""
    generator = torch.Generator().manual_seed(12)
    model = _build(12, lambda: Gpt2(layers=layers))
    tokens = torch.randint(0, 50257, (batch_size, length + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    name = "GPT-2-small-sized decoder" + ("" if layers == 12 else f" ({layers} of 12 layers)")
    return Problem(name, model, nn.CrossEntropyLoss(), [(inputs, targets)])


def lstm_lm(*, batch_size: int = 20, steps: int = 35) -> Problem:
    """The medium LSTM language model on one batch of random tokens, next-token loss."""
    generator = torch.Generator().manual_seed(13)
    model = _build(13, LstmLm)
    tokens = torch.randint(0, 10000, (batch_size, steps + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return Problem("LSTM language model", model, nn.CrossEntropyLoss(), [(inputs, targets)])
