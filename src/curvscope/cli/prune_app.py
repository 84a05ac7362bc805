"""``curvscope prune``: the options (several values after one flag), then the body in
``prune_run.py``. Registered on the app in ``app.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

#: Options that take several values after one flag: ``--sparsity 0.5 0.7 0.9``.
MULTI_VALUE = ("--sparsity", "--methods")


class MultiValueCommand(TyperCommand):
    """Rewrites ``--sparsity 0.5 0.7`` as ``--sparsity 0.5 --sparsity 0.7`` before parsing."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        current = None
        for arg in args:
            number = _is_number(arg)
            if arg.startswith("-") and not (current and number):
                current = arg if arg in MULTI_VALUE else None
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


def prune(
    sparsity: Annotated[
        list[str] | None,
        typer.Option(help="Target sparsities in [0, 1), several after one flag: 0.5 0.7 0.9."),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(help="Methods among magnitude obd obs layer_obs (default: all four)."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model factory 'package.module:factory' (built-in if unset).")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="State dict file (loaded with weights_only=True).")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Data factory 'package.module:factory' -> batches.")
    ] = None,
    test_data: Annotated[
        str | None, typer.Option(help="Held-out data factory for the accuracy (default: --data).")
    ] = None,
    loss: Annotated[
        str, typer.Option(help="cross_entropy, mse or 'package.module:callable'.")
    ] = "cross_entropy",
    curvature: Annotated[
        str, typer.Option(help="ggn, fisher, hessian, kfac or diagonal (obd and obs).")
    ] = "ggn",
    scope: Annotated[str, typer.Option(help="layer or global.")] = "layer",
    structure: Annotated[str | None, typer.Option(help="None, n:m (e.g. 2:4) or channel.")] = None,
    damping: Annotated[float, typer.Option(help="Relative damping of the curvature.")] = 0.01,
    params: Annotated[
        str | None, typer.Option(help="Comma-separated parameter names, globs or regexes.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float64",
    seed: Annotated[int, typer.Option(help="Seed of the data split and of any estimate.")] = 0,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("curvscope-prune"),
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the results JSON on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress and no summary.")] = False,
) -> None:
    """Prune a trained model one-shot with several methods and sparsities and write an HTML
    report of accuracy against sparsity (the built-in digits example if no --model/--data)."""
    from .app import _fail
    from .prune_run import BadInputError, run

    try:
        run(**locals())
    except BadInputError as error:
        _fail(str(error), 2)
    except KeyboardInterrupt:
        _fail("interrupted; no report was written.", 130)
    except Exception as error:
        detail = " ".join(str(error).split())
        _fail(f"pruning failed ({type(error).__name__}: {detail}); no report written.", 1)
