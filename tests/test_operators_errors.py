"""Every bad input gives a TypeError or ValueError naming the argument and the fix."""

import pytest
import torch
from models import mlp

import curvscope

OPERATORS = [curvscope.HessianOperator, curvscope.GGNOperator, curvscope.FisherOperator]
IDS = ["hessian", "ggn", "fisher"]


@pytest.fixture
def case():
    return mlp()


@pytest.mark.parametrize("cls", OPERATORS, ids=IDS)
def test_empty_data_is_refused_at_construction(cls, case):
    x, y = case.data[0]
    for data in ([], (x[:0], y[:0]), [(x[:0], y[:0]), (x[:0], y[:0])]):
        with pytest.raises(ValueError, match=r"\(data=...\): expected at least one example"):
            cls(case.model, case.loss_fn, data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]))
    with pytest.raises(ValueError, match=r"\(data=...\): expected at least one example"):
        cls(case.model, case.loss_fn, loader)

    class Stream:  # re-iterable, without len: emptiness is found on first use
        def __iter__(self):
            return iter([(x[:0], y[:0])])

    op = cls(case.model, case.loss_fn, Stream())
    with pytest.raises(ValueError, match=r"\(data=...\): expected at least one example"):
        op @ torch.ones(op.shape[0])


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (5, r"\(data=...\): expected an iterable of \(inputs, targets\) batches"),
        (torch.ones(3, 4), r"\(data=...\): expected an iterable"),
        ((b for b in []), r"\(data=...\): expected data that can be iterated again.*list"),
    ],
)
def test_data_of_the_wrong_kind(case, data, pattern):
    with pytest.raises(TypeError, match=pattern):
        curvscope.HessianOperator(case.model, case.loss_fn, data)


def test_batches_that_are_not_pairs(case):
    x, y = case.data[0]
    op = curvscope.HessianOperator(case.model, case.loss_fn, [(x, y, y)])
    with pytest.raises(TypeError, match=r"\(inputs, targets\) pairs \(batch 0\)"):
        op.num_examples
    op = curvscope.HessianOperator(case.model, case.loss_fn, [(x, y[:2])])
    with pytest.raises(ValueError, match=r"same size along dimension 0.*\[2, 4\]"):
        op.num_examples


def test_loss_that_does_not_return_a_scalar(case):
    with pytest.raises(ValueError, match=r"\(loss_fn=...\): expected a loss that reduces.*'none'"):
        curvscope.HessianOperator(
            case.model, torch.nn.CrossEntropyLoss(reduction="none"), case.data
        )
    per_example = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    op = curvscope.GGNOperator(case.model, per_example, case.data)
    with pytest.raises(ValueError, match=r"\(loss_fn=...\): expected a loss that returns a scalar"):
        op.num_examples
    op = curvscope.GGNOperator(case.model, lambda out, y: 1.0, case.data)
    with pytest.raises(TypeError, match=r"returns a scalar tensor, got 1.0"):
        op.num_examples


def test_targets_that_do_not_fit_the_loss(case):
    x, y = case.data[0]
    op = curvscope.HessianOperator(case.model, case.loss_fn, [(x, y.double()[:, None])])
    with pytest.raises(ValueError, match=r"\(loss_fn=...\): loss_fn\(output, targets\) failed on"):
        op @ torch.ones(op.shape[0])
    op = curvscope.HessianOperator(case.model, torch.nn.MSELoss(), case.data)
    with pytest.raises(ValueError, match=r"failed on batch 0.*targets that fit loss_fn"):
        op.loss()


def test_inputs_that_do_not_fit_the_model(case):
    x, y = case.data[0]
    op = curvscope.GGNOperator(case.model, case.loss_fn, [(x[:, :2], y)])
    with pytest.raises(ValueError, match=r"\(data=...\): model\(inputs\) failed on batch 0"):
        op.gradient()


def test_model_without_trainable_parameters(case):
    case.model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\(model=...\): expected a model with at least one"):
        curvscope.HessianOperator(case.model, case.loss_fn, case.data)
    op = curvscope.HessianOperator(case.model, case.loss_fn, case.data, params=["0.bias"])
    assert op.shape == (5, 5)  # frozen parameters can still be asked for by name
    with pytest.raises(TypeError, match=r"\(model=...\): expected a torch.nn.Module"):
        curvscope.HessianOperator(lambda x: x, case.loss_fn, case.data)
    with pytest.raises(TypeError, match=r"\(loss_fn=...\): expected a callable"):
        curvscope.HessianOperator(case.model, "cross_entropy", case.data)


def test_unknown_parameter_names(case):
    valid = r"\['0.weight', '0.bias', '2.weight', '2.bias'\]"
    with pytest.raises(ValueError, match=rf"\(params=...\).*{valid}.*Unknown: \['nope'\]"):
        curvscope.GGNOperator(case.model, case.loss_fn, case.data, params=["0.weight", "nope"])
    with pytest.raises(TypeError, match=rf"\(params=...\): expected None or a list.*{valid}"):
        curvscope.GGNOperator(case.model, case.loss_fn, case.data, params="0.weight")
    with pytest.raises(ValueError, match=r"non-empty list of distinct names"):
        curvscope.GGNOperator(case.model, case.loss_fn, case.data, params=[])
    with pytest.raises(ValueError, match=r"non-empty list of distinct names"):
        curvscope.GGNOperator(case.model, case.loss_fn, case.data, params=["0.bias", "0.bias"])


@pytest.mark.parametrize("cls", OPERATORS, ids=IDS)
def test_vectors_of_wrong_size_structure_dtype_or_device(cls, case):
    op = cls(case.model, case.loss_fn, case.data)
    size = op.shape[0]
    with pytest.raises(
        ValueError, match=rf"matvec\(v=...\): expected a flat tensor of shape \({size},\)"
    ):
        op @ torch.ones(size + 1)
    with pytest.raises(ValueError, match=r"dtype torch.float64.*\.to\(torch.float64\)"):
        op @ torch.ones(size, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"device cpu.*\.to\('cpu'\)"):
        op @ torch.ones(size, device="meta")
    with pytest.raises(ValueError, match=r"Missing keys: \['2.bias'\]"):
        op.matvec({k: v for k, v in op.unflatten(torch.ones(size)).items() if k != "2.bias"})
    with pytest.raises(TypeError, match=r"matvec\(v=...\)"):
        op.matvec([1.0] * size)
    with pytest.raises(
        ValueError, match=rf"matmat\(V=...\): expected a tensor of shape \({size}, k\)"
    ):
        op.matmat(torch.ones(size - 1, 2))
    with pytest.raises(
        ValueError, match=rf"loss\(delta=...\): expected a flat tensor of shape \({size},\)"
    ):
        op.loss(torch.ones(3))


def test_bad_options(case):
    args = (case.model, case.loss_fn, case.data)
    with pytest.raises(ValueError, match=r"\(hvp_mode=...\): expected one of 'auto'"):
        curvscope.HessianOperator(*args, hvp_mode="fast")
    with pytest.raises(ValueError, match=r"\(max_batch_size=...\): expected an integer >= 1"):
        curvscope.GGNOperator(*args, max_batch_size=0)
    with pytest.raises(TypeError, match=r"\(progress=...\): expected True or False"):
        curvscope.GGNOperator(*args, progress="yes")
    with pytest.raises(ValueError, match=r"\(kind=...\): expected one of 'empirical'"):
        curvscope.FisherOperator(*args, kind="true")
    with pytest.raises(ValueError, match=r"\(num_samples=...\): expected an integer >= 1"):
        curvscope.FisherOperator(*args, kind="monte_carlo", num_samples=0)
    with pytest.raises(ValueError, match=r"\(reduction=...\): expected 'mean' \(the reduction"):
        curvscope.GGNOperator(*args, reduction="sum")
    with pytest.raises(ValueError, match=r"\(reduction=...\): expected one of 'mean', 'sum'"):
        curvscope.GGNOperator(case.model, lambda o, t: o.sum(), case.data, reduction="max")
    with pytest.raises(ValueError, match=r"\(reduction=...\): expected 'mean', the reduction of"):
        curvscope.GGNOperator(
            case.model, torch.nn.functional.cross_entropy, case.data, reduction="sum"
        )
    with pytest.raises(
        ValueError, match=r"\(loss_fn=...\): expected nn.CrossEntropyLoss.*'empirical'"
    ):
        curvscope.FisherOperator(case.model, lambda o, t: o.sum(), case.data, kind="monte_carlo")


def test_ggn_needs_a_tensor_output(case):
    class DictOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = case.model

        def forward(self, x):
            return {"logits": self.inner(x)}

    loss_fn = lambda out, y: torch.nn.functional.cross_entropy(out["logits"], y)  # noqa: E731
    hessian = curvscope.HessianOperator(DictOutput(), loss_fn, case.data)
    assert hessian.num_examples == 11  # the Hessian takes any output loss_fn takes
    op = curvscope.GGNOperator(DictOutput(), loss_fn, case.data)
    with pytest.raises(
        TypeError, match=r"GGNOperator\(model=...\): expected a model that returns one Tensor"
    ):
        op.num_examples
