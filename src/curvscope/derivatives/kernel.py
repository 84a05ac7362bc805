"""The one product kernel of the curvature operators: HVP, JVP, VJP and the GGN product.

Every function here differentiates with respect to ``inputs``, a list of tensors that autograd
tracks (typically a model's own parameters), with ``torch.autograd.grad``: nothing is written to
``.grad`` and the model runs as plain PyTorch runs it (fused kernels included). Blocks of k
vectors are lists of tensors shaped ``(k, *input.shape)``; ``batched`` chooses between one
vmapped backward pass over the k vectors (``is_grads_batched``) and a loop over them on the
retained graph. Forward mode (``"forward-over-reverse"``) is used only when asked for: it needs
``f`` to accept substitute tensors (a functional call).

``mode`` means the same everywhere in curvscope:

- ``"reverse-over-reverse"``: differentiate ``∇L · v`` (Pearlmutter, 1994); no forward-mode AD.
- ``"forward-over-reverse"``: a JVP of the gradient (torch.func).
- ``"auto"``: reverse-over-reverse, measured the fastest on CPUs and GPUs for networks, and
  needing no forward-mode rule from any operation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.func
from torch.autograd import forward_ad

Tensors = Sequence[torch.Tensor]

MODES = ("auto", "forward-over-reverse", "reverse-over-reverse")


def resolve_mode(mode: str) -> str:
    """The mode a product runs in: "auto" is reverse-over-reverse."""
    return "reverse-over-reverse" if mode == "auto" else mode


def lacks_forward_ad(error: BaseException) -> bool:
    """Whether ``error`` says an operation has no forward-mode derivative."""
    if isinstance(error, NotImplementedError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("forward ad" in text or "forward-mode" in text)


def _grad(
    outputs: Sequence[torch.Tensor],
    inputs: Tensors,
    cotangents: Sequence[torch.Tensor | None] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    batched: bool = False,
    batch_shape: tuple[int, ...] = (),
) -> list[torch.Tensor]:
    """``torch.autograd.grad`` where unused inputs and constant outputs give zeros."""
    keep = [i for i, out in enumerate(outputs) if out.requires_grad]
    if not keep:
        return [x.new_zeros(batch_shape + x.shape) for x in inputs]
    grads = torch.autograd.grad(
        [outputs[i] for i in keep],
        list(inputs),
        None if cotangents is None else [cotangents[i] for i in keep],
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )
    return [
        x.new_zeros(batch_shape + x.shape) if g is None else g
        for g, x in zip(grads, inputs, strict=True)
    ]


def gradient(value: torch.Tensor, inputs: Tensors) -> list[torch.Tensor]:
    """``∇ value`` with respect to ``inputs`` (zeros where it does not depend on one)."""
    return _grad([value], inputs)


def _columns(
    outputs: Sequence[torch.Tensor], inputs: Tensors, block: Tensors, batched: bool
) -> list[torch.Tensor]:
    """``Jᵀ`` of ``outputs`` w.r.t. ``inputs`` applied to each of the k cotangents in ``block``
    (k, *output), vmapped or looped; the graph is kept for further use."""
    k = block[0].shape[0]
    if batched and k > 1:
        return _grad(outputs, inputs, block, retain_graph=True, batched=True, batch_shape=(k,))
    columns = [_grad(outputs, inputs, [b[j] for b in block], retain_graph=True) for j in range(k)]
    return [torch.stack(parts) for parts in zip(*columns, strict=True)]


def hvp(
    value: torch.Tensor, inputs: Tensors, block: Tensors, *, batched: bool = True
) -> list[torch.Tensor]:
    """``H V`` for the scalar ``value`` (with its graph) by reverse-over-reverse.

    ``g = ∇ value`` once (with a graph), then ``H v = ∇ (g · v)`` per column.

    Args:
        value: a scalar tensor computed from ``inputs``.
        inputs: the tensors to differentiate with respect to.
        block: per input, the k vectors stacked, shape (k, *input.shape).
        batched: vmap the k double-backward passes (else loop over them).

    Returns:
        Per input, ``(k, *input.shape)``.
    """
    grads = _grad([value], inputs, create_graph=True)
    return _columns(grads, inputs, block, batched)


def hvp_forward(
    loss: Callable[[list[torch.Tensor]], torch.Tensor], inputs: Tensors, block: Tensors
) -> list[torch.Tensor]:
    """``H V`` by forward-over-reverse (torch.func), ``loss`` a function of substitute tensors."""
    primals = [x.detach() for x in inputs]
    gradient_fn = torch.func.grad(lambda xs: loss(list(xs)))

    def column(*vs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.func.jvp(gradient_fn, (tuple(primals),), (vs,))[1])

    if block[0].shape[0] == 1:
        return [out.unsqueeze(0) for out in column(*(b[0] for b in block))]
    return list(torch.func.vmap(column)(*block))


def jvp_by_vjp(
    output: torch.Tensor, inputs: Tensors, block: Tensors, batched: bool
) -> torch.Tensor:
    """``J V`` (k, *output) from reverse mode only: the transpose of the VJP ``u -> Jᵀ u``,
    which is linear in ``u`` (the "double-VJP trick")."""
    dummy = torch.zeros_like(output, requires_grad=True)
    with torch.enable_grad():
        pulled = _grad([output], inputs, [dummy], create_graph=True, retain_graph=True)
        k = block[0].shape[0]
        if batched and k > 1:
            (jv,) = _grad(pulled, [dummy], block, retain_graph=True, batched=True, batch_shape=(k,))
            return jv
        rows = [_grad(pulled, [dummy], [b[j] for b in block], retain_graph=True) for j in range(k)]
        return torch.stack([row[0] for row in rows])


def jvp_dual(
    forward: Callable[[list[torch.Tensor]], torch.Tensor], inputs: Tensors, tangents: Tensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass with dual numbers: ``(f(inputs) with its graph w.r.t. inputs, J v)``.

    ``forward`` receives dual tensors in place of ``inputs`` (a functional call). Raises
    NotImplementedError (or a forward-AD RuntimeError) when an operation lacks forward mode.
    """
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(x, t) for x, t in zip(inputs, tangents, strict=True)]
        output, jv = forward_ad.unpack_dual(forward(duals))
    if jv is None:
        jv = torch.zeros_like(output)
    return output, jv


def output_hessian_matmat(
    loss_of_output: Callable[[torch.Tensor], torch.Tensor],
    output: torch.Tensor,
    block: torch.Tensor,
) -> torch.Tensor:
    """``(∂² loss/∂output²) U`` for a stack ``block`` (k, *output), by a double VJP on the
    output (no forward-mode rule needed); zero where the loss is linear in the output.

    Raises ValueError naming the loss when torch cannot differentiate its backward.
    """
    leaf = output.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss_of_output(leaf)
        try:
            (first,) = _grad([value], [leaf], create_graph=True)
            return _columns([first], [leaf], [block], batched=False)[0]
        except RuntimeError as err:
            if "derivative for" in str(err) and "not implemented" in str(err):
                raise NotTwiceDifferentiableError(str(err)) from err
            raise


class NotTwiceDifferentiableError(RuntimeError):
    """Torch has no derivative for the backward pass of an operation (its second derivative)."""


def ggn_matmat(
    output: torch.Tensor,
    inputs: Tensors,
    jv: torch.Tensor,
    output_matmat: Callable[[torch.Tensor], torch.Tensor],
    *,
    batched: bool,
) -> list[torch.Tensor]:
    """``Jᵀ M J V`` given the output (with its graph w.r.t. ``inputs``) and ``J V`` (k, *output).

    Returns, per input, ``(k, *input.shape)``.
    """
    mjv = output_matmat(jv.detach())
    return _columns([output], inputs, [mjv], batched)


def stack_block(matrix: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """A (P, k) block as per-input stacks (k, *shape) (one copy for k > 1, none for k = 1)."""
    from .tree import split_flat

    rows = matrix.T if matrix.shape[1] == 1 else matrix.T.contiguous()
    return split_flat(rows, shapes)


def unstack_block(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-input stacks (k, *shape) back to one (P, k) block."""
    k = parts[0].shape[0]
    return torch.cat([part.reshape(k, -1) for part in parts], dim=1).T
