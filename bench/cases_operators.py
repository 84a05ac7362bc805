"""Issue 3: per-product cost of the curvature operators against a gradient and the peers."""

from __future__ import annotations

from collections.abc import Callable

import torch

import curvscope

from . import models, peers
from .distributed import distributed_case
from .harness import Config, Table, memory_variants, mib, ms, ratio, time_variants

BLOCK = 16
KINDS = ("Hessian", "GGN")


def _curvscope_ops(problem: models.Problem) -> dict[str, object]:
    args = (problem.model, problem.loss_fn, problem.batches)
    ops: dict[str, object] = {}
    if hasattr(curvscope, "HessianOperator"):
        ops["Hessian"] = curvscope.HessianOperator(*args)
    if hasattr(curvscope, "GGNOperator"):
        ops["GGN"] = curvscope.GGNOperator(*args)
    if hasattr(curvscope, "FisherOperator"):
        ops["Fisher"] = curvscope.FisherOperator(*args, kind="empirical")
    return ops


def _peer_products(problem: models.Problem) -> dict[str, Callable]:
    """Peer name -> flat product; a peer that fails to build is reported by the exception."""
    builders = {
        "PyHessian dataloader HVP": ("PyHessian", lambda: peers.pyhessian_hvp(problem)),
        "curvlinops HessianLinearOperator": (
            "curvlinops",
            lambda: peers.curvlinops_product(problem, "hessian"),
        ),
        "curvlinops GGNLinearOperator": (
            "curvlinops",
            lambda: peers.curvlinops_product(problem, "ggn"),
        ),
        "hessian-eigenthings HessianOperator": (
            "hessian-eigenthings",
            lambda: peers.eigenthings_product(problem, "hessian"),
        ),
        "hessian-eigenthings GGNOperator": (
            "hessian-eigenthings",
            lambda: peers.eigenthings_product(problem, "ggn"),
        ),
    }
    out = {}
    for label, (peer, build) in builders.items():
        if not peers.runnable(peer):
            out[label] = RuntimeError(f"{peer} not runnable: {peers.availability()[peer][1]}")
            continue
        try:
            out[label] = build()
        except Exception as error:  # a peer that cannot handle this model is reported
            out[label] = error
    return out


def _bind(fn: Callable, *args) -> Callable[[], object]:
    return lambda: fn(*args)


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def _rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.detach() - reference).norm() / reference.norm())


def operator_case(cfg: Config, problem: models.Problem) -> Table:
    """Time and peak memory per product of every operator and peer on one problem."""
    table = Table(
        f"{problem.name}: {problem.num_params:,} parameters, {problem.num_examples:,} examples "
        f"in {len(problem.batches)} batches (float32)",
        [
            *("product", "time (ms)", "time / gradient", "peak memory (MiB)"),
            *("memory / gradient", "rel. diff to reference", "repeats"),
        ],
    )
    ops = _curvscope_ops(problem)
    size = problem.num_params
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(size, generator=generator)
    k = BLOCK if problem.num_params < 5000 else 4
    block = torch.randn(size, k, generator=generator)
    variants: dict[str, Callable] = {"plain gradient (the unit)": lambda: models.gradient(problem)}
    references = {kind: models.reference_product(problem, v, kind.lower()) for kind in KINDS}
    errors: dict[str, object] = {}
    for name, op in list(ops.items()):
        try:
            result = op.matvec(v)
        except Exception as error:  # report a failing operator, keep measuring the others
            table.add(f"curvscope {name}Operator", *["failed"] * 4, _short(error), "-")
            del ops[name]
            continue
        if name in references:
            errors[f"curvscope {name}Operator @ v"] = _rel_error(result, references[name])
    per_vector: dict[str, int] = {}
    for name, op in ops.items():
        variants[f"curvscope {name}Operator @ v"] = _bind(op.matvec, v)
        blocked = f"curvscope {name}Operator @ V, per vector in a block of {k}"
        variants[blocked] = _bind(op.matmat, block)
        per_vector[blocked] = k
    for label, product in _peer_products(problem).items():
        if isinstance(product, Exception):
            table.add(label, *["not runnable"] * 4, f"{type(product).__name__}: {product}", "-")
            continue
        try:
            result = product(v)
        except Exception as error:  # a peer that fails on this model is reported
            table.add(label, *["failed"] * 4, _short(error), "-")
            continue
        kind = "GGN" if "GGN" in label else "Hessian"
        errors[label] = _rel_error(result, references[kind])
        variants[label] = _bind(product, v)
    times = time_variants(variants, cfg)
    memory = memory_variants({n: fn for n, fn in variants.items() if n not in per_vector})
    grad_t = times["plain gradient (the unit)"].median
    grad_m = memory["plain gradient (the unit)"] or float("nan")
    for label, timing in times.items():
        k = per_vector.get(label, 1)
        table.add(
            label,
            ms(timing.median / k),
            ratio(timing.median / k, grad_t),
            mib(memory[label]) if k == 1 else "-",
            ratio(memory[label], grad_m) if k == 1 else "-",
            errors.get(label),
            timing.repeats,
        )
    _verdicts(table, times, memory, errors, grad_t, grad_m)
    return table


def _verdicts(table, times, memory, errors, grad_t, grad_m) -> None:
    def med(label: str) -> float:
        return times[label].median

    hess, ggn = "curvscope HessianOperator @ v", "curvscope GGNOperator @ v"
    if hess in times:
        t, m = med(hess) / grad_t, memory[hess] / grad_m
        table.check("Hessian product <= 3x a gradient in time", f"{t:.2f}x", t <= 3.0)
        tiny = not grad_m >= 2**20  # also when the peak was too small to see (nan)
        table.check(
            "Hessian product <= 2.5x a gradient in memory",
            f"{m:.2f}x",
            None if tiny else m <= 2.5,
            "the gradient's peak is under 1 MiB, too small for a resident-set ratio to mean much"
            if tiny
            else "",
        )
    if ggn in times:
        t = med(ggn) / grad_t
        table.check("GGN product <= 2x a gradient in time", f"{t:.2f}x", t <= 2.0)
    for kind, ours in [("Hessian", hess), ("GGN", ggn)]:
        fair = [
            label
            for label in times
            if label.startswith(("PyHessian", "curvlinops", "hessian-eigenthings"))
            and ("GGN" in label) == (kind == "GGN")
            and errors.get(label) is not None
            and errors[label] < 1e-3
        ]
        if ours not in times or not fair:
            continue
        fastest = min(fair, key=med)
        r = med(fastest) / med(ours)
        table.check(
            f"{kind} product no slower than the fastest correct peer",
            f"{fastest} / curvscope = {r:.2f}x",
            r >= 1.0,
            "slower than that peer for one vector (see the per-vector cost in a block)",
        )
    wrong = [label for label, e in errors.items() if e is not None and e >= 1e-3]
    for label in wrong:
        table.notes.append(
            f"{label} differs from the exact product by {errors[label]:.2e} (relative): it is "
            "not the same matrix (see the peer notes)."
        )


def operator_cases(cfg: Config) -> list[Table]:
    problems = [
        models.digits(batch_size=256),
        models.cnn(num_images=cfg.n(1024, 256)),
        models.transformer(num_sequences=cfg.n(512, 128)),
    ]
    tables = [operator_case(cfg, problem) for problem in problems]
    tables[0].notes.append(
        "hessian-eigenthings averages the per-batch means with equal weights, so with 1,797 "
        "examples in batches of 256 (the last holds 5) its operator is not the Hessian of the "
        "dataset loss; curvscope, PyHessian and curvlinops weight by batch size."
    )
    for table in tables:
        table.notes.append(
            "rel. diff to reference: ||Av - A_ref v|| / ||A_ref v|| for one random v, where "
            "A_ref v is computed by plain double backward on the whole dataset as a single batch "
            "(float32 round-off is ~1e-6)."
        )
    return tables


CASES = [
    ("operators/products", "Issue 3: one product of each curvature operator", operator_cases, True),
    ("operators/distributed", "Issue 3: one and two processes", distributed_case, False),
]
