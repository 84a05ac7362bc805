"""The examples in the docstrings of curvscope.derivatives hold exactly."""

import doctest
import importlib

import pytest

MODULES = ["products", "jacobians", "hessians", "taylor", "tree"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"curvscope.derivatives.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
