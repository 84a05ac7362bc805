"""The command-line interface: ``curvscope analyze`` (typer + rich).

The CLI only parses arguments and calls the public Python API (``curvscope.analyze``,
``Report.save``, the loading helpers of ``curvscope.cli.loading``).
"""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``curvscope`` console script."""
    from .app import app

    app()


__all__ = ["main"]
