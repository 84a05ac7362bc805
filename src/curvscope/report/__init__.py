"""Analysis, plots and the HTML report.

Importing this package is light: matplotlib and jinja2 are imported only when a report is
drawn or rendered (``Report.save``, ``Report.to_html``).
"""

from .analyze import analyze
from .digits import digits_example
from .result import Report

__all__: list[str] = ["Report", "analyze", "digits_example"]
