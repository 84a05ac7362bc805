"""Issue 12: the Laplace approximation (curvscope.LaplaceApproximation) against laplace-torch.

Both libraries get the same trained model, the same fixed train/validation/test split of the
digits, the same likelihood and the same predictive (GLM with the probit link). For each
structure and prior-tuning method: test accuracy, NLL, ECE and the time to fit, tune and
predict. Problems: the digits MLP (64-32-10 tanh) and the small CNN of the other cases
(bench.models.SmallCNN) on the digits upsampled to 3x32x32, both trained on the training split.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import curvscope
from curvscope.laplace.predictive import reliability
from curvscope.report.digits import digits_mlp, load_digits

from .harness import Config, Table
from .models import SmallCNN

SPLIT = (1078, 359)  # train, validation; the remaining 360 digits are the test set
TUNINGS = ("marglik", "marglik per layer", "gridsearch")


def _split() -> tuple[torch.Tensor, ...]:
    x, y = load_digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[: SPLIT[0]], order[SPLIT[0] : SPLIT[0] + SPLIT[1]]
    test = order[SPLIT[0] + SPLIT[1] :]
    return x, y, train, val, test


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def problems(cfg: Config) -> list[dict[str, Any]]:
    x, y, train, val, test = _split()
    mlp = _train(digits_mlp(seed=0), x[train], y[train], 300)
    images = F.interpolate(x.reshape(-1, 1, 8, 8), size=32, mode="bilinear").repeat(1, 3, 1, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        cnn = SmallCNN()
    cnn = _train(cnn, images[train], y[train], cfg.n(150, 30))
    return [
        {"name": "digits MLP", "model": mlp, "x": x, "y": y, "split": (train, val, test)},
        {"name": "small CNN", "model": cnn, "x": images, "y": y, "split": (train, val, test)},
    ]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 256) -> list:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    found = reliability(probs, y)
    return {key: found[key] for key in ("accuracy", "nll", "ece")}


# -- curvscope ------------------------------------------------------------------------------
CURVSCOPE_STRUCTURES = {
    "full, last layer": {"structure": "full", "subset": "last_layer"},
    "full": {"structure": "full"},
    "diag": {"structure": "diag"},
    "kfac": {"structure": "kfac"},
    "lowrank (rank 100)": {"structure": "lowrank", "rank": 100},
}


def _curvscope_rows(problem: dict[str, Any], label: str, options: dict) -> list[list[Any]]:
    x, y, (train, val, test) = problem["x"], problem["y"], problem["split"]
    start = time.perf_counter()
    la = curvscope.LaplaceApproximation(
        problem["model"], nn.CrossEntropyLoss(), _batches(x[train], y[train]), **options
    )
    fit = time.perf_counter() - start
    rows = []
    for tuning in TUNINGS:
        start = time.perf_counter()
        if tuning == "gridsearch":
            prior = la.optimize_prior_precision("gridsearch", val_data=[(x[val], y[val])])
        else:
            prior = la.optimize_prior_precision("marglik", per_layer=tuning != "marglik")
        probs = la.predict(x[test], method="probit")
        seconds = fit + time.perf_counter() - start
        rows.append(
            ["curvscope", label, tuning, _prior_text(prior), _metrics(probs, y[test]), seconds]
        )
    return rows


def _prior_text(prior: Any) -> str:
    if isinstance(prior, dict):
        return "per layer " + ", ".join(f"{v:.3g}" for v in prior.values())
    if isinstance(prior, torch.Tensor):
        if prior.numel() == 1:
            return f"{float(prior):.3g}"
        return f"{prior.numel()} values, median {float(prior.median()):.3g}"
    return f"{float(prior):.3g}"


# -- laplace-torch ---------------------------------------------------------------------------
LAPLACE_TORCH_STRUCTURES = {
    "full, last layer": {"subset_of_weights": "last_layer", "hessian_structure": "full"},
    "full": {"subset_of_weights": "all", "hessian_structure": "full"},
    "diag": {"subset_of_weights": "all", "hessian_structure": "diag"},
    "kfac": {"subset_of_weights": "all", "hessian_structure": "kron"},
}


def _laplace_torch_rows(problem: dict[str, Any], label: str, options: dict) -> list[list[Any]]:
    from torch.utils.data import DataLoader, TensorDataset

    x, y, (train, val, _) = problem["x"], problem["y"], problem["split"]
    train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=256)
    val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=256)
    rows = []
    for tuning in TUNINGS:  # a fresh fit for each: optimize_prior_precision keeps state
        try:
            rows.append(
                _laplace_torch_row(problem, label, options, tuning, train_loader, val_loader)
            )
        except Exception as error:  # e.g. no layerwise prior for last-layer Laplace
            detail = " ".join(str(error).split())[:80]
            rows.append(["laplace-torch", label, tuning, f"failed: {detail}", None, math.nan])
    return rows


def _laplace_torch_row(problem, label, options, tuning, train_loader, val_loader) -> list:
    from laplace import Laplace

    x, y, test = problem["x"], problem["y"], problem["split"][2]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        start = time.perf_counter()
        la = Laplace(problem["model"], "classification", **options)
        la.fit(train_loader, progress_bar=False)
        kwargs: dict[str, Any] = {"pred_type": "glm", "link_approx": "probit"}
        if tuning == "gridsearch":
            kwargs.update(method="gridsearch", val_loader=val_loader, grid_size=33)
        else:
            kwargs.update(method="marglik")
            kwargs["prior_structure"] = "layerwise" if tuning != "marglik" else "scalar"
        la.optimize_prior_precision(**kwargs)
        with torch.no_grad():
            probs = la(x[test], pred_type="glm", link_approx="probit")
        seconds = time.perf_counter() - start
    prior = _prior_text(la.prior_precision)
    return ["laplace-torch", label, tuning, prior, _metrics(probs, y[test]), seconds]


#: Seconds one library may spend on one structure (all its tunings) before it is stopped.
TIME_LIMIT_S = 300


def _stop(signum: int, frame: Any) -> None:
    raise TimeoutError(f"stopped after {TIME_LIMIT_S} s")


def _safe(rows_fn: Callable[[], list], library: str, label: str, table: Table) -> list:
    previous = signal.signal(signal.SIGALRM, _stop)
    signal.alarm(TIME_LIMIT_S)
    try:
        return rows_fn()
    except Exception as error:  # report, never hide
        detail = " ".join(str(error).split())[:200]
        table.notes.append(f"{library} {label}: failed ({type(error).__name__}: {detail})")
        print(f"   {library} {label}: failed ({detail})", file=sys.stderr, flush=True)
        return []
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def laplace_cases(cfg: Config) -> list[Table]:
    tables = []
    try:
        import laplace  # noqa: F401

        have_peer = True
    except Exception:
        have_peer = False
    for problem in problems(cfg):
        tables.append(_problem_table(problem, have_peer, cfg))
    return tables


def _problem_table(problem: dict[str, Any], have_peer: bool, cfg: Config) -> Table:
    model, x, y = problem["model"], problem["x"], problem["y"]
    test = problem["split"][2]
    num_params = sum(p.numel() for p in model.parameters())
    table = Table(
        f"Laplace on the {problem['name']} ({num_params:,} parameters; digits split "
        f"{SPLIT[0]}/{SPLIT[1]}/{len(test)}): test accuracy, NLL, ECE, seconds (fit + tune + "
        "predict), GLM predictive with the probit link",
        ["library", "structure", "prior tuning", "prior", "accuracy", "NLL", "ECE", "seconds"],
    )
    with torch.no_grad():
        trained = _metrics(torch.softmax(model(x[test]), dim=1), y[test])
    table.add("trained model (MAP)", "-", "-", "-", *trained.values(), "-")
    print(f"   {problem['name']}: trained {trained}", file=sys.stderr, flush=True)
    structures = list(CURVSCOPE_STRUCTURES)
    if cfg.quick:
        structures = ["full, last layer", "diag"]
    for label in structures:
        ours = _safe(
            lambda label=label: _curvscope_rows(problem, label, CURVSCOPE_STRUCTURES[label]),
            "curvscope", label, table,
        )  # fmt: skip
        peer = []
        if have_peer and label in LAPLACE_TORCH_STRUCTURES:
            peer = _safe(
                lambda label=label: _laplace_torch_rows(
                    problem, label, LAPLACE_TORCH_STRUCTURES[label]
                ),
                "laplace-torch", label, table,
            )  # fmt: skip
        for row in ours + peer:
            metrics = list(row[4].values()) if row[4] else [None, None, None]
            table.add(*row[:4], *metrics, row[5])
            print(f"   {problem['name']}: {row}", file=sys.stderr, flush=True)
        _verdicts(table, label, ours, peer, trained["nll"])
    table.notes.append(
        "gridsearch: both libraries search the same 33 log-spaced prior precisions (1e-4..1e4) "
        "on the validation split; where the validation NLL is still falling at 1e4, curvscope "
        "goes on to 1e8 (16 more values, its default grid, one more validation pass), then "
        "refines (`refine=True`, its default): 17 log-spaced values between the best point's "
        "neighbours, one more pass."
    )
    if "kfac" not in structures:
        table.notes.append("curvscope kfac: not run in quick mode.")
    return table


def _verdicts(table: Table, label: str, ours: list, peer: list, map_nll: float) -> None:
    if not ours:
        return
    best = min(ours, key=_nll)
    nll = _nll(best)
    table.check(
        f"{label}: curvscope's best NLL <= the trained model's",
        f"{nll:.4f} ({best[2]}) vs {map_nll:.4f}",
        nll <= map_nll,
    )
    if peer:
        peer = [row for row in peer if row[4]]
        if not peer:
            return
        peer_best = min(peer, key=_nll)
        table.check(
            f"{label}: curvscope's best NLL < laplace-torch's best, in less time",
            f"{nll:.4f} in {best[-1]:.2f} s vs {_nll(peer_best):.4f} ({peer_best[2]}) in "
            f"{peer_best[-1]:.2f} s",
            nll < _nll(peer_best) and best[-1] < peer_best[-1],
        )


def _nll(row: list) -> float:
    return row[4]["nll"] if isinstance(row[4], dict) else math.nan


CASES = [
    ("laplace/digits", "Issue 12: Laplace approximation vs laplace-torch", laplace_cases, False),
]
