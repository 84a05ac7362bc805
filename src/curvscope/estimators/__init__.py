"""Spectral estimators with honest errors: eigenvalues, trace, diagonal, density, norm, solve.

Every estimator takes any operator with the operator interface, is deterministic for a given
``seed`` (an integer or a ``torch.Generator``; the global RNG is never touched), never mutates
the operator, counts its own products in ``num_matvecs``, and returns a frozen result with a
JSON-ready ``to_dict()``.
"""

from .density import SpectralDensity, spectral_density
from .diagonal import DiagonalEstimate, diagonal
from .eigenvalues import EigenResult, eigenvalues
from .frobenius import FrobeniusNormEstimate, frobenius_norm
from .solve import SolveResult, solve
from .trace import TraceEstimate, trace

__all__ = [
    "DiagonalEstimate",
    "EigenResult",
    "FrobeniusNormEstimate",
    "SolveResult",
    "SpectralDensity",
    "TraceEstimate",
    "diagonal",
    "eigenvalues",
    "frobenius_norm",
    "solve",
    "spectral_density",
    "trace",
]
