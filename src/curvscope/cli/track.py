"""``curvscope track``: train with full-batch GD, track the sharpness, write a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as opt

#: Defaults of the built-in run: the digits MLP with MSE reaches the edge of stability at
#: lr 1 within a few hundred steps (about 10 s on a CPU for 1,000 steps).
BUILT_IN_LR, BUILT_IN_STEPS, BUILT_IN_EVERY = 1.0, 1000, 10


def track(
    model: opt.ModelOption = None,
    checkpoint: opt.CheckpointOption = None,
    data: opt.DataOption = None,
    loss: Annotated[
        str | None,
        typer.Option(help="cross_entropy, mse or 'package.module:callable' (built-in: mse)."),
    ] = None,
    lr: Annotated[float, typer.Option(help="Learning rate η.")] = BUILT_IN_LR,
    steps: Annotated[int, typer.Option(help="Training steps.")] = BUILT_IN_STEPS,
    every: Annotated[int, typer.Option(help="Record the sharpness every this many steps.")] = (
        BUILT_IN_EVERY
    ),
    optimizer: Annotated[str, typer.Option(help="gd or momentum (heavy ball, 0.9).")] = "gd",
    top_k: Annotated[int, typer.Option(help="Number of largest eigenvalues per record.")] = 1,
    device: opt.DeviceOption = "auto",
    dtype: opt.DtypeOption = "float32",
    seed: opt.seed_option("Seed of the initialisation and the probes.") = 0,
    out: opt.OutOption = Path("curvscope-track"),
    quiet: opt.QuietOption = False,
) -> None:
    """Train with full-batch gradient descent and track the sharpness (the edge of stability);
    write DIR/index.html, DIR/results.json and DIR/sharpness.png (built-in digits example if
    no --model/--data)."""
    opt.guarded(_run, dict(locals()), what="tracking")


def _check_numbers(lr: float, steps: int, every: int, top_k: int) -> None:
    from .loading import BadInputError

    if not lr > 0 or lr == float("inf"):
        raise BadInputError(f"--lr {lr}: expected a learning rate > 0, e.g. --lr 0.5.")
    for option, value in (("--steps", steps), ("--every", every), ("--top-k", top_k)):
        if value < 1:
            raise BadInputError(f"{option} {value}: expected an integer >= 1.")


def _run(**options: object) -> None:
    from curvscope.cli import loading
    from curvscope.report.track import OPTIMIZERS, train_and_track

    loading.use_working_directory()
    _check_numbers(options["lr"], options["steps"], options["every"], options["top_k"])
    loading.resolve_choice(options["optimizer"], OPTIMIZERS, "--optimizer")
    dtype = loading.resolve_dtype(options["dtype"])
    device = loading.resolve_device(options["device"])
    model, data, checkpoint = options["model"], options["data"], options["checkpoint"]
    if model is None and data is None:
        if checkpoint is not None:
            raise loading.BadInputError("--checkpoint needs --model (and --data).")
        loss_fn = loading.resolve_loss(options["loss"] or "mse")
        network, batches = _built_in(loss_fn, options["seed"], dtype, device)
        name = "digits MLP 64-32-10 (built-in)"
    else:
        network, batches = loading.load_user(model, checkpoint, data, dtype=dtype, device=device)
        loss_fn = loading.resolve_loss(options["loss"] or "cross_entropy")
        loading.check_batches(network, loss_fn, batches)
        name = model
    show = not options["quiet"]
    report = train_and_track(
        network,
        loss_fn,
        batches,
        lr=options["lr"],
        steps=options["steps"],
        every=options["every"],
        optimizer=options["optimizer"],
        k=options["top_k"],
        seed=options["seed"],
        progress=show,
        name=name,
    )
    report.save(options["out"])
    if show:
        _summary(report, Path(options["out"]))


def _built_in(loss_fn, seed, dtype, device):
    import torch

    from curvscope.report.digits import digits_mlp, load_digits

    inputs, labels = load_digits(dtype=dtype, device=device)
    targets = labels
    if isinstance(loss_fn, torch.nn.MSELoss):
        targets = torch.nn.functional.one_hot(labels, 10).to(dtype)
    return digits_mlp(seed=seed, dtype=dtype).to(device), [(inputs, targets)]


def _summary(report, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    results = report.to_dict()
    table = Table(title=f"curvscope track: {report.model}", show_header=False)
    table.add_row("optimizer / lr", f"{report.optimizer} / {report.lr:g}")
    table.add_row("threshold", f"{report.threshold:.4g}")
    table.add_row("loss", f"{report.losses[0]:.4g} -> {report.losses[-1]:.4g} ({report.status})")
    table.add_row("largest sharpness", f"{results['max_sharpness']:.4g}")
    late = results["late_sharpness_over_threshold"]
    table.add_row("late sharpness / threshold", f"{late:.3g}" if late is not None else "-")
    table.add_row("time / products", f"{report.seconds:.1f} s / {results['total_matvecs']:,}")
    table.add_row("report", str(out / "index.html"))
    Console().print(table)
