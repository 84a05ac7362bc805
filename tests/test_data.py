"""The data layer: batch forms, batching independence, weighting, determinism and NaN checks."""

import pytest
import torch
from models import MODEL_CASES, case_id, cnn_batchnorm, dict_input, full_batch, mlp
from torch.utils.data import DataLoader, TensorDataset

import curvscope

OPERATORS = [curvscope.HessianOperator, curvscope.GGNOperator, curvscope.FisherOperator]
IDS = ["hessian", "ggn", "fisher"]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", OPERATORS, ids=IDS)
@pytest.mark.parametrize("make_case", MODEL_CASES, ids=case_id)
def test_independent_of_batching_and_max_batch_size(cls, make_case):
    case = make_case()
    reference = cls(case.model, case.loss_fn, full_batch(case.data)).to_dense()
    _close(cls(case.model, case.loss_fn, case.data).to_dense(), reference)
    micro = cls(case.model, case.loss_fn, case.data, max_batch_size=2)
    _close(micro.to_dense(), reference)
    assert micro.num_examples == full_batch(case.data)[1].shape[0]


def test_last_short_batch_counts_for_what_it_holds():
    case = mlp()  # batches of 4, 4 and 3 examples
    sizes = [t.shape[0] for _, t in case.data]
    per_batch = [
        curvscope.GGNOperator(case.model, case.loss_fn, batch).to_dense() for batch in case.data
    ]
    weighted = sum(n / sum(sizes) * g for n, g in zip(sizes, per_batch, strict=True))
    _close(curvscope.GGNOperator(case.model, case.loss_fn, case.data).to_dense(), weighted)
    naive = sum(per_batch) / len(per_batch)
    assert not torch.allclose(weighted, naive)


def test_dataloader_and_list_of_batches_agree():
    case = mlp()
    x, y = full_batch(case.data)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    op = curvscope.HessianOperator(case.model, case.loss_fn, loader)
    _close(op.to_dense(), curvscope.HessianOperator(case.model, case.loss_fn, case.data).to_dense())
    assert op.num_examples == 11


@pytest.mark.parametrize("cls", OPERATORS, ids=IDS)
def test_sum_reduction_is_n_times_mean(cls):
    case = mlp()
    mean = cls(case.model, torch.nn.CrossEntropyLoss(), case.data)
    total = cls(case.model, torch.nn.CrossEntropyLoss(reduction="sum"), case.data)
    _close(total.to_dense(), 11 * mean.to_dense())
    assert (mean.reduction, total.reduction) == ("mean", "sum")
    plain = cls(case.model, lambda o, t: torch.nn.functional.cross_entropy(o, t), case.data)
    _close(plain.to_dense(), mean.to_dense())


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.left, self.right = torch.nn.Linear(2, 2), torch.nn.Linear(3, 2)

    def forward(self, a, b):
        return torch.tanh(self.left(a)) * self.right(b)


def test_tuple_and_dict_inputs_are_unpacked():
    model = _TwoInputs().double()
    gen = torch.Generator().manual_seed(0)
    a, b, y = torch.randn(6, 2, generator=gen), torch.randn(6, 3, generator=gen), torch.randn(6, 2)
    loss_fn = torch.nn.MSELoss()
    as_tuple = curvscope.HessianOperator(model, loss_fn, [((a, b), y)]).to_dense()
    as_dict = curvscope.HessianOperator(model, loss_fn, [({"a": a, "b": b}, y)], max_batch_size=4)
    _close(as_dict.to_dense(), as_tuple)
    single = curvscope.HessianOperator(model, loss_fn, ((a, b), y), max_batch_size=5)
    _close(single.to_dense(), as_tuple)


def test_dict_input_case_micro_batches_every_dict_entry():
    case = dict_input()
    op = curvscope.GGNOperator(case.model, case.loss_fn, case.data, max_batch_size=1)
    _close(op.to_dense(), curvscope.GGNOperator(case.model, case.loss_fn, case.data).to_dense())


def test_progress_bar_runs_and_gives_the_same_result():
    case = mlp()
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data, progress=True)
    v = torch.ones(op.shape[0])
    plain = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    _close(op @ v, plain @ v)


def test_shuffled_dataloader_is_detected():
    case = mlp()
    x, y = full_batch(case.data)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    op = curvscope.HessianOperator(case.model, case.loss_fn, loader)
    with pytest.raises(ValueError, match=r"batch \d+ changed between two passes.*shuffle=False"):
        op @ torch.ones(op.shape[0])
    unchecked = curvscope.HessianOperator(
        case.model, case.loss_fn, loader, check_deterministic=False
    )
    assert unchecked.num_examples == 11


def test_dropout_in_train_mode_is_detected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    case = mlp()
    model = model.double().train()
    with pytest.raises(ValueError, match=r"output on batch 0 changed.*dropout.*eval_mode=True"):
        curvscope.GGNOperator(model, case.loss_fn, case.data, eval_mode=False).num_examples
    ok = curvscope.GGNOperator(model, case.loss_fn, case.data)  # eval mode: dropout is off
    assert ok.num_examples == 11 and model.training


def test_changing_number_of_batches_is_detected():
    class Growing:
        def __init__(self, batches):
            self.batches, self.passes = batches, 0

        def __iter__(self):
            self.passes += 1
            return iter(self.batches[: self.passes])

    case = mlp()
    op = curvscope.HessianOperator(case.model, case.loss_fn, Growing(case.data))
    with pytest.raises(ValueError, match=r"gave \d+ batches on one pass and \d+ on the next"):
        op.loss()


def test_nan_in_a_batch_names_the_batch():
    case = mlp()
    bad = [case.data[0], (case.data[1][0].clone(), case.data[1][1]), case.data[2]]
    bad[1][0][2, 1] = float("nan")
    for cls in OPERATORS:
        op = cls(case.model, case.loss_fn, bad, check_deterministic=False)
        with pytest.raises(
            ValueError, match=r"output on batch 1 \(4 examples.*contains NaN or Inf \(its inputs"
        ):
            op @ torch.ones(op.shape[0])


def test_batchnorm_case_uses_running_statistics():
    case = cnn_batchnorm()
    eval_op = curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    train_op = curvscope.HessianOperator(case.model, case.loss_fn, case.data, eval_mode=False)
    v = torch.ones(eval_op.shape[0])
    assert not torch.allclose(eval_op @ v, train_op @ v)  # batch statistics differ
    assert case.model.training
