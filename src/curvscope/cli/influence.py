"""The body of ``curvscope influence``: load (as ``analyze`` does), explain, save, summarise."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from curvscope.cli import loading
from curvscope.report.influence_example import noisy_digits_example
from curvscope.report.influence_report import influence_report

CURVATURES = ("ggn", "hessian", "fisher", "kfac", "ekfac", "diagonal", "identity")
SOLVERS = ("auto", "exact", "cg", "lowrank", "lissa")


def _check_options(curvature, solver, damping, num_test, top, flip_fraction, max_batch_size):
    loading.resolve_choice(curvature, CURVATURES, "--curvature")
    loading.resolve_choice(solver, SOLVERS, "--solver")
    if damping is not None and not (math.isfinite(damping) and damping >= 0):
        raise loading.BadInputError(f"--damping {damping}: expected a number >= 0.")
    if num_test < 1:
        raise loading.BadInputError(f"--num-test {num_test}: expected an integer >= 1.")
    if max_batch_size is not None and max_batch_size < 1:
        raise loading.BadInputError(f"--max-batch-size {max_batch_size}: expected an integer >= 1.")
    if top < 1:
        raise loading.BadInputError(f"--top {top}: expected an integer >= 1.")
    if not 0.0 <= flip_fraction < 1.0:
        raise loading.BadInputError(
            f"--flip-fraction {flip_fraction}: expected a number in [0, 1)."
        )


def _first_examples(batches: list[Any], count: int) -> tuple[Any, Any]:
    """The first ``count`` examples of the batches, as one (inputs, targets) batch."""
    inputs, targets, have = [], [], 0
    for x, y in batches:
        take = min(count - have, len(y))
        inputs.append(x[:take])
        targets.append(y[:take])
        have += take
        if have >= count:
            break
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise loading.BadInputError(
            "--test-data is needed when inputs are not plain tensors (tuples or dicts)."
        )
    return torch.cat(inputs), torch.cat(targets)


def _load_user(options: dict[str, Any], dtype, device) -> dict[str, Any]:
    model, data, test_data = options["model"], options["data"], options["test_data"]
    network, batches = loading.load_user(
        model, options["checkpoint"], data, dtype=dtype, device=device
    )
    loss_fn = loading.resolve_loss(options["loss"])
    loading.check_batches(network, loss_fn, batches)
    if test_data is None:
        test = _first_examples(batches, options["num_test"])
    else:
        _, test_batches = loading.prepare(
            network, loading.load_data(test_data), dtype=dtype, device=device
        )
        loading.check_batches(network, loss_fn, test_batches)
        test = _first_examples(test_batches, options["num_test"])
    return {"model": network, "loss_fn": loss_fn, "train_data": batches, "test_data": test}


def _built_in(options: dict[str, Any], dtype, device, show: bool) -> dict[str, Any]:
    if options["checkpoint"] is not None:
        raise loading.BadInputError("--checkpoint needs --model (and --data).")
    if options["test_data"] is not None:
        raise loading.BadInputError("--test-data needs --model and --data.")
    if show:
        print("curvscope: training the digits MLP on partly flipped labels ...", file=sys.stderr)
    example = noisy_digits_example(
        seed=options["seed"], flip_fraction=options["flip_fraction"], dtype=dtype, device=device
    )
    inputs, labels = example.test
    count = min(options["num_test"], len(labels))
    return {
        "model": example.model,
        "loss_fn": example.loss_fn,
        "train_data": example.train,
        "test_data": (inputs[:count], labels[:count]),
        "flipped": example.flipped if len(example.flipped) else None,
        "clean_labels": example.clean_labels,
    }


def run(**options: Any) -> None:
    """Run ``curvscope influence`` with the parsed command-line options."""
    loading.use_working_directory()
    show = not options["quiet"]
    _check_options(
        options["curvature"], options["solver"], options["damping"], options["num_test"],
        options["top"], options["flip_fraction"], options["max_batch_size"],
    )  # fmt: skip
    dtype = loading.resolve_dtype(options["dtype"])
    device = loading.resolve_device(options["device"])
    start = time.perf_counter()
    if options["model"] is None and options["data"] is None:
        inputs = _built_in(options, dtype, device, show)
    else:
        inputs = _load_user(options, dtype, device)
    setup = time.perf_counter() - start
    params = loading.resolve_params(inputs["model"], options["params"])
    report = influence_report(
        **inputs, curvature=options["curvature"], solver=options["solver"],
        damping=options["damping"], params=params, top=options["top"],
        max_batch_size=options["max_batch_size"], seed=options["seed"], progress=show,
    )  # fmt: skip
    start = time.perf_counter()
    report.save(options["out"])
    rendering = time.perf_counter() - start
    if options["json_output"]:
        print(report.to_json())
    if show:
        stream = sys.stderr if options["json_output"] else sys.stdout
        _summary(report, Path(options["out"]), setup, rendering, stream)


def _summary(report: Any, out: Path, setup: float, rendering: float, stream: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream)
    table = Table(title=f"curvscope influence: {report.model}", show_header=False)
    table.add_row("parameters / training examples", f"{report.num_params:,} / {report.num_train:,}")
    choice = f"{report.curvature} / {report.solver} / {report.damping:.3g}"
    table.add_row("curvature / solver / damping", choice)
    for ex in report.examples[:4]:
        helpful = ", ".join(f"{t.index} ({t.score:+.2g})" for t in ex.helpful[:3])
        table.add_row(f"test #{ex.index} most helpful", helpful)
    if report.num_flipped is not None:
        found = report.flipped_in_top(report.num_flipped)
        table.add_row(
            "flipped labels found",
            f"{found} of {report.num_flipped} in the top {report.num_flipped} by self-influence "
            f"(AUC {report.flipped_auc:.3f})",
        )
    table.add_row(
        "time", f"setup {setup:.2f}s, influence {report.seconds:.2f}s, rendering {rendering:.2f}s"
    )
    table.add_row("products", f"{report.num_matvecs:,}")
    table.add_row("report", str(out / "index.html"))
    console.print(table)
