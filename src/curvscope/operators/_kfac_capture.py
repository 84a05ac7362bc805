"""The layers KFAC understands, and what one batch tells about them.

``find_layers`` maps the selected parameters to their modules (Linear, Conv1d/Conv2d, Embedding,
LayerNorm, BatchNorm) and refuses the rest by name. ``capture`` records each layer's input and
output during one forward pass (forward hooks, removed afterwards), and ``output_gradients``
back-propagates output-space columns to the layer outputs, one column at a time.
``layer_inputs``/``layer_grads`` reshape them to (n, R, d): R positions share the weight (the
sequence of a Linear layer's input, the patches of a convolution), and convolutions with groups
give one pair per group.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_KRONECKER = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
_NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
_SUPPORTED = "Linear, Conv1d, Conv2d, Embedding, LayerNorm and BatchNorm (weight and bias)"


@dataclass
class Layer:
    """A module whose selected parameters (``weight``/``bias``: full names or None) KFAC covers."""

    name: str
    module: nn.Module
    weight: str | None = None
    bias: str | None = None

    @property
    def is_norm(self) -> bool:
        return isinstance(self.module, _NORMS)

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1)

    def rows(self) -> int:
        """Output features (rows of the weight matrix) per group."""
        module = self.module
        if isinstance(module, nn.Embedding):
            return module.embedding_dim
        out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        return out // self.groups

    def columns(self) -> int:
        """Input features per group, with the constant 1 when the bias is selected."""
        module = self.module
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
        size = 0
        if self.weight is not None:
            size = module.weight[0].numel()
        return size + (self.bias is not None)


@dataclass
class Record:
    """One layer's input and output in a forward pass."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def _refuse(func: str, names: list[str], why: str) -> ValueError:
    return ValueError(
        f"curvscope.{func}(params=...): {why}: {names}. Restrict params= to the parameters of "
        f"modules it supports ({_SUPPORTED}), e.g. params=[...] without these."
    )


def _check_module(func: str, name: str, module: nn.Module, param: str) -> None:
    bad = ""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
        bad = f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
        bad = "max_norm or sparse gradients"
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        bad = "scale_grad_by_freq=True"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
        bad = "track_running_stats=False (batch statistics couple the examples)"
    if bad:
        raise _refuse(func, [param], f"module {name!r} uses {bad}")


def find_layers(
    model: nn.Module, names: Sequence[str], func: str, *, strict: bool = True
) -> tuple[list[Layer], list[str]]:
    """The layers of the selected parameters, in model order, and the names left over (tied
    or unsupported); with ``strict=True`` leftovers raise a clear error instead."""
    owners: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), set()).add(id(module))
    named = dict(model.named_parameters())
    layers: dict[str, Layer] = {}
    unsupported, tied = [], []
    for full in names:
        module_name, _, attr = full.rpartition(".")
        module = model.get_submodule(module_name)
        if len(owners[id(named[full])]) > 1:
            tied.append(full)
            continue
        supported = isinstance(module, (*_KRONECKER, *_NORMS)) and attr in ("weight", "bias")
        if not supported:
            unsupported.append(f"{full} ({type(module).__name__})")
            continue
        try:
            _check_module(func, module_name, module, full)
        except ValueError:
            if strict:
                raise
            unsupported.append(full)
            continue
        layer = layers.setdefault(module_name, Layer(module_name, module))
        setattr(layer, attr, full)
    if strict and tied:
        raise _refuse(func, tied, "these parameters are tied (shared by several modules)")
    if strict and unsupported:
        raise _refuse(func, unsupported, "these parameters belong to modules KFAC does not support")
    leftover = set(tied) | {name.split(" ")[0] for name in unsupported}
    return list(layers.values()), [name for name in names if name in leftover]


@contextlib.contextmanager
def capture(layers: list[Layer], copy_outputs: bool = False) -> Iterator[dict[str, Record]]:
    """Record each layer's input and output while the context is open (hooks removed after)."""
    records = {layer.name: Record() for layer in layers}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if copy_outputs:  # an in-place op follows: differentiate w.r.t. an untouched copy
                output = output.clone()
            records[name].inputs.append(args[0].detach())
            records[name].outputs.append(output)
            records[name].versions.append(output._version)
            return output

        return record

    handles = [layer.module.register_forward_hook(hook(layer.name)) for layer in layers]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def miscalled(records: dict[str, Record]) -> list[str]:
    """The layers not called exactly once in the forward pass."""
    return [name for name, record in records.items() if len(record.outputs) != 1]


def check_records(records: dict[str, Record], func: str) -> bool:
    """Each layer called exactly once; returns whether an output was modified in place."""
    for name, record in records.items():
        if len(record.outputs) != 1:
            how = "was not called" if not record.outputs else f"ran {len(record.outputs)} times"
            raise ValueError(
                f"curvscope.{func}(params=...): module {name!r} {how} in one forward pass (its "
                "parameters are used directly, as nn.MultiheadAttention uses out_proj, or the "
                "module is reused). KFAC needs one call per module; restrict params= to "
                "exclude its parameters."
            )
    return any(r.outputs[0]._version != r.versions[0] for r in records.values())


def output_gradients(
    output: torch.Tensor, records: dict[str, Record], column: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``Jᵀ column`` at every recorded layer output (zeros where a layer does not matter)."""
    targets = [record.outputs[0] for record in records.values()]
    grads = torch.autograd.grad(output, targets, column, retain_graph=True, allow_unused=True)
    return {
        name: torch.zeros_like(target) if grad is None else grad
        for (name, target), grad in zip(zip(records, targets, strict=True), grads, strict=True)
    }


def unfold_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches (n, C_in·k, L) of a Conv1d/Conv2d input, in the weight's (C_in, k...) order."""
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride = (1, *module.kernel_size), (1, *module.stride)
        dilation = (1, *module.dilation)
        padding = module.padding if isinstance(module.padding, str) else (0, *module.padding)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        padding = module.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        pad = []
        for t in reversed(total):
            pad += [t // 2, t - t // 2]
        x, padding = F.pad(x, pad), (0, 0)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)


def layer_inputs(layer: Layer, x: torch.Tensor) -> list[torch.Tensor]:
    """Augmented inputs (n, R, d_in) per group; for Embedding the indices (n, R)."""
    module, n = layer.module, x.shape[0]
    if isinstance(module, nn.Embedding):
        return [x.reshape(n, -1)]
    if isinstance(module, nn.Linear):
        features = [x.reshape(n, -1, x.shape[-1])]
    else:
        patches = unfold_patches(module, x).transpose(1, 2)  # (n, L, C_in·k)
        features = list(patches.chunk(layer.groups, dim=2))
    if layer.weight is None:
        features = [f[..., :0] for f in features]
    if layer.bias is not None:
        features = [torch.cat([f, f.new_ones(*f.shape[:-1], 1)], dim=-1) for f in features]
    return features


def layer_grads(layer: Layer, grad: torch.Tensor) -> list[torch.Tensor]:
    """Output gradients (n, R, d_out) per group."""
    module, n = layer.module, grad.shape[0]
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return [grad.reshape(n, -1, grad.shape[-1])]
    flat = grad.reshape(n, grad.shape[1], -1).transpose(1, 2)  # (n, L, C_out)
    return list(flat.chunk(layer.groups, dim=2))


def embedding_counts(layer: Layer, indices: torch.Tensor) -> torch.Tensor:
    """``Σ_{n,r} onehot(index)`` / R: the diagonal of the Embedding input factor (padding 0)."""
    module = layer.module
    flat = indices.reshape(-1)
    weights = torch.full(flat.shape, 1.0 / indices.shape[1], dtype=module.weight.dtype)
    weights = weights.to(flat.device)
    if module.padding_idx is not None:
        weights = weights.masked_fill(flat == module.padding_idx, 0.0)
    counts = torch.zeros(module.num_embeddings, dtype=weights.dtype, device=weights.device)
    return counts.index_add_(0, flat, weights)


def norm_example_grads(layer: Layer, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """Per-example gradients (n, *param shape) of the selected affine params of a norm layer."""
    module, n = layer.module, x.shape[0]
    if isinstance(module, nn.LayerNorm):
        dims = len(module.normalized_shape)
        normed = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        reduce = tuple(range(1, x.ndim - dims))
    else:  # BatchNorm with running statistics (eval mode)
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = module.running_mean.reshape(shape)
        normed = (x - mean) / torch.sqrt(module.running_var.reshape(shape) + module.eps)
        reduce = (0, *range(2, x.ndim))[1:]
    out = []
    if layer.weight is not None:
        out.append((grad * normed).sum(dim=reduce) if reduce else grad * normed)
    if layer.bias is not None:
        out.append(grad.sum(dim=reduce) if reduce else grad)
    return [piece.reshape(n, -1) for piece in out]


def positions(layer: Layer, features: torch.Tensor) -> int:
    """R, the number of positions that share the layer's weight."""
    return math.prod(features.shape[1:-1]) if not isinstance(layer.module, nn.Embedding) else 1
