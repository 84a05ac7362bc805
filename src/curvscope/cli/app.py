"""``curvscope analyze``: parse the options, load the inputs, analyse, save, summarise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup


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


@app.command()
def analyze(
    model: Annotated[
        str | None, typer.Option(help="Model factory 'package.module:factory' (built-in if unset).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="State dict file (loaded with weights_only=True).")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Data factory 'package.module:factory' -> batches.")
    ] = None,
    loss: Annotated[
        str, typer.Option(help="cross_entropy, mse or 'package.module:callable'.")
    ] = "cross_entropy",
    curvature: Annotated[str, typer.Option(help="hessian, ggn or fisher.")] = "hessian",
    params: Annotated[
        str | None, typer.Option(help="Comma-separated parameter names, globs or regexes.")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Number of largest eigenvalues.")] = 6,
    bottom_k: Annotated[int, typer.Option(min=0, help="Number of smallest eigenvalues.")] = 3,
    trace_matvecs: Annotated[
        int, typer.Option(min=3, help="Products for the trace and diagonal.")
    ] = 100,
    no_density: Annotated[bool, typer.Option("--no-density", help="Skip the density.")] = False,
    no_landscape: Annotated[
        bool, typer.Option("--no-landscape", help="Skip the loss landscape.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of every random probe.")] = 0,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("curvscope-report"),
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the results JSON on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress and no summary.")] = False,
) -> None:
    """Analyse a trained model's curvature and write an HTML report (built-in example if no
    --model/--data)."""
    options = dict(locals())
    from .loading import BadInputError

    try:
        _run(**options)
    except BadInputError as error:
        _fail(str(error), 2)
    except KeyboardInterrupt:
        _fail("interrupted; no report was written.", 130)
    except Exception as error:
        detail = " ".join(str(error).split())
        _fail(f"the analysis failed ({type(error).__name__}: {detail}); no report written.", 1)


@app.command()
def influence(
    model: Annotated[
        str | None, typer.Option(help="Model factory 'package.module:factory' (built-in if unset).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="State dict file (loaded with weights_only=True).")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Training data factory 'package.module:factory' -> batches.")
    ] = None,
    test_data: Annotated[
        str | None,
        typer.Option(help="Test data factory -> batches (default: the first training examples)."),
    ] = None,
    loss: Annotated[
        str, typer.Option(help="cross_entropy, mse or 'package.module:callable'.")
    ] = "cross_entropy",
    curvature: Annotated[
        str, typer.Option(help="ggn, hessian, fisher, kfac, ekfac, diagonal or identity.")
    ] = "ggn",
    solver: Annotated[str, typer.Option(help="auto, exact, cg, lowrank or lissa.")] = "auto",
    damping: Annotated[
        float | None, typer.Option(help="Damping λ (default: 0.1 x mean eigenvalue).")
    ] = None,
    params: Annotated[
        str | None, typer.Option(help="Comma-separated parameter names, globs or regexes.")
    ] = None,
    num_test: Annotated[int, typer.Option(help="Test examples to explain.")] = 8,
    top: Annotated[int, typer.Option(help="Most helpful and most harmful examples shown.")] = 5,
    flip_fraction: Annotated[
        float, typer.Option(help="Built-in example: fraction of training labels flipped.")
    ] = 0.1,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Examples per chunk of per-example gradients.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of the example and every random choice.")] = 0,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("curvscope-influence"),
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the results JSON on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress and no summary.")] = False,
) -> None:
    """Explain predictions by the training examples behind them (influence functions) and find
    likely mislabelled training examples; writes an HTML report (built-in example: digits with
    flipped labels)."""
    options = dict(locals())
    from .loading import BadInputError

    try:
        from .influence import run

        run(**options)
    except BadInputError as error:
        _fail(str(error), 2)
    except KeyboardInterrupt:
        _fail("interrupted; no report was written.", 130)
    except Exception as error:
        detail = " ".join(str(error).split())
        name = type(error).__name__
        _fail(f"the influence computation failed ({name}: {detail}); no report written.", 1)


def _fail(text: str, code: int) -> None:
    print(f"curvscope: error: {text}", file=sys.stderr)
    raise typer.Exit(code)


def _run(**options: object) -> None:
    from .run import run

    run(**options)
