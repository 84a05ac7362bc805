"""What every command shares: its option declarations, its error wrapper, and the command
class that reads several values after one flag (``--sparsity 0.5 0.7 0.9``).

A command declares ``model: ModelOption = None`` and so on, and its body is one call:
``guarded(run, options, what="the analysis")``. Commands are registered in ``app.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

ModelOption = Annotated[
    str | None, typer.Option(help="Model factory 'package.module:factory' (built-in if unset).")
]
CheckpointOption = Annotated[
    Path | None, typer.Option(help="State dict file (loaded with weights_only=True).")
]
DataOption = Annotated[
    str | None, typer.Option(help="Data factory 'package.module:factory' -> batches.")
]
LossOption = Annotated[str, typer.Option(help="cross_entropy, mse or 'package.module:callable'.")]
ParamsOption = Annotated[
    str | None, typer.Option(help="Comma-separated parameter names, globs or regexes.")
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
DtypeOption = Annotated[str, typer.Option(help="float32 or float64.")]
OutOption = Annotated[Path, typer.Option(help="Report directory.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the results JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress and no summary.")]


def seed_option(what: str) -> Any:
    """``--seed``, with help text ``what`` (what the seed decides, per command)."""
    return Annotated[int, typer.Option(help=what)]


def data_option(what: str) -> Any:
    """``--data`` with its own help text (e.g. "Training data factory ...")."""
    return Annotated[str | None, typer.Option(help=what)]


def guarded(run: Callable[..., None], options: dict[str, Any], *, what: str) -> None:
    """Call ``run(**options)``; any failure becomes one line on stderr and an exit code.

    Bad input (``BadInputError``) exits 2 with its message; an interrupt exits 130; any other
    error exits 1 with "``what`` failed (Kind: detail); no report written."
    """
    from .loading import BadInputError  # imports torch: not needed for --help

    try:
        run(**options)
    except BadInputError as error:
        fail(str(error), 2)
    except KeyboardInterrupt:
        fail("interrupted; no report was written.", 130)
    except Exception as error:
        detail = " ".join(str(error).split())
        fail(f"{what} failed ({type(error).__name__}: {detail}); no report written.", 1)


def fail(text: str, code: int) -> None:
    """Print ``curvscope: error: text`` on stderr and exit with ``code``."""
    print(f"curvscope: error: {text}", file=sys.stderr)
    raise typer.Exit(code)


class MultiValueCommand(TyperCommand):
    """Reads several values after one flag of a list option: ``--sparsity 0.5 0.7`` is parsed
    as ``--sparsity 0.5 --sparsity 0.7``. Commands without list options parse as usual."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        multi = {name for p in self.params if getattr(p, "multiple", False) for name in p.opts}
        rewritten: list[str] = []
        current = None
        for arg in args:
            number = _is_number(arg)
            if arg.startswith("-") and not (current and number):
                current = arg if arg in multi else None
                rewritten.append(arg)
                continue
            if current and rewritten[-1] != current:
                rewritten.append(current)
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
