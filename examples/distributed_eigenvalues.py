"""Top Hessian eigenvalues of the digits MLP on one process or many.

Run as `python examples/distributed_eigenvalues.py`, or on two processes with
`torchrun --nproc_per_node=2 examples/distributed_eigenvalues.py`: every rank holds its shard of
the data, every product is combined with one all-reduce, and the answer is the same.
"""

import torch
from torch.utils.data import DataLoader, TensorDataset

import curvscope
from curvscope.report.digits import train_digits_mlp

curvscope.init_distributed()  # joins the group torchrun describes; a no-op otherwise
model, x, y = train_digits_mlp(steps=50)
loader = DataLoader(TensorDataset(x, y), batch_size=256)  # no shuffling
op = curvscope.HessianOperator(model, torch.nn.CrossEntropyLoss(), curvscope.shard(loader))
top = curvscope.eigenvalues(op, k=3, seed=0)  # the same on every rank
if curvscope.is_main_process():  # print and write on rank 0 only
    print(f"{op.num_examples} examples, top eigenvalues {top.values.tolist()}")
curvscope.shutdown_distributed()  # leave the group (also done at exit)
