"""The ``curvscope`` app: ``analyze`` and ``influence`` (options only; their bodies are in
``run.py`` and ``influence.py``), and the one place every command is registered."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from . import options as opt
from .prune_app import prune
from .track import track


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, an unknown option) as one line on stderr, exit 2, in
    the same style as every other bad input: no usage box, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, "curvscope", complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            print("curvscope: error: interrupted; nothing was written.", file=sys.stderr)
            code = 130
        except Exception as error:  # click's UsageError (typer vendors click in newer versions)
            if not any(kind.__name__ == "UsageError" for kind in type(error).__mro__):
                raise
            print(f"curvscope: error: {' '.join(error.format_message().split())}", file=sys.stderr)
            code = 2
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="curvscope: the curvature of trained PyTorch networks.",
)


@app.callback()
def _root() -> None:
    """curvscope: the curvature of trained PyTorch networks (run `curvscope analyze --help`)."""


def analyze(
    model: opt.ModelOption = None,
    checkpoint: opt.CheckpointOption = None,
    data: opt.DataOption = None,
    loss: opt.LossOption = "cross_entropy",
    curvature: Annotated[str, typer.Option(help="hessian, ggn or fisher.")] = "hessian",
    params: opt.ParamsOption = None,
    top_k: Annotated[int, typer.Option(min=1, help="Number of largest eigenvalues.")] = 6,
    bottom_k: Annotated[int, typer.Option(min=0, help="Number of smallest eigenvalues.")] = 3,
    trace_matvecs: Annotated[
        int, typer.Option(min=3, help="Products for the trace and diagonal.")
    ] = 100,
    no_density: Annotated[bool, typer.Option("--no-density", help="Skip the density.")] = False,
    no_landscape: Annotated[
        bool, typer.Option("--no-landscape", help="Skip the loss landscape.")
    ] = False,
    held_out_data: Annotated[
        str | None,
        typer.Option(help="Held-out data factory 'package.module:factory' (Uncertainty section)."),
    ] = None,
    no_uncertainty: Annotated[
        bool, typer.Option("--no-uncertainty", help="Skip the Uncertainty (Laplace) section.")
    ] = False,
    device: opt.DeviceOption = "auto",
    dtype: opt.DtypeOption = "float32",
    seed: opt.seed_option("Seed of every random probe.") = 0,
    out: opt.OutOption = Path("curvscope-report"),
    json_output: opt.JsonOption = False,
    quiet: opt.QuietOption = False,
) -> None:
    """Analyse a trained model's curvature and write an HTML report (built-in example if no
    --model/--data)."""
    opt.guarded(_lazy("run"), dict(locals()), what="the analysis")


def influence(
    model: opt.ModelOption = None,
    checkpoint: opt.CheckpointOption = None,
    data: opt.data_option("Training data factory 'package.module:factory' -> batches.") = None,
    test_data: Annotated[
        str | None,
        typer.Option(help="Test data factory -> batches (default: the first training examples)."),
    ] = None,
    loss: opt.LossOption = "cross_entropy",
    curvature: Annotated[
        str, typer.Option(help="ggn, hessian, fisher, kfac, ekfac, diagonal or identity.")
    ] = "ggn",
    solver: Annotated[str, typer.Option(help="auto, exact, cg, lowrank or lissa.")] = "auto",
    damping: Annotated[
        float | None, typer.Option(help="Damping λ (default: 0.1 x mean eigenvalue).")
    ] = None,
    params: opt.ParamsOption = None,
    num_test: Annotated[int, typer.Option(help="Test examples to explain.")] = 8,
    top: Annotated[int, typer.Option(help="Most helpful and most harmful examples shown.")] = 5,
    flip_fraction: Annotated[
        float, typer.Option(help="Built-in example: fraction of training labels flipped.")
    ] = 0.1,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Examples per chunk of per-example gradients.")
    ] = None,
    device: opt.DeviceOption = "auto",
    dtype: opt.DtypeOption = "float32",
    seed: opt.seed_option("Seed of the example and every random choice.") = 0,
    out: opt.OutOption = Path("curvscope-influence"),
    json_output: opt.JsonOption = False,
    quiet: opt.QuietOption = False,
) -> None:
    """Explain predictions by the training examples behind them (influence functions) and find
    likely mislabelled training examples; writes an HTML report (built-in example: digits with
    flipped labels)."""
    opt.guarded(_lazy("influence"), dict(locals()), what="the influence computation")


def _lazy(module: str) -> Callable[..., None]:
    """The ``run`` of ``curvscope.cli.<module>``, imported when called (keeps --help fast)."""

    def run(**options: Any) -> None:
        importlib.import_module(f"{__package__}.{module}").run(**options)

    return run


#: Every command, registered the same way (MultiValueCommand reads ``--sparsity 0.5 0.7``).
for _command in (analyze, influence, prune, track):
    app.command(_command.__name__, cls=opt.MultiValueCommand)(_command)
