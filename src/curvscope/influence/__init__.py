"""Influence functions on curvscope's curvature operators: which training examples made a
prediction, and which look mislabelled."""

from .function import InfluenceFunction, InfluenceTop
from .solvers import SolveStatus

__all__ = ["InfluenceFunction", "InfluenceTop", "SolveStatus"]
