"""Train-mode warning, inference_mode, NaN/Inf reports, and errors at the data boundary."""

import re
import warnings

import pytest
import torch
from models import mlp
from torch import nn

import curvscope

OPERATORS = [curvscope.HessianOperator, curvscope.GGNOperator, curvscope.FisherOperator]
IDS = ["hessian", "ggn", "fisher"]
F64 = torch.float64


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("cls", OPERATORS, ids=IDS)
def test_train_mode_with_dropout_warns_once_and_evaluates_in_eval_mode(cls):
    case = mlp()
    model = _dropout_model().train()
    with pytest.warns(curvscope.TrainModeWarning) as caught:
        op = cls(model, case.loss_fn, case.data)
        v = torch.ones(op.shape[0], dtype=F64)
        first = op @ v
        op.matmat(torch.ones(op.shape[0], 2, dtype=F64))
        op.gradient()
    caught = [w for w in caught if issubclass(w.category, curvscope.TrainModeWarning)]
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "'1' (Dropout)" in text and "model.eval()" in text and "eval_mode=True" in text
    assert caught[0].filename == __file__  # points at the caller
    assert model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = cls(model, case.loss_fn, case.data, eval_mode=True)
        torch.testing.assert_close(explicit @ v, first, rtol=0, atol=0)  # eval mode, as warned
        cls(model.eval(), case.loss_fn, case.data)
        model.train()[1].p = 0.0  # no dropout: train and eval mode agree
        cls(model, case.loss_fn, case.data)


@pytest.mark.parametrize("cls", OPERATORS, ids=IDS)
def test_everything_works_under_inference_mode(cls):
    case = mlp()
    op = cls(case.model, case.loss_fn, case.data)
    v = torch.linspace(-1, 1, op.shape[0], dtype=F64)
    expected = (op @ v, op.loss(0.1 * v), op.gradient()[1], op.to_dense())
    with torch.inference_mode():
        data = [(x.clone(), y.clone()) for x, y in case.data]  # inference tensors
        fresh = cls(case.model, case.loss_fn, data)
        w = torch.linspace(-1, 1, op.shape[0], dtype=F64)
        got = (fresh @ w, fresh.loss(0.1 * w), fresh.gradient()[1], fresh.to_dense())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(op @ v, expected[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", OPERATORS, ids=IDS)
def test_nan_in_targets_or_outputs_is_reported_as_such(cls):
    case = mlp()
    y = case.data[1][1].double()[:, None].repeat(1, 3)
    y[2, 0] = float("nan")
    data = [(case.data[0][0], case.data[0][1].double()[:, None].repeat(1, 3)), (case.data[1][0], y)]
    op = cls(case.model, nn.MSELoss(), data)
    with pytest.raises(ValueError, match=r"targets of batch 1 \(4 examples.*contain NaN or Inf"):
        op @ torch.ones(op.shape[0], dtype=F64)
    x = case.data[2][0].clone()
    x[0, 0] = float("nan")
    op = cls(case.model, case.loss_fn, [case.data[0], (x, case.data[2][1])])
    with pytest.raises(ValueError, match=r"model's output on batch 1 \(3 examples.*NaN or Inf"):
        op.num_examples
    with torch.no_grad():
        case.model[0].bias[0] = float("nan")
    op = cls(case.model, case.loss_fn, case.data)
    with pytest.raises(ValueError, match=r"output on batch 0 .*contains NaN or Inf\. Check"):
        op.num_examples


class _Changing:
    """Yields good batches until ``broken``, then one that fits no model as batch 1."""

    def __init__(self, data, bad):
        self.data, self.bad, self.broken = data, bad, False

    def __iter__(self):
        return iter([self.data[0], self.bad] if self.broken else self.data)


@pytest.mark.parametrize("cls", OPERATORS, ids=IDS)
def test_inputs_that_do_not_fit_the_model_name_batch_shapes_and_first_layer(cls):
    case = mlp()
    x, y = case.data[1]
    data = _Changing(case.data, (x[:, :2], y))
    op = cls(case.model, case.loss_fn, data)
    op.num_examples  # set-up passes
    data.broken = True
    with pytest.raises(ValueError) as caught:
        op @ torch.ones(op.shape[0], dtype=F64)
    text = str(caught.value)
    name = cls.__name__
    assert f"{name}(data=...): model(inputs) failed on batch 1 (4 examples" in text
    assert "inputs (4, 2) float64, targets (4,) int64" in text
    assert re.search(r"first layer, '0', is Linear\(in_features=4", text)
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("targets", "suggestion"),
    [
        (torch.zeros(4, dtype=torch.long), "nn.CrossEntropyLoss()"),
        (torch.zeros(4, 3), "nn.MSELoss()"),
    ],
)
def test_missing_loss_suggests_the_loss_that_fits_the_targets(targets, suggestion):
    case = mlp()
    data = (case.data[0][0], targets)
    for loss_fn in (None, "mse", nn.CrossEntropyLoss):
        with pytest.raises(TypeError, match=r"\(loss_fn=...\): expected a callable") as caught:
            curvscope.GGNOperator(case.model, loss_fn, data)
        if loss_fn is None:
            assert suggestion in str(caught.value)
    with pytest.raises(TypeError, match=r"CrossEntropyLoss\(\), not the class"):
        curvscope.GGNOperator(case.model, nn.CrossEntropyLoss, data)
