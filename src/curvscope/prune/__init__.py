"""Second-order pruning: magnitude, OBD, OBS (dense, block-diagonal, KFAC, diagonal curvature)
and layer-wise OBS (Optimal Brain Compression / SparseGPT), one call: :func:`prune`; and
:func:`prune_sweep`, accuracy and loss against sparsity for several methods.

An application on the public operators: it carries no curvature code of its own.
"""

from .pruning import prune
from .result import PruneResult, Sparsity
from .sweep import PruneSweep, SweepPoint, prune_sweep

__all__ = ["PruneResult", "PruneSweep", "Sparsity", "SweepPoint", "prune", "prune_sweep"]
