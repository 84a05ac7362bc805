"""curvscope.derivatives: exact derivatives of functions of tensors, built on ``torch.func``.

Products (``jvp``, ``vjp``, ``hvp``), dense matrices (``jacobian``, ``hessian`` and their batched
forms), the exact ``hessian_diagonal``, higher-order ``derivative`` and ``flatten``. Inputs are a
Tensor, or a tuple or dict of Tensors; results come back in the matching structure.

Inputs and outputs of ``f`` are real floating-point Tensors: a complex or integer output (e.g.
``torch.fft.rfft``, ``argmax``) is refused with a TypeError in every mode, as reverse mode would
keep only the real part; split complex numbers with ``torch.view_as_real``. Every function works
under ``torch.no_grad()`` and ``torch.inference_mode()``: ``torch.func`` records its own graphs.
"""

from .hessians import batch_hessian, hessian, hessian_diagonal
from .jacobians import batch_jacobian, jacobian
from .products import hvp, jvp, vjp
from .taylor import derivative
from .tree import flatten

__all__ = [
    "batch_hessian",
    "batch_jacobian",
    "derivative",
    "flatten",
    "hessian",
    "hessian_diagonal",
    "hvp",
    "jacobian",
    "jvp",
    "vjp",
]
