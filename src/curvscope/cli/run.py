"""The body of ``curvscope analyze``: load, analyse, save (rank 0 only), summarise."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import curvscope
from curvscope.cli import loading
from curvscope.report.digits import digits_held_out

#: Batch size of the built-in example in the command.
BUILT_IN_BATCH_SIZE = 2048
#: Digits the built-in example holds out of training for the Uncertainty section.
BUILT_IN_HELD_OUT = 360


def run(**options: Any) -> None:
    """Run the analysis described by the command-line options (see ``curvscope analyze``).

    Under ``torchrun`` every rank joins the process group first and leaves it at the end, also
    on failure (a rank that exits with the group alive can abort while shutting down).
    """
    loading.use_working_directory()
    main = _start_distributed()
    try:
        _analyze(main=main, **options)
    finally:
        curvscope.shutdown_distributed()


def _analyze(
    *,
    main: bool,
    model: str | None,
    checkpoint: Path | None,
    data: str | None,
    loss: str,
    curvature: str,
    params: str | None,
    top_k: int,
    bottom_k: int,
    trace_matvecs: int,
    no_density: bool,
    no_landscape: bool,
    held_out_data: str | None,
    no_uncertainty: bool,
    device: str,
    dtype: str,
    seed: int,
    out: Path,
    json_output: bool,
    quiet: bool,
) -> None:
    show = main and not quiet
    loading.resolve_choice(curvature, ("hessian", "ggn", "fisher"), "--curvature")
    torch_dtype = loading.resolve_dtype(dtype)
    torch_device = loading.resolve_device(device)
    loss_fn = loading.resolve_loss(loss)
    start = time.perf_counter()
    if model is None and data is None:
        if checkpoint is not None:
            raise loading.BadInputError("--checkpoint needs --model (and --data).")
        if show:
            print("curvscope: training the built-in digits example ...", file=sys.stderr)
        # one batch of all 1,797 digits: a product is then one pass (the fastest on a CPU)
        network, loss_fn, batches = curvscope.digits_example(
            seed=seed, batch_size=BUILT_IN_BATCH_SIZE, dtype=torch_dtype, device=torch_device,
            held_out=BUILT_IN_HELD_OUT,
        )  # fmt: skip
        held_out = digits_held_out(BUILT_IN_HELD_OUT, dtype=torch_dtype, device=torch_device)
        first_step = "training"
    else:
        network, batches = loading.load_user(
            model, checkpoint, data, dtype=torch_dtype, device=torch_device
        )
        loading.check_batches(network, loss_fn, batches)
        held_out = None
        if held_out_data is not None and not no_uncertainty:
            held = loading.load_data(held_out_data, option="--held-out-data")
            _, held_out = loading.prepare(network, held, dtype=torch_dtype, device=torch_device)
        first_step = "loading"
    # under torchrun each rank analyses its own shard (one batch is split by examples)
    batches = [curvscope.shard(batches[0])] if len(batches) == 1 else curvscope.shard(batches)
    setup_seconds = time.perf_counter() - start
    report = curvscope.analyze(
        network,
        loss_fn,
        batches,
        curvature=curvature,
        params=loading.resolve_params(network, params),
        top_k=top_k,
        bottom_k=bottom_k,
        trace_matvecs=trace_matvecs,
        density=not no_density,
        landscape=not no_landscape,
        seed=seed,
        progress=show,
        held_out=held_out,
        uncertainty=not no_uncertainty,
    )
    start = time.perf_counter()
    if main:
        report.save(out)
    timings = [(first_step, setup_seconds), *[(s.name, s.seconds) for s in report.steps]]
    timings.append(("rendering", time.perf_counter() - start))
    if main and json_output:
        print(report.to_json())
    if show:
        _summary(report, out, timings, stream=sys.stderr if json_output else sys.stdout)


def _start_distributed() -> bool:
    """Join the process group under torchrun (a no-op otherwise); True on the one writer.

    The RANK variable set by torchrun is checked too, so that a run whose process group is not
    initialised still has one writer.
    """
    curvscope.init_distributed()
    return curvscope.is_main_process() and os.environ.get("RANK", "0") == "0"


def _summary(report: Any, out: Path, timings: list[tuple[str, float]], *, stream: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream)
    table = Table(title=f"curvscope: {report.model}, {report.curvature}", show_header=False)
    top = [float(x) for x in report.top.values]
    table.add_row("parameters / examples", f"{report.num_params:,} / {report.num_examples:,}")
    table.add_row("loss / gradient norm", f"{report.loss:.4g} / {report.gradient_norm:.3g}")
    table.add_row("largest eigenvalues", ", ".join(f"{x:.4g}" for x in top))
    if report.bottom is not None:
        table.add_row(
            "smallest eigenvalues", ", ".join(f"{float(x):.3g}" for x in report.bottom.values)
        )
    trace = report.trace
    table.add_row("trace", f"{trace.value:.4g} [{trace.ci_low:.4g}, {trace.ci_high:.4g}]")
    for key, text in report.interpretation.items():
        table.add_row(key, text)
    if report.uncertainty is not None:
        metrics = report.uncertainty.metrics
        table.add_row(
            "uncertainty (test NLL)",
            ", ".join(
                f"{label} {metrics[key]['nll']:.4g}"
                for key, label in [
                    ("trained", "trained"),
                    ("laplace_evidence", "Laplace/evidence"),
                    ("laplace_validation", "Laplace/validation"),
                ]
            ),
        )
    table.add_row("products", f"{report.num_matvecs:,}")
    table.add_row("time by step", ", ".join(f"{name} {sec:.2f}s" for name, sec in timings))
    table.add_row("report", str(Path(out) / "index.html"))
    console.print(table)
