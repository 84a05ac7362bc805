"""Issue 13: second-order training and sharpness tracking.

Loss against epochs and wall time on the digits MLP classifier and a digits autoencoder for
SGD with momentum, Adam, L-BFGS, HessianFree, SGD + KFACPreconditioner and ASDL's KFAC; the
KFAC preconditioner's per-step overhead; and the SharpnessTracker's cost per record against a
cold ``eigenvalues`` call and the ``scipy.sparse.linalg.eigsh`` loop of the edge-of-stability
code (Cohen et al., 2021), which restarts from scratch with eigsh's default tolerance.

Epochs count passes of the optimiser over the training data (one HessianFree or minibatch
step per batch; one full-batch evaluation per L-BFGS function call); HessianFree's CG products
are reported separately. The losses are full-data losses after each epoch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import nn

import curvscope
from curvscope.optim import HessianFree, KFACPreconditioner
from curvscope.report.digits import digits_mlp, load_digits

from .harness import Config, Table, ratio, time_variants

BATCH = 256


# -- problems ----------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    build: Callable[[], nn.Module]
    loss_fn: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_type: str  # for ASDL: "cross_entropy" or "mse"

    def batches(self, epoch: int, size: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.targets), generator=torch.Generator().manual_seed(epoch))
        return [
            (self.inputs[order[i : i + size]], self.targets[order[i : i + size]])
            for i in range(0, len(order), size)
        ]

    @torch.no_grad()
    def full_loss(self, model: nn.Module) -> float:
        return float(self.loss_fn(model(self.inputs), self.targets))


def _autoencoder() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 8), nn.Tanh(),
            nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 64),
        )  # fmt: skip


def tasks() -> list[Task]:
    inputs, labels = load_digits()
    return [
        Task("digits MLP classifier (2,410 params)", lambda: digits_mlp(seed=0),
             nn.CrossEntropyLoss(), inputs, labels, "cross_entropy"),
        Task("digits autoencoder 64-32-8-32-64 (5,064 params)", _autoencoder, nn.MSELoss(),
             inputs, inputs, "mse"),
    ]  # fmt: skip


# -- training methods: each returns a per-epoch runner ------------------------------------------
def _first_order(make: Callable) -> Callable:
    def run(task: Task, model: nn.Module, epoch: int) -> int:
        opt = run.opt = getattr(run, "opt", None) or make(model.parameters())
        for x, y in task.batches(epoch):
            opt.zero_grad()
            task.loss_fn(model(x), y).backward()
            opt.step()
        return 0

    return run


def _sgd(lr: float):
    return lambda: _first_order(lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9))


def _adam(lr: float):
    return lambda: _first_order(lambda p: torch.optim.Adam(p, lr=lr))


def _lbfgs():
    def make() -> Callable:
        def run(task: Task, model: nn.Module, epoch: int) -> int:
            if not hasattr(run, "opt"):
                run.opt = torch.optim.LBFGS(
                    model.parameters(), lr=1.0, max_iter=1, history_size=20,
                    line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0,
                )  # fmt: skip
            calls = [0]

            def closure():
                calls[0] += 1
                run.opt.zero_grad()
                loss = task.loss_fn(model(task.inputs), task.targets)
                loss.backward()
                return loss

            run.opt.step(closure)
            run.extra_epochs = calls[0] - 1  # each function evaluation is a pass over the data
            return 0

        return run

    return make


def _hessian_free(batch: int = 512):
    def make() -> Callable:
        def run(task: Task, model: nn.Module, epoch: int) -> int:
            if not hasattr(run, "opt"):
                run.opt = HessianFree(model, task.loss_fn, max_cg_iters=50)
            return sum(run.opt.step(b).num_matvecs for b in task.batches(epoch, batch))

        return run

    return make


def _kfac(lr: float, damping: float):
    def make() -> Callable:
        def run(task: Task, model: nn.Module, epoch: int) -> int:
            if not hasattr(run, "opt"):
                run.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
                run.pre = KFACPreconditioner(model, task.loss_fn, damping=damping, update_every=10)
            for x, y in task.batches(epoch):
                run.opt.zero_grad()
                task.loss_fn(model(x), y).backward()
                run.pre.step((x, y))
                run.opt.step()
            return 0

        return run

    return make


def _asdl_available() -> tuple[bool, str]:
    try:
        with _no_nvtx():
            import asdl
        try:
            return True, importlib.metadata.version("asdl")
        except importlib.metadata.PackageNotFoundError:
            return True, getattr(asdl, "__version__", "unknown version")
    except Exception as error:  # not installed or broken: reported, not fatal
        return False, f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def _no_nvtx():
    """ASDL 0.1 calls torch.cuda.nvtx.range_push/pop unconditionally, which raise on CPU
    builds; while ASDL runs (only then) they are no-ops. Nothing else of ASDL is changed."""
    nvtx = torch.cuda.nvtx
    saved = nvtx.range_push, nvtx.range_pop
    nvtx.range_push, nvtx.range_pop = (lambda *a, **k: 0), (lambda *a, **k: 0)
    try:
        yield
    finally:
        nvtx.range_push, nvtx.range_pop = saved


def _asdl_kfac(lr: float, damping: float):
    def make() -> Callable:
        def run(task: Task, model: nn.Module, epoch: int) -> int:
            from asdl import KfacGradientMaker, PreconditioningConfig

            if not hasattr(run, "opt"):
                run.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
                config = PreconditioningConfig(
                    data_size=BATCH, damping=damping, curvature_upd_interval=10,
                    preconditioner_upd_interval=10, ema_decay=0.05,
                )  # fmt: skip
                run.maker = KfacGradientMaker(
                    model, config, fisher_type="fisher_mc", loss_type=task.loss_type
                )
            with _no_nvtx():
                for x, y in task.batches(epoch):
                    run.opt.zero_grad()
                    dummy = run.maker.setup_model_call(model, x)
                    run.maker.setup_loss_call(task.loss_fn, dummy, y)
                    run.maker.forward_and_backward()
                    run.opt.step()
            return 0

        return run

    return make


@dataclass
class Curve:
    """Full-data loss after each epoch (index 0: before training) and cumulative seconds."""

    losses: list[float]
    seconds: list[float]
    products: int = 0

    def epochs_to(self, level: float) -> float | None:
        """Epochs until the loss first reaches ``level`` (None if never)."""
        for epoch, loss in enumerate(self.losses):
            if loss <= level:
                return float(epoch)
        return None

    def seconds_to(self, level: float) -> float | None:
        epoch = self.epochs_to(level)
        return None if epoch is None else self.seconds[int(epoch)]


def train(task: Task, make: Callable[[], Callable], epochs: int) -> Curve:
    """Train a fresh model for ``epochs`` passes; L-BFGS counts its extra evaluations."""
    model = task.build()
    run = make()
    losses, seconds, products, elapsed, epoch = [task.full_loss(model)], [0.0], 0, 0.0, 0
    while len(losses) <= epochs:
        start = time.perf_counter()
        products += run(task, model, epoch)
        elapsed += time.perf_counter() - start
        epoch += 1
        loss = task.full_loss(model)
        for _ in range(1 + getattr(run, "extra_epochs", 0)):
            losses.append(loss if math.isfinite(loss) else float("inf"))
            seconds.append(elapsed)
    return Curve(losses[: epochs + 1], seconds[: epochs + 1], products)


#: Per task: method -> factory; learning rates and damping chosen by a small grid on this
#: machine (Adam 1e-3/3e-3/1e-2; SGD 0.1/0.3/0.5; KFAC lr 0.01-0.1 x damping 1e-3-1e-1; ASDL
#: lr 1e-3-3e-2 x damping 1e-3-1e-1), the best final loss of each kept.
def _methods(task_index: int, asdl_ok: bool) -> dict[str, Callable[[], Callable]]:
    sgd_lr, asdl_lr = (0.3, 0.03) if task_index == 0 else (0.5, 0.001)
    methods = {
        f"SGD + momentum 0.9 (lr {sgd_lr})": _sgd(sgd_lr),
        "Adam (lr 1e-2)": _adam(1e-2),
        "L-BFGS (full batch, strong Wolfe)": _lbfgs(),
        "curvscope HessianFree (GGN, batch 512)": _hessian_free(512),
        "SGD + curvscope KFACPreconditioner (lr 0.03, λ 1e-2)": _kfac(0.03, 1e-2),
    }
    if asdl_ok:
        methods[f"SGD + ASDL KfacGradientMaker (lr {asdl_lr}, λ 1e-2)"] = _asdl_kfac(asdl_lr, 1e-2)
    return methods


def training_cases(cfg: Config) -> list[Table]:
    asdl_ok, asdl_note = _asdl_available()
    tables = []
    for index, task in enumerate(tasks()):
        epochs = cfg.n(20 if index == 0 else 30, 3)
        checkpoints = sorted({1, 2, 5, 10, epochs} & set(range(epochs + 1)))
        table = Table(
            f"Training the {task.name} on 1,797 digits: full-data loss by epoch, wall time",
            ["method", *[f"loss @ {e} ep" for e in checkpoints], "s / epoch",
             "epochs to Adam's final", "s to Adam's final", "CG products"],
        )  # fmt: skip
        curves = {}
        for name, make in _methods(index, asdl_ok).items():
            train(task, make, 1)  # warm-up (imports, first calls)
            curves[name] = train(task, make, epochs)
        adam = curves["Adam (lr 1e-2)"].losses[-1]
        for name, curve in curves.items():
            table.add(
                name,
                *[curve.losses[e] for e in checkpoints],
                curve.seconds[-1] / epochs,
                curve.epochs_to(adam),
                curve.seconds_to(adam),
                curve.products or "-",
            )
        table.notes.append(
            f"batch {BATCH} for the minibatch methods; {epochs} epochs; Adam's final loss "
            f"{adam:.4g}; KFAC refreshes its factors every 10 steps (factor decay 0.95), "
            "ASDL likewise (curvature and preconditioner interval 10, EMA 0.05, Monte Carlo "
            "Fisher). ASDL damps each factor by a π-split of λ, curvscope exactly."
        )
        if not asdl_ok:
            table.notes.append(f"ASDL not runnable here: {asdl_note}")
        if index == 1:
            for label, key in (("HessianFree", "HessianFree"), ("KFAC", "KFACPreconditioner")):
                name = next(n for n in curves if key in n)
                reached = curves[name].epochs_to(adam)
                table.check(
                    f"{label} reaches Adam's final autoencoder loss in fewer epochs",
                    f"{reached if reached is not None else 'never'} vs {epochs} epochs",
                    reached is not None and reached < epochs,
                )
        tables.append(table)
    return tables


def _stepper(task: Task, kind: str, asdl_lr: float = 0.001) -> Callable[[], None]:
    """Ten training steps on fixed batches (one factor refresh for the KFAC variants)."""
    model = task.build()
    batches = task.batches(0)[:5] * 2
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if kind == "curvscope":
        pre = KFACPreconditioner(model, task.loss_fn, damping=1e-2, update_every=10)
    if kind == "asdl":
        from asdl import KfacGradientMaker, PreconditioningConfig

        config = PreconditioningConfig(
            data_size=BATCH, damping=1e-2, curvature_upd_interval=10,
            preconditioner_upd_interval=10, ema_decay=0.05,
        )  # fmt: skip
        maker = KfacGradientMaker(model, config, fisher_type="fisher_mc", loss_type=task.loss_type)

    def ten_steps() -> None:
        for x, y in batches:
            opt.zero_grad()
            if kind == "asdl":
                with _no_nvtx():
                    dummy = maker.setup_model_call(model, x)
                    maker.setup_loss_call(task.loss_fn, dummy, y)
                    maker.forward_and_backward()
            else:
                task.loss_fn(model(x), y).backward()
                if kind == "curvscope":
                    pre.step((x, y))
            opt.step()

    return ten_steps


def overhead_cases(cfg: Config) -> list[Table]:
    asdl_ok, _ = _asdl_available()
    table = Table(
        f"KFAC preconditioning overhead per training step (batch {BATCH}, factors refreshed "
        "every 10 steps), median over interleaved blocks of 10 steps",
        ["task", "SGD (ms/step)", "SGD + curvscope KFAC (ms/step)", "ratio",
         "SGD + ASDL KFAC (ms/step)", "ratio"],
    )  # fmt: skip
    ratios = []
    for task in tasks():
        variants = {"sgd": _stepper(task, "sgd"), "curvscope": _stepper(task, "curvscope")}
        if asdl_ok:
            variants["asdl"] = _stepper(task, "asdl")
        times = time_variants(variants, cfg, min_repeats=5)
        sgd, ours = times["sgd"].median / 10, times["curvscope"].median / 10
        theirs = times["asdl"].median / 10 if asdl_ok else float("nan")
        ratios.append(ratio(ours, sgd))
        table.add(task.name, sgd * 1e3, ours * 1e3, ratio(ours, sgd), theirs * 1e3,
                  ratio(theirs, sgd))  # fmt: skip
    table.check(
        "curvscope KFAC per-step time <= 1.5x SGD at update_every=10",
        ", ".join(f"{r:.2f}x" for r in ratios),
        all(r <= 1.5 for r in ratios),
    )
    return [table]


def tracker_cases(cfg: Config) -> list[Table]:
    """The edge-of-stability run of `curvscope track` (digits MLP, MSE, lr 1, full batch)."""
    inputs, labels = load_digits()
    targets = F.one_hot(labels, 10).float()
    model, loss_fn = digits_mlp(seed=0), nn.MSELoss()
    steps, every = cfg.n(400, 60), 20
    tracker = curvscope.SharpnessTracker(model, loss_fn, (inputs, targets), every=every)
    op = curvscope.HessianOperator(model, loss_fn, (inputs, targets))
    scipy_op = op.to_scipy()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    rows: dict[str, list[tuple[int, float, float]]] = {}

    def add(label: str, fn: Callable[[], tuple[int, float]]) -> None:
        start = time.perf_counter()
        products, value = fn()
        rows.setdefault(label, []).append((products, time.perf_counter() - start, value))

    def eigsh(tol: float) -> Callable[[], tuple[int, float]]:
        def run() -> tuple[int, float]:
            before = op.num_matvecs
            value = scipy.sparse.linalg.eigsh(scipy_op, k=1, which="LA", tol=tol)[0][0]
            return op.num_matvecs - before, float(value)

        return run

    for step in range(steps + 1):
        if step % every == 0:
            add(
                "SharpnessTracker.update (warm start, tol 1e-3)",
                lambda: (lambda r: (r.num_matvecs, r.sharpness))(tracker.update(step)),  # noqa: B023
            )
            add(
                "cold curvscope.eigenvalues(k=1, tol=1e-3)",
                lambda: (lambda r: (r.num_matvecs, float(r.values[0])))(
                    curvscope.eigenvalues(op, k=1, tol=1e-3)
                ),
            )
            add("scipy eigsh from scratch, default tol (the EoS code)", eigsh(0.0))
            add("scipy eigsh from scratch, tol 1e-3", eigsh(1e-3))  # fmt: skip
        opt.zero_grad()
        loss_fn(model(inputs), targets).backward()
        opt.step()
    table = Table(
        f"Sharpness tracking along full-batch GD at the edge of stability (digits MLP, MSE, "
        f"lr 1, {steps} steps, a record every {every} steps): cost per record",
        ["method", "products / record (mean)", "ms / record (median)", "max |Δλ| vs eigsh"],
    )
    reference = np.array(
        [v for _, _, v in rows["scipy eigsh from scratch, default tol (the EoS code)"]]
    )
    for label, values in rows.items():
        products = np.mean([p for p, _, _ in values])
        seconds = np.median([s for _, s, _ in values])  # the first record also sets up
        error = float(np.max(np.abs(np.array([v for _, _, v in values]) - reference)))
        table.add(label, float(products), seconds * 1e3, error)
    warm = np.mean([p for p, _, _ in rows["SharpnessTracker.update (warm start, tol 1e-3)"]])
    cold = np.mean([p for p, _, _ in rows["cold curvscope.eigenvalues(k=1, tol=1e-3)"]])
    eigsh_default = np.mean(
        [p for p, _, _ in rows["scipy eigsh from scratch, default tol (the EoS code)"]]
    )
    table.check("warm-started record uses fewer products than a cold eigenvalues call",
                f"{warm:.1f} vs {cold:.1f}", bool(warm < cold))  # fmt: skip
    table.check("warm-started record uses fewer products than the eigsh loop",
                f"{warm:.1f} vs {eigsh_default:.1f}", bool(warm < eigsh_default))  # fmt: skip
    table.notes.append(
        "records include the first (cold) one; every method sees the same parameters; the "
        "EoS code (Cohen et al.) calls eigsh(LinearOperator, k) with its default tol=0"
    )
    return [table]


CASES = [
    ("optim/training", "Issue 13: training with HessianFree and KFAC", training_cases, False),
    ("optim/overhead", "Issue 13: KFAC preconditioner overhead", overhead_cases, False),
    ("optim/tracker", "Issue 13: sharpness tracking cost", tracker_cases, False),
]
