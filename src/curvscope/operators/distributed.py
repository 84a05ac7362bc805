"""The distributed layer: sharding data across processes and summing results over them.

When ``torch.distributed`` is initialised (e.g. by ``torchrun``), each process holds its own
shard of the data; an operator sums its local, weighted per-batch results and combines them with
one ``all_reduce`` per product. Nothing here does anything when it is not initialised.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from .._checks import type_error, value_error
from .data import is_single_batch, slice_examples


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True when ``torch.distributed`` is not initialised, or this process has rank 0.

    Returns:
        Whether this process should write files, print, or show progress.

    Example:
        >>> import curvscope
        >>> curvscope.is_main_process()
        True
    """
    return rank_and_world_size()[0] == 0


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes, if any; returns ``(rank, world_size)``.

    Does nothing when the group is already initialised or when the environment names no group
    (``WORLD_SIZE`` unset or 1). The backend defaults to ``"nccl"`` where CUDA is available and
    ``"gloo"`` otherwise.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or None (choose as above).

    Returns:
        This process's rank and the number of processes; ``(0, 1)`` outside ``torchrun``.

    Example:
        >>> import curvscope
        >>> curvscope.init_distributed()  # not under torchrun: nothing to join
        (0, 1)
    """
    if backend is not None and backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise value_error(
            "init_distributed", "backend", "'gloo', 'nccl' or None", backend, "Pass backend=None."
        )
    if not is_distributed() and dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        _JOINED.append(dist.group.WORLD)
        # leave the group before the interpreter shuts down (see shutdown_distributed)
        atexit.register(shutdown_distributed)
    return rank_and_world_size()


_JOINED: list[Any] = []  # the process group init_distributed created, if any
_SETTLE_SECONDS = 0.1  # see shutdown_distributed


def shutdown_distributed() -> None:
    """Leave the process group that :func:`init_distributed` joined (a no-op otherwise).

    Call it once this process has done its last collective operation, e.g. at the end of a
    script run under ``torchrun``; it also runs when the interpreter exits. A group that the
    caller initialised itself is left alone.

    Example:
        >>> import curvscope
        >>> curvscope.shutdown_distributed()  # nothing was joined: nothing to leave
    """
    if _JOINED and is_distributed() and dist.group.WORLD is _JOINED[0]:
        # After an all-reduce has returned, gloo's worker thread still frees the tensors it
        # held, which needs the GIL; a process that exits before that aborts ("terminate called
        # without an active exception"). Sleeping hands it the GIL.
        time.sleep(_SETTLE_SECONDS)
        dist.destroy_process_group()
    _JOINED.clear()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all processes (no-op when not distributed); returns it."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _block(length: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(length)`` that ``rank`` holds (sizes differ by <= 1)."""
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _shard_loader(loader: DataLoader, rank: int, world: int) -> DataLoader:
    func = "shard"
    if isinstance(loader.sampler, RandomSampler):
        raise value_error(
            func,
            "dataset_or_loader",
            "a DataLoader that does not shuffle",
            loader,
            "Curvature products need the same data every pass: use DataLoader(shuffle=False).",
        )
    if loader.batch_size is None or not isinstance(loader.sampler, SequentialSampler):
        raise value_error(
            func,
            "dataset_or_loader",
            "a DataLoader with a batch_size and the default sequential sampler",
            loader,
            "Shard the dataset instead: DataLoader(curvscope.shard(dataset), batch_size=...).",
        )
    subset = Subset(loader.dataset, list(_block(len(loader.dataset), rank, world)))
    return DataLoader(
        subset,
        batch_size=loader.batch_size,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def shard(dataset_or_loader: Any) -> Any:
    """This process's deterministic shard of a dataset, a DataLoader, a list of batches or a batch.

    With ``torch.distributed`` initialised on ``W`` processes, rank ``r`` gets:

    - a ``Dataset`` (with ``len``): a ``Subset`` holding the ``r``-th of ``W`` contiguous blocks;
    - a ``DataLoader`` (no shuffling): the same loader over the ``r``-th block of its dataset;
    - a single ``(inputs, targets)`` batch: the ``r``-th block of its examples;
    - a list or tuple of batches: batches ``r, r + W, r + 2W, ...``.

    Blocks differ in size by at most one, and a rank may get nothing when there is little data.
    Without ``torch.distributed`` the input comes back unchanged. Every example lands on exactly
    one rank, so an operator built on each rank's shard equals the one on the whole data.

    Args:
        dataset_or_loader: a Dataset, DataLoader, list of batches, or one batch.

    Returns:
        This rank's part, of the same kind as the input.

    Example:
        >>> import torch, curvscope
        >>> x, y = torch.arange(6.0)[:, None], torch.zeros(6)
        >>> curvscope.shard((x, y))[0].shape  # not distributed: everything
        torch.Size([6, 1])
    """
    rank, world = rank_and_world_size()
    if world == 1:
        return dataset_or_loader
    data = dataset_or_loader
    if isinstance(data, DataLoader):
        return _shard_loader(data, rank, world)
    if is_single_batch(data):
        size = data[1].shape[0]
        block = _block(size, rank, world)
        return type(data)(slice_examples(list(data), block.start, block.stop))
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return Subset(data, list(_block(len(data), rank, world)))
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes, Mapping)):
        part = data[rank::world]
        return type(data)(part) if isinstance(data, (list, tuple)) else part
    raise type_error(
        "shard",
        "dataset_or_loader",
        "a Dataset with len(), a DataLoader, a list of batches or one (inputs, targets) batch",
        data,
        "Materialise the batches in a list, or wrap the data in a torch Dataset.",
    )
