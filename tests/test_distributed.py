"""Two gloo processes on the CPU, each with its shard, give the single-process operators."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import dict_input, full_batch, mlp
from torch.utils.data import DataLoader, Dataset, TensorDataset

import curvscope

WORLD_SIZE = 2


def _setups():
    """(name, operator class, case, data before sharding): uneven and empty shards included."""
    case, other = mlp(), dict_input()
    x, y = full_batch(case.data)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 11 examples: 6 and 5 per rank
    return [
        ("hessian_batches", curvscope.HessianOperator, case, case.data),  # batches 0, 2 | 1
        ("ggn_loader", curvscope.GGNOperator, case, loader),
        ("fisher_dataset", curvscope.FisherOperator, case, TensorDataset(x, y)),
        ("hessian_one_batch", curvscope.HessianOperator, other, full_batch(other.data)),
        ("ggn_empty_shard", curvscope.GGNOperator, case, case.data[:1]),  # rank 1 holds nothing
        ("kfac_batches", curvscope.KFACOperator, case, case.data),
        ("ekfac_empty_shard", curvscope.EKFACOperator, case, case.data[:1]),
        ("ggn_diagonal_loader", curvscope.GGNDiagonalOperator, case, loader),
    ]


def _results(cls, case, data):
    if isinstance(data, Dataset):  # a (sharded) dataset: batches of 3
        data = DataLoader(data, batch_size=3)
    op = cls(case.model, case.loss_fn, data)
    block = torch.linspace(-1, 1, 2 * op.shape[0], dtype=torch.float64).reshape(-1, 2)
    value, gradient = op.gradient()
    return {
        "product": op.matmat(block),
        "num_examples": op.num_examples,
        "loss": value,
        "gradient": gradient,
        "shifted_loss": op.loss(0.1 * block[:, 0]),
    }


def _worker(rank, port, out_dir):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        results = {"main": curvscope.is_main_process()}
        for name, cls, case, data in _setups():
            results[name] = _results(cls, case, curvscope.shard(data))
        case = mlp()
        x, y = case.data[rank]
        bad = [(x, y if rank == 0 else y[:, None].double())]  # targets that do not fit on rank 1
        try:
            curvscope.HessianOperator(case.model, case.loss_fn, bad).num_examples
        except ValueError as err:
            results["error"] = str(err)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        time.sleep(0.1)  # let gloo's threads free their tensors (see shutdown_distributed)
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join_and_leave(rank, port, out_dir, other_port):
    """init_distributed joins the group the environment names; shutdown_distributed leaves only
    a group that init_distributed created."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    joined = curvscope.init_distributed()
    total = curvscope.operators.distributed.all_reduce_sum(torch.tensor([rank + 1.0]))
    curvscope.shutdown_distributed()
    left = not dist.is_initialized()
    own = f"tcp://127.0.0.1:{other_port}"  # the caller's own group, on a fresh port
    dist.init_process_group("gloo", init_method=own, rank=rank, world_size=2)
    curvscope.shutdown_distributed()
    kept = dist.is_initialized()
    time.sleep(0.1)
    dist.destroy_process_group()
    torch.save({"joined": joined, "total": total, "left": left, "kept": kept}, f"{out_dir}/{rank}")


def _run_ranks(out_dir, timeout=90.0, worker=_worker, extra=()):
    context = mp.start_processes(
        worker,
        args=(_free_port(), str(out_dir), *extra),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} gloo processes did not finish in {timeout} s")


def test_two_processes_match_single_process(tmp_path):
    _run_ranks(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert [r["main"] for r in ranks] == [True, False]
    assert "set-up failed on another process (this is on rank 0 of 2)" in ranks[0]["error"]
    assert "loss_fn(output, targets) failed on batch 0" in ranks[1]["error"]
    for name, cls, case, data in _setups():
        expected = _results(cls, case, data)
        for rank in ranks:
            got = rank[name]
            assert got["num_examples"] == expected["num_examples"], name
            for key in ("product", "gradient"):
                torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-10)
            for key in ("loss", "shifted_loss"):
                assert abs(got[key] - expected[key]) <= 1e-10 * max(1.0, abs(expected[key]))


def test_init_and_shutdown_distributed(tmp_path):
    _run_ranks(tmp_path, worker=_join_and_leave, extra=(_free_port(),))
    ranks = [torch.load(tmp_path / str(r)) for r in range(WORLD_SIZE)]
    assert [r["joined"] for r in ranks] == [(0, 2), (1, 2)]
    assert [r["total"].item() for r in ranks] == [3.0, 3.0]
    assert all(r["left"] and r["kept"] for r in ranks)


def test_shard_without_distributed_returns_input_unchanged():
    case = mlp()
    assert curvscope.shard(case.data) is case.data
    assert curvscope.is_main_process()


def test_shard_splits_every_kind_of_data(monkeypatch):
    from curvscope.operators import distributed

    case = mlp()
    x, y = full_batch(case.data)
    pieces = {}
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank_and_world_size", lambda r=rank: (r, 3))
        pieces[rank] = {
            "list": curvscope.shard(case.data),
            "batch": curvscope.shard((x, y)),
            "dataset": curvscope.shard(TensorDataset(x, y)),
            "loader": curvscope.shard(DataLoader(TensorDataset(x, y), batch_size=2)),
        }
    assert [len(p["list"]) for p in pieces.values()] == [1, 1, 1]
    assert [p["batch"][0].shape[0] for p in pieces.values()] == [4, 4, 3]
    torch.testing.assert_close(torch.cat([p["batch"][0] for p in pieces.values()]), x)
    assert [len(p["dataset"]) for p in pieces.values()] == [4, 4, 3]
    assert [len(p["loader"].dataset) for p in pieces.values()] == [4, 4, 3]
    assert pieces[0]["loader"].batch_size == 2
    with pytest.raises(ValueError, match=r"shard\(dataset_or_loader=...\).*shuffle=False"):
        curvscope.shard(DataLoader(TensorDataset(x, y), batch_size=2, shuffle=True))
    with pytest.raises(TypeError, match=r"shard\(dataset_or_loader=...\).*Dataset"):
        curvscope.shard(iter(case.data))
