"""curvscope: everything beyond the gradient in PyTorch.

Layers point one way: ``derivatives`` (functions of tensors) <- ``operators`` (curvature of a
model over a dataset, and the data/distributed layer) <- ``estimators`` (eigenvalues, trace,
diagonal, density, solve) <- applications (``influence``, ``laplace``, ``prune``, ``optim``,
tracking) <- ``report`` (analysis, plots, HTML) <- ``cli``.

The public surface is what this module exports.
"""

from . import (
    derivatives,
    estimators,
    laplace,
    operators,
    optim,  # noqa: F401  (curvscope.optim: HessianFree, KFACPreconditioner)
    report,
)
from .derivatives import *  # noqa: F403
from .estimators import *  # noqa: F403
from .influence import InfluenceFunction, InfluenceTop
from .laplace import *  # noqa: F403
from .operators import *  # noqa: F403
from .prune import PruneResult, PruneSweep, Sparsity, SweepPoint, prune, prune_sweep
from .report import *  # noqa: F403
from .tracking import SharpnessRecord, SharpnessTracker

__version__ = "0.1.0"

__all__ = [
    *derivatives.__all__,
    *operators.__all__,
    *estimators.__all__,
    *laplace.__all__,
    "PruneResult",
    "PruneSweep",
    "Sparsity",
    "SweepPoint",
    "prune",
    "prune_sweep",
    *report.__all__,
    "InfluenceFunction",
    "InfluenceTop",
    "SharpnessRecord",
    "SharpnessTracker",
]
