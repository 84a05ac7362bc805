"""Curvature of a model over a dataset as linear operators, and the data/distributed layer."""

from ._inputs import TrainModeWarning
from .base import DenseOperator, LinearOperator
from .distributed import init_distributed, is_main_process, shard
from .fisher import FisherOperator
from .ggn import GGNOperator
from .hessian import HessianOperator

__all__ = [
    "DenseOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "TrainModeWarning",
    "init_distributed",
    "is_main_process",
    "shard",
]
