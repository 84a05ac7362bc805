"""Shared fixtures. Tests run in float64 against dense references."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _float64_default():
    """Tests build their own tensors in float64; restore the default dtype afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
