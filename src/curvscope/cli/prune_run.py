"""The body of ``curvscope prune``: check the options, load, sweep, save, summarise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import curvscope
from curvscope.cli import loading
from curvscope.report.digits import digits_train_test
from curvscope.report.pruning import PruneReport

BadInputError = loading.BadInputError
METHODS = ("magnitude", "obd", "obs", "layer_obs")
DEFAULT_SPARSITIES = ("0.5", "0.7", "0.9")


def _sparsities(values: list[str] | None, structure: str | None) -> list[float]:
    if structure and ":" in structure:
        n, _, m = structure.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise BadInputError(
                f"--structure {structure!r}: expected n:m with integers 0 < n < m, e.g. 2:4."
            )
        return [int(n) / int(m)]
    out = []
    for text in values or DEFAULT_SPARSITIES:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0.0 <= value < 1.0:
            raise BadInputError(f"--sparsity {text}: expected numbers in [0, 1), e.g. 0.5 0.9.")
        out.append(value)
    return out


def _check(options: dict[str, Any]) -> tuple[list[float], list[str]]:
    for method in options["methods"] or []:
        loading.resolve_choice(method, METHODS, "--methods")
    loading.resolve_choice(
        options["curvature"], ("ggn", "fisher", "hessian", "kfac", "diagonal"), "--curvature"
    )
    loading.resolve_choice(options["scope"], ("layer", "global"), "--scope")
    structure = options["structure"]
    if structure not in (None, "channel") and ":" not in structure:
        raise BadInputError(f"--structure {structure!r}: expected n:m (e.g. 2:4) or channel.")
    if not options["damping"] >= 0:
        raise BadInputError(f"--damping {options['damping']}: expected a number >= 0.")
    return _sparsities(options["sparsity"], structure), list(options["methods"] or METHODS)


def run(**options: Any) -> None:
    """Run ``curvscope prune`` with the command-line options (see its --help)."""
    loading.use_working_directory()
    sparsities, methods = _check(options)
    show = not options["quiet"]
    dtype = loading.resolve_dtype(options["dtype"])
    device = loading.resolve_device(options["device"])
    loss_fn = loading.resolve_loss(options["loss"])
    if options["model"] is None and options["data"] is None:
        if options["checkpoint"] is not None or options["test_data"] is not None:
            raise BadInputError("--checkpoint and --test-data need --model and --data.")
        if show:
            print("curvscope: training the built-in digits example ...", file=sys.stderr)
        model, loss_fn, data, test = digits_train_test(
            seed=options["seed"], dtype=dtype, device=device
        )
        title = "built-in digits MLP (64-32-10, tanh)"
        described = f"{_count(data)} training digits, {_count(test)} held out for the accuracy"
    else:
        model, data, test = _load_user(options, dtype, device)
        loading.check_batches(model, loss_fn, data)
        title = options["model"]
        described = (
            f"{_count(data)} examples from {options['data']}; accuracy on "
            f"{options['test_data'] or options['data']}"
        )
    sweep = _sweep(model, loss_fn, data, test, sparsities, methods, options, show)
    report = PruneReport(sweep, title, described)
    report.save(options["out"])
    if options["json_output"]:
        print(report.to_json())
    if show:
        _summary(report, options["out"], sys.stderr if options["json_output"] else sys.stdout)


def _count(batches: list[Any]) -> int:
    return sum(len(targets) for _, targets in batches)


def _load_user(options: dict[str, Any], dtype: Any, device: Any) -> tuple[Any, list, list]:
    model, data = loading.load_user(
        options["model"], options["checkpoint"], options["data"], dtype=dtype, device=device
    )
    test = data
    if options["test_data"] is not None:
        _, test = loading.prepare(
            model, loading.load_data(options["test_data"]), dtype=dtype, device=device
        )
    return model, data, test


def _sweep(model, loss_fn, data, test, sparsities, methods, options, show) -> Any:
    params = loading.resolve_params(model, options["params"])
    kwargs = dict(
        sparsities=sparsities,
        methods=methods,
        test_data=test,
        curvature=options["curvature"],
        scope=options["scope"],
        damping=options["damping"],
        structure=options["structure"],
        params=params,
        seed=options["seed"],
    )
    from rich.console import Console
    from rich.progress import Progress

    console = Console(file=sys.stderr)
    if not show or not console.is_terminal:
        return _call_sweep(model, loss_fn, data, kwargs)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("pruning", total=len(sparsities) * len(methods))
        started = [False]

        def advance(text: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, description=f"pruning: {text}")

        return _call_sweep(model, loss_fn, data, {**kwargs, "progress": advance})


def _call_sweep(model: Any, loss_fn: Any, data: Any, kwargs: dict[str, Any]) -> Any:
    try:
        return curvscope.prune_sweep(model, loss_fn, data, **kwargs)
    except (TypeError, ValueError) as error:  # the library's own checks: bad input
        if "curvscope.prune" in str(error):
            raise BadInputError(" ".join(str(error).split())) from error
        raise


def _summary(report: PruneReport, out: Path, stream: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    sweep = report.sweep
    table = Table(title=f"curvscope prune: {report.title}")
    for column in ["method", "sparsity", "test accuracy", "test loss", "seconds"]:
        table.add_column(column)
    accuracy = sweep.dense_test_accuracy
    table.add_row(
        "dense",
        "0",
        "-" if accuracy is None else f"{accuracy:.4f}",
        f"{sweep.dense_test_loss:.4g}",
        "-",
    )
    for p in sweep.points:
        table.add_row(
            p.method,
            f"{p.achieved:.3f}",
            "-" if p.test_accuracy is None else f"{p.test_accuracy:.4f}",
            f"{p.test_loss:.4g}",
            f"{p.seconds:.2f}",
        )
    console = Console(file=stream)
    console.print(table)
    console.print(f"report: {Path(out) / 'index.html'}")
