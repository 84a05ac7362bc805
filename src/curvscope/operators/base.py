"""The one operator interface, and the dense operator.

Every curvature operator is a symmetric linear map on the flattened parameters, of shape (P, P).
It offers the same small surface: ``shape``, ``dtype``, ``device``, ``param_names``,
``param_shapes``, ``num_matvecs``, ``op @ v``, ``matvec``, ``matmat``, ``to_dense`` and
``to_scipy``. A concrete operator implements only ``_matmat`` on a (P, k) block of vectors;
validation, dict <-> flat conversion, and the product count live here, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse.linalg
import torch

from .._checks import check_dtype_and_device, check_int, describe, type_error, value_error
from ..derivatives.tree import split_flat

#: ``to_dense`` refuses to build a matrix larger than this many entries unless told otherwise.
DEFAULT_MAX_DENSE_ENTRIES = 10_000 * 10_000


def split_by_shapes(
    flat: torch.Tensor, shapes: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Split a flat tensor into a dict name -> tensor of the given shapes, in order."""
    return dict(zip(shapes, split_flat(flat, list(shapes.values())), strict=True))


class LinearOperator:
    """A symmetric (P, P) linear operator on flattened parameters.

    Subclasses set ``self._param_shapes`` (an ordered mapping name -> shape, whose numels add up
    to P), ``self._dtype`` and ``self._device`` in ``__init__`` and implement ``_matmat``.

    Vectors are either flat tensors of shape (P,) or dicts name -> tensor shaped like the
    parameters; the result of a product has the same form as its input.
    """

    _param_shapes: dict[str, torch.Size]
    _dtype: torch.dtype
    _device: torch.device
    _num_matvecs: int = 0

    # -- the one thing a subclass implements -------------------------------------------------
    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """Return ``A @ matrix`` for ``matrix`` of shape (P, k), already validated."""
        raise NotImplementedError

    # -- properties ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        size = sum(math.prod(s) for s in self._param_shapes.values())
        return (size, size)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def param_names(self) -> list[str]:
        return list(self._param_shapes)

    @property
    def param_shapes(self) -> dict[str, torch.Size]:
        return dict(self._param_shapes)

    @property
    def num_matvecs(self) -> int:
        """Running count of matrix-vector products computed by this operator."""
        return self._num_matvecs

    @property
    def is_symmetric(self) -> bool:
        return True

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"device={self.device}, num_matvecs={self.num_matvecs})"
        )

    # -- products -----------------------------------------------------------------------------
    def matvec(self, vector: torch.Tensor | Mapping[str, torch.Tensor]) -> Any:
        """``A v`` for a flat vector of shape (P,) or a dict name -> tensor (same form back)."""
        name = f"{type(self).__name__}.matvec"
        if isinstance(vector, Mapping):
            flat = self.flatten_dict(vector, func=name, arg="v")
            return self.unflatten(self._count(flat[:, None])[:, 0])
        flat = self._check_tensor(vector, name, "v", ndim=1)
        return self._count(flat[:, None])[:, 0]

    def matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        """``A V`` for ``V`` of shape (P, k)."""
        matrix = self._check_tensor(matrix, f"{type(self).__name__}.matmat", "V", ndim=2)
        return self._count(matrix)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, torch.Tensor) and other.ndim == 2:
            return self.matmat(other)
        return self.matvec(other)

    def _count(self, matrix: torch.Tensor) -> torch.Tensor:
        if matrix.shape[1] == 0:
            return matrix.clone()
        result = self._matmat(matrix)
        self._num_matvecs += matrix.shape[1]
        return result

    # -- conversions --------------------------------------------------------------------------
    def to_dense(self, *, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> torch.Tensor:
        """The (P, P) matrix, built from P products with the identity.

        Refuses, saying how much memory it would need, when P * P exceeds ``max_entries``.
        """
        check_int(f"{type(self).__name__}.to_dense", "max_entries", max_entries, minimum=1)
        size = self.shape[0]
        if size * size > max_entries:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            gib = size * size * itemsize / 2**30
            raise ValueError(
                f"curvscope.{type(self).__name__}.to_dense(max_entries=...): the dense matrix "
                f"would have {size}x{size} = {size * size:,} entries ({gib:.2f} GiB in "
                f"{self.dtype}), more than max_entries={max_entries:,}. Pass a larger "
                "max_entries if you have the memory, or use products and estimators instead."
            )
        eye = torch.eye(size, dtype=self.dtype, device=self.device)
        return self.matmat(eye)

    def to_scipy(self) -> scipy.sparse.linalg.LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` on float64 numpy arrays."""

        def matmat(array: np.ndarray) -> np.ndarray:
            array = np.asarray(array, dtype=np.float64)
            vector = array.ndim == 1
            block = torch.as_tensor(array.reshape(self.shape[0], -1))
            result = self.matmat(block.to(dtype=self.dtype, device=self.device))
            result = result.detach().to(device="cpu", dtype=torch.float64).numpy()
            return result[:, 0] if vector else result

        return scipy.sparse.linalg.LinearOperator(
            shape=self.shape, matvec=matmat, rmatvec=matmat, matmat=matmat, dtype=np.float64
        )

    # -- dict <-> flat ------------------------------------------------------------------------
    def flatten_dict(
        self, vector: Mapping[str, torch.Tensor], *, func: str = "flatten_dict", arg: str = "v"
    ) -> torch.Tensor:
        """Concatenate a dict name -> tensor into a flat (P,) tensor in ``param_names`` order."""
        expected_keys = set(self._param_shapes)
        if set(vector) != expected_keys:
            missing = sorted(expected_keys - set(vector))
            unexpected = sorted(set(vector) - expected_keys)
            raise value_error(
                func,
                arg,
                f"a dict with exactly the keys {self.param_names}",
                vector,
                f"Missing keys: {missing}; unexpected keys: {unexpected}.",
            )
        pieces = []
        for key, shape in self._param_shapes.items():
            value = vector[key]
            self._check_tensor(value, func, f"{arg}[{key!r}]", shape=shape)
            pieces.append(value.reshape(-1))
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=self.dtype)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat (P,) tensor into a dict name -> tensor shaped like the parameters."""
        return split_by_shapes(flat, self._param_shapes)

    def _check_tensor(
        self,
        value: Any,
        func: str,
        arg: str,
        *,
        ndim: int | None = None,
        shape: torch.Size | tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        size = self.shape[0]
        if ndim == 1:
            shape, expected = (size,), f"a flat tensor of shape ({size},) or a dict of tensors"
        elif ndim == 2:
            expected = f"a tensor of shape ({size}, k)"
        else:
            expected = f"a tensor of shape {tuple(shape)}"
        if not isinstance(value, torch.Tensor):
            raise type_error(func, arg, expected, value)
        bad_shape = (ndim == 2 and (value.ndim != 2 or value.shape[0] != size)) or (
            shape is not None and tuple(value.shape) != tuple(shape)
        )
        if bad_shape:
            raise value_error(
                func, arg, expected, value, "Flatten vectors in the order of op.param_names."
            )
        check_dtype_and_device(func, arg, value, self.dtype, self.device)
        return value


class DenseOperator(LinearOperator):
    """An explicit symmetric matrix with the operator interface, for tests and small problems.

    Args:
        matrix: a square, symmetric tensor of shape (P, P).
        check_symmetric: verify symmetry to a relative tolerance (default True).

    Example:
        >>> import torch, curvscope
        >>> op = curvscope.DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 6.0]]))
        >>> op @ torch.tensor([1.0, 0.5])
        tensor([2.5000, 4.0000])
    """

    def __init__(self, matrix: torch.Tensor, *, check_symmetric: bool = True) -> None:
        func = "DenseOperator"
        if not isinstance(matrix, torch.Tensor):
            raise type_error(
                func, "matrix", "a square torch.Tensor", matrix, "Pass torch.as_tensor(matrix)."
            )
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise value_error(func, "matrix", "a square 2-D tensor of shape (P, P)", matrix)
        if not matrix.is_floating_point():
            raise type_error(
                func, "matrix", "a floating-point tensor", matrix, "Cast it with .double()."
            )
        if check_symmetric and matrix.numel() > 0:
            scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
            asym = (matrix - matrix.T).abs().max() / scale
            if asym > 100 * torch.finfo(matrix.dtype).eps:
                raise ValueError(
                    f"curvscope.DenseOperator(matrix=...): expected a symmetric matrix, got one "
                    f"with relative asymmetry {asym.item():.3g}. Pass (matrix + matrix.T) / 2, "
                    "or check_symmetric=False if you know what you are doing."
                )
        self._matrix = matrix
        self._param_shapes = {"matrix": torch.Size([matrix.shape[0]])}
        self._dtype = matrix.dtype
        self._device = matrix.device
        self._num_matvecs = 0

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._matrix @ matrix

    def to_dense(self, *, max_entries: int = DEFAULT_MAX_DENSE_ENTRIES) -> torch.Tensor:
        """The wrapped matrix itself (a copy); counts no products."""
        return self._matrix.clone()


def as_operator(value: Any, func: str, arg: str = "op") -> LinearOperator:
    """Validate that ``value`` offers the operator interface; wrap a square tensor."""
    if isinstance(value, LinearOperator):
        return value
    needed = ("shape", "dtype", "device", "matmat")
    if all(hasattr(value, name) for name in needed):
        shape = tuple(value.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise value_error(func, arg, "a square operator of shape (P, P)", value)
        return value
    if isinstance(value, torch.Tensor):
        raise type_error(
            func,
            arg,
            "a curvscope operator",
            value,
            "Wrap an explicit matrix with curvscope.DenseOperator(matrix).",
        )
    raise TypeError(
        f"curvscope.{func}({arg}=...): expected a curvscope operator (HessianOperator, "
        f"GGNOperator, FisherOperator, DenseOperator, or an object with shape, dtype, device and "
        f"matmat), got {describe(value)}."
    )
