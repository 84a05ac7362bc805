"""Kronecker factors of one batch for the KFAC preconditioner (Linear, Conv1d, Conv2d).

Conventions (those of ``curvscope.KFACOperator``, Martens & Grosse 2015): the weight and bias of
a module share one factorisation, the layer input augmented with a constant 1 (``ā = [a, 1]``);
``A = (1/N) Σ_n Σ_r ā_nr ā_nrᵀ / R`` over the N examples and the R positions that share the
weight (a convolution's patches, a Linear layer's leading dimensions: "expand"), and
``G = Σ_n Σ_r Σ_c g_nrc g_nrcᵀ`` with ``g = Jᵀc`` the layer's output gradient back-propagated
from an output-space column ``c`` carrying the loss normalisation (1/(N m) for a mean over N
examples of m terms each, 1 for a sum): the columns of a square root of the loss Hessian
(``"ggn"``), the gradient at one label drawn from the model per example (``"monte_carlo"``), or
the gradient of each example's loss terms at its true label (``"empirical"``). Then ``G ⊗ A``
approximates the GGN/Fisher block of the loss as ``loss_fn`` reduces it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..operators._kfac_capture import unfold_patches
from ..operators.data import model_arguments
from ..operators.losses import LossSpec

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class Layer:
    """A supported module and the names of its selected weight and bias (None if not)."""

    name: str
    module: nn.Module
    weight: str | None = None
    bias: str | None = None
    inputs: list[torch.Tensor] = field(default_factory=list, repr=False)
    outputs: list[torch.Tensor] = field(default_factory=list, repr=False)

    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]


def _supported(module: nn.Module) -> bool:
    if not isinstance(module, SUPPORTED):
        return False
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros"
    return True


def find_layers(model: nn.Module) -> tuple[list[Layer], list[str]]:
    """Supported layers (with their trainable weight/bias) and the other trainable parameters."""
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1
    layers: dict[str, Layer] = {}
    other = []
    for full, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module_name, _, attr = full.rpartition(".")
        module = model.get_submodule(module_name)
        if owners[id(param)] > 1 or attr not in ("weight", "bias") or not _supported(module):
            other.append(full)
            continue
        layer = layers.setdefault(module_name, Layer(module_name, module))
        setattr(layer, attr, full)
    return list(layers.values()), other


def _features(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Augmented inputs (n, R, d_in)."""
    n = x.shape[0]
    if isinstance(layer.module, nn.Linear):
        features = x.reshape(n, -1, x.shape[-1])
    else:
        features = unfold_patches(layer.module, x).transpose(1, 2)  # (n, L, C_in·k)
    if layer.weight is None:
        features = features[..., :0]
    if layer.bias is not None:
        features = torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)
    return features


def _grads(layer: Layer, grad: torch.Tensor) -> torch.Tensor:
    """Output gradients (n·R, d_out)."""
    if isinstance(layer.module, nn.Linear):
        return grad.reshape(-1, grad.shape[-1])
    return grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2).reshape(-1, grad.shape[1])


def output_columns(
    spec: LossSpec, loss_fn: Any, output: torch.Tensor, targets: Any, fisher: str, gen: Any
) -> torch.Tensor:
    """Columns (k, *output.shape) whose back-propagated outer products sum to G (see above)."""
    output = output.detach()
    n = output.shape[0]
    if spec.kind == "cross_entropy":
        terms = math.prod(output.shape[2:])
    else:
        terms = output[0].numel()
    weight = 1.0 / (n * terms) if spec.reduction == "mean" else 1.0
    if fisher == "empirical":
        leaf = output.requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(loss_fn(leaf, targets), leaf)
        scale = n * terms if spec.reduction == "mean" else 1.0
        return (math.sqrt(weight) * scale * gradient).unsqueeze(0)
    if spec.kind == "cross_entropy":
        probs = torch.softmax(output, dim=1)
        classes = probs.shape[1]
        if fisher == "ggn":  # sqrt(p_c) (e_c - p): Σ_c = diag(p) - p pᵀ at every position
            eye = torch.eye(classes, dtype=output.dtype, device=output.device)
            eye = eye.reshape(classes, 1, classes, *([1] * (output.ndim - 2)))
            root = torch.sqrt(probs).movedim(1, 0).unsqueeze(2)
            return math.sqrt(weight) * root * (eye - probs.unsqueeze(0))
        flat = probs.movedim(1, -1).reshape(-1, classes).to("cpu", torch.float64)
        labels = torch.multinomial(flat, 1, generator=gen)[:, 0]
        onehot = F.one_hot(labels, classes).to(output.dtype).reshape(probs.movedim(1, -1).shape)
        return math.sqrt(weight) * (probs - onehot.movedim(-1, 1).to(output.device)).unsqueeze(0)
    if fisher == "ggn":  # MSE: 2 I per element
        size = output.shape[-1]
        eye = torch.eye(size, dtype=output.dtype, device=output.device)
        eye = eye.reshape(size, *([1] * (output.ndim - 1)), size).expand(size, *output.shape)
        return math.sqrt(2.0 * weight) * eye
    noise = torch.randn(output.shape, generator=gen, dtype=torch.float64)  # y ~ N(f, I/2)
    noise = noise.to(dtype=output.dtype, device=output.device)
    return (-math.sqrt(2.0) * math.sqrt(weight) * noise).unsqueeze(0)


@contextlib.contextmanager
def _recording(layers: list[Layer]) -> Iterator[None]:
    def hook(layer: Layer):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            layer.inputs.append(args[0].detach())
            layer.outputs.append(output)

        return record

    for layer in layers:
        layer.inputs.clear()
        layer.outputs.clear()
    handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(module, module.training) for module in model.modules()]
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def batch_factors(
    model: nn.Module,
    loss_fn: Any,
    spec: LossSpec,
    batch: tuple[Any, Any],
    layers: list[Layer],
    fisher: str,
    gen: torch.Generator,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """``{layer name: (A, G)}`` on ``batch`` (model in eval mode, no ``.grad`` written), and the
    names of layers not called exactly once in the forward pass (left out)."""
    inputs, targets = batch
    args, kwargs = model_arguments(inputs)
    with _eval_mode(model), torch.enable_grad(), _recording(layers):
        output = model(*args, **kwargs)
    miscalled = [layer.name for layer in layers if len(layer.outputs) != 1]
    used = [layer for layer in layers if len(layer.outputs) == 1 and layer.outputs[0].requires_grad]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in used:
        features = _features(layer, layer.inputs[0])
        flat = features.reshape(-1, features.shape[-1])
        a = flat.T @ flat / (features.shape[0] * features.shape[1])
        factors[layer.name] = (a, None)
    columns = output_columns(spec, loss_fn, output, targets, fisher, gen)
    outs = [layer.outputs[0] for layer in used]
    for column in columns:
        grads = torch.autograd.grad(output, outs, column, retain_graph=True, allow_unused=True)
        for layer, grad in zip(used, grads, strict=True):
            a, g = factors[layer.name]
            if grad is not None:
                flat = _grads(layer, grad)
                g = flat.T @ flat if g is None else g + flat.T @ flat
            factors[layer.name] = (a, g)
    for layer in used:
        a, g = factors[layer.name]
        if g is None:
            rows = layer.module.weight.shape[0]
            g = a.new_zeros(rows, rows)
        factors[layer.name] = (a, g)
        layer.inputs.clear()
        layer.outputs.clear()
    return factors, miscalled
