"""flatten: order, round trip, and its errors."""

import pytest
import torch

import curvscope


def test_order_is_structure_order_then_row_major():
    tree = {
        "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "b": (torch.tensor(5.0), torch.tensor([6.0])),
    }
    vector, unflatten = curvscope.flatten(tree)
    assert torch.equal(vector, torch.arange(1.0, 7.0))
    back = unflatten(torch.arange(6.0))
    assert list(back) == ["w", "b"]
    assert torch.equal(back["w"], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    assert back["b"][0].shape == () and torch.equal(back["b"][1], torch.tensor([5.0]))


def test_single_tensor_round_trip():
    x = torch.randn(3, 4, dtype=torch.float64)
    vector, unflatten = curvscope.flatten(x)
    assert vector.shape == (12,)
    assert torch.equal(unflatten(vector), x)


def test_list_and_nested_round_trip():
    tree = [torch.ones(2), {"a": torch.zeros(1, 3)}]
    vector, unflatten = curvscope.flatten(tree)
    back = unflatten(vector)
    assert isinstance(back, list) and torch.equal(back[1]["a"], tree[1]["a"])


def test_errors():
    with pytest.raises(TypeError, match=r"curvscope\.flatten\(tree=\.\.\.\): expected a Tensor"):
        curvscope.flatten({"a": 1.0})
    with pytest.raises(ValueError, match=r"flatten\(tree=\.\.\.\): .*Pass at least one Tensor"):
        curvscope.flatten(())
    with pytest.raises(ValueError, match=r"one dtype and device .*\.to\(dtype, device\)"):
        curvscope.flatten((torch.ones(2), torch.ones(2, dtype=torch.float32)))
    _, unflatten = curvscope.flatten(torch.ones(2, 2))
    with pytest.raises(
        ValueError, match=r"unflatten\(vector=\.\.\.\): expected a 1-D Tensor of length 4"
    ):
        unflatten(torch.ones(5))
    with pytest.raises(TypeError, match=r"unflatten\(vector=\.\.\.\): .*got a list of length 4"):
        unflatten([1, 2, 3, 4])
