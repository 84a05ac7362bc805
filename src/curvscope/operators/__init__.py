"""Curvature of a model over a dataset as linear operators, and the data/distributed layer."""

from ._inputs import TrainModeWarning
from .base import DenseOperator, LinearOperator
from .block_diagonal import BlockDiagonalOperator
from .distributed import init_distributed, is_main_process, shard, shutdown_distributed
from .ekfac import EKFACOperator
from .fisher import FisherOperator
from .ggn import GGNOperator
from .ggn_diagonal import GGNDiagonalOperator
from .hessian import HessianOperator
from .kfac import KFACOperator

__all__ = [
    "BlockDiagonalOperator",
    "DenseOperator",
    "EKFACOperator",
    "FisherOperator",
    "GGNDiagonalOperator",
    "GGNOperator",
    "HessianOperator",
    "KFACOperator",
    "LinearOperator",
    "TrainModeWarning",
    "init_distributed",
    "is_main_process",
    "shard",
    "shutdown_distributed",
]
