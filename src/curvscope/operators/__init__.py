"""Curvature of a model over a dataset as linear operators, and the data/distributed layer."""

from .base import DenseOperator, LinearOperator

__all__ = ["DenseOperator", "LinearOperator"]
