"""Second-order training: Hessian-free optimisation and a KFAC preconditioner.

Applications of the operators: ``HessianFree`` steps with damped CG on the GGN or Hessian of a
batch; ``KFACPreconditioner`` replaces gradients by ``(K + λI)⁻¹ g`` inside an ordinary
``torch.optim`` loop.
"""

from .hessian_free import HessianFree, StepResult
from .kfac import KFACPreconditioner

__all__ = ["HessianFree", "KFACPreconditioner", "StepResult"]
