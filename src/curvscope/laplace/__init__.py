"""The Laplace approximation of a trained network: posterior, evidence, predictive, samples.

An application of the operators: the curvature comes from ``GGNOperator`` (dense, diagonal or
top eigenpairs), ``KFACOperator`` or any curvscope operator; this package adds only the
likelihood, the evidence and the predictive.
"""

from .approximation import LaplaceApproximation

__all__ = ["LaplaceApproximation"]
