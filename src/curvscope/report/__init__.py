"""Analysis, plots and the HTML report (being built)."""

from .digits import digits_example

__all__: list[str] = ["digits_example"]
