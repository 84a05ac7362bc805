"""``curvscope prune``: the options (``--sparsity 0.5 0.7 0.9``: several values after one
flag, read by ``options.MultiValueCommand``); the body is in ``prune_run.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as opt


def prune(
    sparsity: Annotated[
        list[str] | None,
        typer.Option(help="Target sparsities in [0, 1), several after one flag: 0.5 0.7 0.9."),
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(help="Methods among magnitude obd obs layer_obs (default: all four)."),
    ] = None,
    model: opt.ModelOption = None,
    checkpoint: opt.CheckpointOption = None,
    data: opt.DataOption = None,
    test_data: Annotated[
        str | None, typer.Option(help="Held-out data factory for the accuracy (default: --data).")
    ] = None,
    loss: opt.LossOption = "cross_entropy",
    curvature: Annotated[
        str, typer.Option(help="ggn, fisher, hessian, kfac or diagonal (obd and obs).")
    ] = "ggn",
    scope: Annotated[str, typer.Option(help="layer or global.")] = "layer",
    structure: Annotated[str | None, typer.Option(help="None, n:m (e.g. 2:4) or channel.")] = None,
    damping: Annotated[float, typer.Option(help="Relative damping of the curvature.")] = 0.01,
    params: opt.ParamsOption = None,
    device: opt.DeviceOption = "auto",
    dtype: opt.DtypeOption = "float64",
    seed: opt.seed_option("Seed of the data split and of any estimate.") = 0,
    out: opt.OutOption = Path("curvscope-prune"),
    json_output: opt.JsonOption = False,
    quiet: opt.QuietOption = False,
) -> None:
    """Prune a trained model one-shot with several methods and sparsities and write an HTML
    report of accuracy against sparsity (the built-in digits example if no --model/--data)."""
    from .prune_run import run

    opt.guarded(run, dict(locals()), what="pruning")
