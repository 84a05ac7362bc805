"""A user's model, data and losses, for the `curvscope analyze --model/--data` tests.

Loaded by the command as `user_model:<name>` with this directory on the path.
"""

import torch
from torch import nn

NUM_EXAMPLES, NUM_FEATURES, NUM_CLASSES = 30, 3, 2


def build_model() -> nn.Module:
    """A 3-4-2 tanh network (26 parameters), initialised from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Linear(NUM_FEATURES, 4), nn.Tanh(), nn.Linear(4, NUM_CLASSES)
        ).double()


def full_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All examples as (inputs (30, 3) float64, labels (30,))."""
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(NUM_EXAMPLES, NUM_FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (NUM_EXAMPLES,), generator=generator)
    return inputs, labels


def build_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches of 10 examples."""
    inputs, labels = full_data()
    return [(inputs[i : i + 10], labels[i : i + 10]) for i in range(0, NUM_EXAMPLES, 10)]


def build_data_iterator():
    """The same batches as a generator (used up after one pass: the command keeps a list)."""
    yield from build_data()


def build_wrong_width_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches with 5 features: they do not fit the model."""
    return [(torch.zeros(4, 5, dtype=torch.float64), torch.zeros(4, dtype=torch.long))]


def build_string() -> str:
    """A factory that returns the wrong type."""
    return "not a model"


def build_broken() -> nn.Module:
    """A factory that raises."""
    raise RuntimeError("cannot build")


NOT_CALLABLE = 3


def half_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A custom loss: mean over examples of ||softmax(outputs) - onehot||^2 / 2."""
    onehot = nn.functional.one_hot(targets, NUM_CLASSES).to(outputs.dtype)
    return 0.5 * ((outputs.softmax(-1) - onehot) ** 2).sum(-1).mean()


def crashing_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Works on a batch without gradients (the input check), crashes inside the analysis."""
    if outputs.requires_grad:
        raise RuntimeError("boom inside the computation")
    return nn.functional.cross_entropy(outputs, targets)


class Payload:
    """A custom class: a checkpoint holding one carries pickled code and must be refused."""

    def __init__(self) -> None:
        self.value = 1


def build_held_out() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """20 held-out examples (not in build_data), in two batches."""
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(20, NUM_FEATURES, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (20,), generator=generator)
    return [(inputs[:12], labels[:12]), (inputs[12:], labels[12:])]
