"""Issue 10: structured curvature (KFAC, EKFAC, the exact GGN diagonal, block diagonals).

- KFAC/EKFAC construction (one pass for the factors, a second for EKFAC's eigenvalues) and an
  inverse-vector product against curvlinops' KFACLinearOperator/EKFACLinearOperator and
  KFACInverseLinearOperator (type-2 Fisher, expand, weight and bias joint, exact damping).
- The exact GGN diagonal against BackPACK's DiagGGNExact (nn.Sequential models) and against
  Hutchinson's estimate with the same wall time.
- The quality of each approximation against the exact GGN on small models (float64).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn

import curvscope

from . import models, peers
from .harness import Config, Table, memory_variants, mib, ms, ratio, time_variants

DAMPING = 1e-3


def _layer_params(problem: models.Problem) -> list[str]:
    """KFAC's parameters: every trainable one but attention's (which neither library supports);
    for the transformer, curvlinops supports Linear layers only, so both get those."""
    names = [n for n, p in problem.model.named_parameters() if p.requires_grad]
    if problem.name == "transformer":
        return [n for n in names if ".linear" in n or n.startswith("head.")]
    return names


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ours(problem: models.Problem, cls: type, names: list[str]) -> Callable[[], object]:
    def build() -> object:
        op = cls(problem.model, problem.loss_fn, problem.batches, params=names)
        op @ torch.zeros(op.shape[0], dtype=op.dtype)  # computes the factors (and corrections)
        return op

    return build


def _theirs(problem: models.Problem, cls_name: str, names: list[str]) -> Callable[[], object]:
    def build() -> object:
        import curvlinops

        named = dict(problem.model.named_parameters())
        op = getattr(curvlinops, cls_name)(
            problem.model,
            problem.loss_fn,
            [named[n] for n in names],
            problem.batches,
            fisher_type="type-2",
            kfac_approx="expand",
            separate_weight_and_bias=False,
        )
        op @ torch.zeros(op.shape[1], dtype=named[names[0]].dtype)
        return op

    return build


def kfac_case(cfg: Config, problem: models.Problem) -> Table:
    names = _layer_params(problem)
    size = sum(dict(problem.model.named_parameters())[n].numel() for n in names)
    table = Table(
        f"{problem.name}: KFAC over {size:,} parameters ({len(names)} tensors), "
        f"{problem.num_examples:,} examples (float32)",
        ["variant", "time (ms)", "time / gradient", "peak memory (MiB)", "rel. diff", "repeats"],
    )
    variants: dict[str, Callable] = {"plain gradient (the unit)": lambda: models.gradient(problem)}
    pairs = [("KFAC", curvscope.KFACOperator, "KFACLinearOperator")]
    pairs.append(("EKFAC", curvscope.EKFACOperator, "EKFACLinearOperator"))
    v = torch.randn(size, generator=torch.Generator().manual_seed(0))
    diffs: dict[str, float] = {}
    curvlinops_ok = peers.runnable("curvlinops")
    built: dict[str, object] = {}
    for label, cls, theirs in pairs:
        variants[f"curvscope {label}Operator: construction"] = _ours(problem, cls, names)
        built[label] = variants[f"curvscope {label}Operator: construction"]()
        if curvlinops_ok:
            variants[f"curvlinops {theirs}: construction"] = _theirs(problem, theirs, names)
            built[theirs] = variants[f"curvlinops {theirs}: construction"]()
            diffs[f"curvlinops {theirs}: construction"] = _rel(
                torch.as_tensor(built[theirs] @ v), built[label] @ v
            )
    inverse = built["KFAC"].inverse(DAMPING)
    variants[f"curvscope KFAC inverse(damping={DAMPING}) @ v"] = lambda: inverse @ v
    if curvlinops_ok:
        from curvlinops import KFACInverseLinearOperator

        their_inverse = KFACInverseLinearOperator(
            built["KFACLinearOperator"], damping=DAMPING, use_exact_damping=True
        )
        label = f"curvlinops KFACInverseLinearOperator(exact damping {DAMPING}) @ v"
        variants[label] = lambda: their_inverse @ v
        diffs[label] = _rel(torch.as_tensor(their_inverse @ v), inverse @ v)
    times = time_variants(variants, cfg)
    memory = memory_variants({k: f for k, f in variants.items() if "construction" in k})
    unit = times["plain gradient (the unit)"].median
    for label, timing in times.items():
        peak = memory.get(label)
        table.add(
            label,
            ms(timing.median),
            ratio(timing.median, unit),
            mib(peak) if peak is not None else "-",
            diffs.get(label),
            timing.repeats,
        )
    _kfac_verdicts(table, times, memory, curvlinops_ok)
    table.notes.append(
        "construction: the operator built and its first product (curvscope computes the factors "
        "lazily on first use, curvlinops too); both check determinism (two passes of forward "
        "passes) by default. rel. diff: ||K_peer v - K_curvscope v|| / ||K_curvscope v||."
    )
    return table


def _kfac_verdicts(table: Table, times: dict, memory: dict, curvlinops_ok: bool) -> None:
    if not curvlinops_ok:
        table.notes.append("curvlinops is not runnable here: no comparison.")
        return
    for ours, theirs in [
        ("curvscope KFACOperator: construction", "curvlinops KFACLinearOperator: construction"),
        ("curvscope EKFACOperator: construction", "curvlinops EKFACLinearOperator: construction"),
    ]:
        r = times[ours].median / times[theirs].median
        name = ours.split(":")[0]
        table.check(f"{name} construction time <= 1.0x curvlinops", f"{r:.2f}x", r <= 1)
        m = ratio(memory[ours], memory[theirs])
        tiny = not min(memory[ours], memory[theirs]) >= 2**20  # also nan
        table.check(
            f"{name} construction memory <= 1.0x curvlinops",
            f"{m:.2f}x",
            None if tiny else m <= 1.0,
            "a peak under 1 MiB is below what the resident-set measurement resolves"
            if tiny
            else "",
        )
    ours = next(k for k in times if k.startswith("curvscope KFAC inverse"))
    theirs = next(k for k in times if k.startswith("curvlinops KFACInverse"))
    r = times[ours].median / times[theirs].median
    table.check("KFAC inverse-vector product <= 1.0x curvlinops", f"{r:.2f}x", r <= 1)


# -- the exact GGN diagonal ---------------------------------------------------------------------
def _sequential(problem: models.Problem) -> nn.Module | None:
    model = problem.model
    if isinstance(model, nn.Sequential):
        return model
    if isinstance(model, models.SmallCNN):
        return nn.Sequential(*model.features, model.head)
    return None


def _backpack_diagonal(model: nn.Module, problem: models.Problem) -> Callable[[], torch.Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    extended, loss_fn = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())
    total = problem.num_examples

    def run() -> torch.Tensor:
        out = [torch.zeros_like(p) for p in extended.parameters()]
        for inputs, targets in problem.batches:
            loss = loss_fn(extended(inputs), targets)
            with backpack(DiagGGNExact()):
                loss.backward()
            for o, p in zip(out, extended.parameters(), strict=True):
                o += p.diag_ggn_exact * (len(targets) / total)
                p.grad = None
        return torch.cat([o.reshape(-1) for o in out])

    return run


def diagonal_case(cfg: Config, problem: models.Problem) -> Table:
    sequential = _sequential(problem)
    model = sequential if sequential is not None else problem.model
    table = Table(
        f"{problem.name}: exact GGN diagonal, {problem.num_params:,} parameters (float32)",
        ["variant", "time (ms)", "time / gradient", "peak memory (MiB)", "rel. error", "repeats"],
    )
    args = (model, problem.loss_fn, problem.batches)

    def ours() -> torch.Tensor:
        return curvscope.GGNDiagonalOperator(*args) @ torch.ones(problem.num_params)

    exact = ours()
    variants: dict[str, Callable] = {
        "plain gradient (the unit)": lambda: models.gradient(problem),
        "curvscope GGNDiagonalOperator (construction)": ours,
    }
    errors: dict[str, float] = {}
    backpack_label = "BackPACK DiagGGNExact (one pass)"
    if sequential is not None and peers.runnable("BackPACK"):
        variants[backpack_label] = _backpack_diagonal(sequential, problem)
        errors[backpack_label] = _rel(variants[backpack_label](), exact)
    times = time_variants(variants, cfg)
    memory = memory_variants(variants)
    unit = times["plain gradient (the unit)"].median
    for label, timing in times.items():
        table.add(
            label,
            ms(timing.median),
            ratio(timing.median, unit),
            mib(memory[label]),
            errors.get(label),
            timing.repeats,
        )
    ours_t = times["curvscope GGNDiagonalOperator (construction)"].median
    if backpack_label in times:
        r = ours_t / times[backpack_label].median
        table.check("exact GGN diagonal time <= 1.0x BackPACK DiagGGNExact", f"{r:.2f}x", r <= 1)
    else:
        table.notes.append("BackPACK needs nn.Sequential (or is not runnable): no comparison.")
    _equal_time_estimates(table, args, exact, ours_t)
    return table


def _equal_time_estimates(table: Table, args: tuple, exact: torch.Tensor, budget_s: float) -> None:
    """Hutchinson's and XDiag's diagonal from as many GGN products as fit in ``budget_s``."""
    if not budget_s == budget_s:  # the memory child times nothing
        return
    ggn = curvscope.GGNOperator(*args)
    v = torch.ones(ggn.shape[0], dtype=ggn.dtype)
    ggn @ v
    start = time.perf_counter()
    for _ in range(3):
        ggn @ v
    per_product = (time.perf_counter() - start) / 3
    budget = max(4, int(budget_s / per_product) // 2 * 2)
    for method in ("hutchinson", "xdiag"):
        start = time.perf_counter()
        estimate = curvscope.diagonal(ggn, method=method, num_matvecs=budget, seed=0)
        elapsed = time.perf_counter() - start
        table.add(
            f"curvscope.diagonal(GGN, {method}, {budget} products): same time",
            ms(elapsed),
            "-",
            "-",
            _rel(estimate.value, exact),
            1,
        )
    table.notes.append(
        f"rel. error: ||d - d_exact|| / ||d_exact|| against the GGNDiagonalOperator's diagonal; "
        f"the estimators get as many GGN products as fit in its time ({per_product * 1e3:.1f} "
        "ms per product)."
    )


# -- the cases ----------------------------------------------------------------------------------
def _problems(cfg: Config) -> list[models.Problem]:
    return [
        models.digits(batch_size=256),
        models.cnn(num_images=cfg.n(1024, 256)),
        models.transformer(num_sequences=cfg.n(512, 128)),
    ]


def _resnet_note(tables: list[Table]) -> list[Table]:
    if not any("resnet" in name.lower() for name in dir(models)):
        tables[-1].notes.append(
            "The ResNet-18-sized CNN is not in bench/models.py in this tree: not measured."
        )
    return tables


def kfac_cases(cfg: Config) -> list[Table]:
    return _resnet_note([kfac_case(cfg, problem) for problem in _problems(cfg)])


def diagonal_cases(cfg: Config) -> list[Table]:
    return _resnet_note([diagonal_case(cfg, problem) for problem in _problems(cfg)])


def quality_cases(cfg: Config) -> list[Table]:
    from .structured_quality import quality_case

    small = [models.digits(batch_size=256), models.cnn(num_images=cfg.n(64, 32), batch_size=32)]
    return [quality_case(cfg, problem) for problem in small]


CASES = [
    ("structured/kfac", "Issue 10: KFAC and EKFAC against curvlinops", kfac_cases, True),
    ("structured/diagonal", "Issue 10: the exact GGN diagonal", diagonal_cases, True),
    ("structured/quality", "Issue 10: approximations vs the exact GGN", quality_cases, False),
]
