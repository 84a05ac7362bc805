"""Issue 3: time per Hessian product on the digits MLP with 1 and 2 processes (gloo, spawn)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curvscope

from . import models
from .harness import Config, Table, ms

PRODUCTS = 20


def _time_products(op, v: torch.Tensor, count: int) -> tuple[float, torch.Tensor]:
    result = op.matvec(v)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        result = op.matvec(v)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _worker(rank: int, world: int, store: str, out: str, count: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    problem = models.digits(batch_size=256)
    op = curvscope.HessianOperator(problem.model, problem.loss_fn, curvscope.shard(problem.batches))
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    median, result = _time_products(op, v, count)
    if rank == 0:
        torch.save({"median": median, "result": result}, out)
    dist.destroy_process_group()


def distributed_case(cfg: Config) -> list[Table]:
    table = Table(
        "Hessian product on the digits MLP (all 1,797 examples, batches of 256) with 1 and 2 "
        "processes (gloo on CPU, torch.multiprocessing.spawn, curvscope.shard)",
        [
            "setting",
            "threads per process",
            "time per product (ms)",
            "speed-up vs 1 process, 1 thread",
            "max abs diff to 1 process",
        ],
    )
    count = cfg.n(PRODUCTS, 3)
    problem = models.digits(batch_size=256)
    op = curvscope.HessianOperator(problem.model, problem.loss_fn, problem.batches)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    results = {}
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        results[(1, n_threads)] = _time_products(op, v, count)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        store, out = os.path.join(tmp, "store"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, store, out, count), nprocs=2, join=True)
        saved = torch.load(out)
        results[(2, 1)] = (saved["median"], saved["result"])
    base_time, base_result = results[(1, 1)]
    for (procs, n_threads), (median, result) in results.items():
        diff = float((result - base_result).abs().max())
        table.add(f"{procs} process(es)", n_threads, ms(median), base_time / median, diff)
    table.notes.append(
        f"{count} products each, after one warm-up; the machine has {os.cpu_count()} cores, so "
        "2 processes x 1 thread use the same cores as 1 process x 2 threads."
    )
    return [table]
