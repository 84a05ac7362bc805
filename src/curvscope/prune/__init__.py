"""Second-order pruning: magnitude, OBD, OBS (dense, block-diagonal, KFAC, diagonal curvature)
and layer-wise OBS (Optimal Brain Compression / SparseGPT), one call: :func:`prune`.

An application on the public operators: it carries no curvature code of its own.
"""

from .pruning import prune
from .result import PruneResult, Sparsity

__all__ = ["PruneResult", "Sparsity", "prune"]
