"""Issue 11: influence functions. The linear datamodeling score (LDS, Park et al. 2023) on the
digits MLP, and the time and memory of scores of 100 test x all training examples, side by side
with dattri (IF, TRAK) and Kronfluence (EKFAC) where they import.

LDS: the MLP is trained (full-batch Adam, 300 steps, a fixed initialisation) on 1,500 digits;
50 random half-subsets of the training set are drawn (seeded) and the same training is rerun on
each. For test example i and subset S the prediction is ``−Σ_{j∈S} score(i, j)`` (scores in
curvscope's convention: positive = j lowers i's loss), the truth is i's loss after training on
S, and LDS is the Spearman correlation over the subsets, averaged over 100 test examples.
Every peer's scores have curvscope's sign (positive = helpful): checked for dattri's IF, whose
explicit variant equals n x curvscope's Hessian scores; TRAK and Kronfluence document it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

import curvscope
from curvscope.report.digits import digits_mlp, load_digits

from .harness import MEMORY, Config, Table, memory_variants, mib, time_once, time_variants

NUM_TRAIN, NUM_TEST, NUM_SUBSETS, STEPS = 1500, 100, 50, 300
PEERS = ("dattri", "kronfluence")


def _split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    inputs, labels = load_digits()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:NUM_TRAIN], order[NUM_TRAIN:][:NUM_TEST]
    return (inputs[train], labels[train]), (inputs[test], labels[test])


def _train(x: torch.Tensor, y: torch.Tensor, steps: int = STEPS) -> nn.Module:
    model = digits_mlp(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _test_losses(model: nn.Module, test) -> torch.Tensor:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(test[0]), test[1], reduction="none")


# -- the methods: each returns scores (n_test, n_train), positive = helpful ------------------
def _curvscope(curvature: str, solver: str = "auto") -> Callable:
    def run(model, train, test):
        influence = curvscope.InfluenceFunction(
            model, nn.CrossEntropyLoss(), [train], curvature=curvature, solver=solver
        )
        return influence.scores(test)

    return run


def _dattri_task(model):
    from dattri.task import AttributionTask

    def loss(params, pair):  # one example (batched or not) or a batch: the mean loss
        image, label = pair
        output = torch.func.functional_call(model, params, image.reshape(-1, 64))
        return nn.functional.cross_entropy(output, label.reshape(-1))

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def _loaders(train, test):
    from torch.utils.data import DataLoader, TensorDataset

    return (
        DataLoader(TensorDataset(*train), batch_size=500, shuffle=False),
        DataLoader(TensorDataset(*test), batch_size=NUM_TEST, shuffle=False),
    )


def _dattri_if(model, train, test):
    from dattri.algorithm.influence_function import IFAttributorCG

    damping = curvscope.InfluenceFunction(model, nn.CrossEntropyLoss(), [train]).damping
    attributor = IFAttributorCG(task=_dattri_task(model), regularization=damping)
    train_loader, test_loader = _loaders(train, test)
    attributor.cache(train_loader)
    return attributor.attribute(train_loader, test_loader).T.detach()


def _dattri_trak(model, train, test):
    from dattri.algorithm.trak import TRAKAttributor

    def probability(params, pair):
        image, label = pair
        output = torch.func.functional_call(model, params, image.reshape(-1, 64))
        return torch.exp(-nn.functional.cross_entropy(output, label.reshape(-1)))

    attributor = TRAKAttributor(
        task=_dattri_task(model),
        correct_probability_func=probability,
        projector_kwargs={"device": "cpu", "proj_dim": 512},
        device="cpu",
    )
    train_loader, test_loader = _loaders(train, test)
    attributor.cache(train_loader)
    return attributor.attribute(test_loader).T.detach()


def _kronfluence(model, train, test, batch_size: int = 500):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    probabilities = torch.softmax(logits.detach(), dim=-1)
                    labels = torch.multinomial(probabilities, 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return nn.functional.cross_entropy(model(inputs), labels, reduction="sum")

    task = Classification()
    prepared = prepare_model(copy.deepcopy(model).eval(), task)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        analyzer = Analyzer("bench", prepared, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors(
            "ekfac", TensorDataset(*train), per_device_batch_size=batch_size,
            factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True,
        )  # fmt: skip
        analyzer.compute_pairwise_scores(
            "scores", "ekfac", query_dataset=TensorDataset(*test),
            train_dataset=TensorDataset(*train), per_device_query_batch_size=NUM_TEST,
            per_device_train_batch_size=batch_size, overwrite_output_dir=True,
        )  # fmt: skip
        return analyzer.load_pairwise_scores("scores")["all_modules"].detach()


def _methods() -> dict[str, Callable]:
    methods = {
        "curvscope GGN, exact": _curvscope("ggn", "exact"),
        "curvscope GGN, CG": _curvscope("ggn", "cg"),
        "curvscope Hessian, exact": _curvscope("hessian", "exact"),
        "curvscope identity (gradient similarity)": _curvscope("identity"),
    }
    for name, curvature in (("KFACOperator", "kfac"), ("EKFACOperator", "ekfac")):
        if hasattr(curvscope, name):
            methods[f"curvscope {curvature.upper()}"] = _curvscope(curvature)
    for peer in PEERS:
        try:
            __import__(peer)
        except Exception:  # not installed here: its rows say so
            continue
        if peer == "dattri":
            methods["dattri IF (CG, same damping)"] = _dattri_if
            methods["dattri TRAK (1 model, 512 dims)"] = _dattri_trak
        else:
            methods["Kronfluence EKFAC"] = _kronfluence
    return methods


def _lds(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor) -> float:
    predicted = -(masks.double() @ scores.double().T)  # (subsets, tests)
    values = [spearmanr(predicted[:, i], actual[:, i]).statistic for i in range(actual.shape[1])]
    return float(np.nanmean(values))


def lds_case(cfg: Config) -> list[Table]:
    subsets = cfg.n(NUM_SUBSETS, 6)
    table = Table(
        f"LDS on the digits MLP (2,410 parameters, {NUM_TRAIN:,} training digits, "
        f"{NUM_TEST} test digits, {subsets} retrainings on random half-subsets)",
        ["method", "LDS (mean Spearman)", "time to score (s)"],
    )
    train, test = _split()
    model = _train(*train)
    generator = torch.Generator().manual_seed(1)
    masks = torch.stack([torch.randperm(NUM_TRAIN, generator=generator) < NUM_TRAIN // 2
                         for _ in range(subsets)])  # fmt: skip
    actual = torch.stack([_test_losses(_train(train[0][m], train[1][m]), test) for m in masks])
    best = {"curvscope": -1.0, "peer": -1.0}
    for name, method in _methods().items():
        start = time.perf_counter()
        try:
            scores = method(model, train, test)
        except Exception as error:  # a failing peer must not hide the others
            table.add(name, f"failed: {type(error).__name__}: {str(error)[:80]}", "-")
            continue
        seconds = time.perf_counter() - start
        value = _lds(scores, masks, actual)
        table.add(name, value, seconds)
        side = "curvscope" if name.startswith("curvscope") else "peer"
        best[side] = max(best[side], value)
    missing = [p for p in PEERS if not any(p in row[0].lower() for row in table.rows)]
    if missing:
        table.notes.append(f"not installed here, so not run: {', '.join(missing)}")
    table.notes.append(
        "One retraining per subset from the same initialisation (deterministic full-batch "
        "Adam); damping: curvscope's default 0.1 x mean eigenvalue, the same λ for dattri IF; "
        "Kronfluence's own default damping."
    )
    if best["peer"] > -1:
        table.check(
            "curvscope's best LDS >= the best peer's",
            f"{best['curvscope']:.3f} vs {best['peer']:.3f}",
            best["curvscope"] >= best["peer"],
        )
    return [table]


def timing_case(cfg: Config) -> list[Table]:
    table = Table(
        f"Scores of {NUM_TEST} test x {NUM_TRAIN:,} training digits on the digits MLP "
        "(set-up included), float32",
        ["method", "time (s)", "peak memory (MiB)"],
    )
    train, test = _split()
    model = _train(*train, steps=cfg.n(STEPS, 20))
    variants = {name: (lambda m=m: m(model, train, test)) for name, m in _methods().items()}
    times = time_variants(variants, cfg)
    memory = memory_variants(variants)
    for name in variants:
        table.add(name, times[name].median, mib(memory[name]))
    table.notes.append(
        "Time: median of repeated warm calls; memory: one call's resident-set peak above what "
        "was live before it (harness.py)."
    )
    measured = {name: (times[name].median, memory[name]) for name in variants}
    _timing_checks(table, measured, [
        ("curvscope EKFAC", "Kronfluence EKFAC"),  # the same method
        ("curvscope KFAC", "dattri IF (CG, same damping)"),  # the best LDS of each side
    ])  # fmt: skip
    return [table]


def _timing_checks(table: Table, measured: dict, pairs: list[tuple[str, str]]) -> None:
    """Time and memory of a curvscope method against a peer's, where both ran."""
    for ours, peer in pairs:
        if ours not in measured or peer not in measured:
            continue
        (t_ours, m_ours), (t_peer, m_peer) = measured[ours], measured[peer]
        table.check(
            f"{ours} time <= {peer}",
            f"{t_ours:.3g} s vs {t_peer:.3g} s ({t_peer / t_ours:.3g}x)",
            t_ours <= t_peer,
        )
        if m_ours == m_ours and m_peer == m_peer:  # both measured (not NaN)
            table.check(
                f"{ours} peak memory <= {peer}",
                f"{mib(m_ours):.4g} MiB vs {mib(m_peer):.4g} MiB",
                m_ours <= m_peer,
            )


# -- the ResNet-18-sized CNN ---------------------------------------------------------------
CNN_TRAIN, CNN_BATCH = 2000, 32
#: Training images in the memory child (its 4 KiB mmap threshold makes it several times slower).
CNN_MEMORY_TRAIN = 256


def _cnn_problem(cfg: Config):
    from .models_scale import ResNet18

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ResNet18().eval()
    generator = torch.Generator().manual_seed(0)
    n_train, n_test = cfg.n(CNN_TRAIN, 64), cfg.n(NUM_TEST, 8)
    if MEMORY.child:  # the peak does not grow with n_train (streamed): spare the slow child
        n_train = min(n_train, CNN_MEMORY_TRAIN)
    images = torch.randn(n_train + n_test, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (n_train + n_test,), generator=generator)
    train = (images[:n_train], labels[:n_train])
    test = (images[n_train:], labels[n_train:])
    return model, train, test


def _cnn_curvscope(curvature: str) -> Callable:
    def run(model, train, test):
        batches = [(train[0][i : i + 250], train[1][i : i + 250])
                   for i in range(0, len(train[1]), 250)]  # fmt: skip
        influence = curvscope.InfluenceFunction(
            model, nn.CrossEntropyLoss(), batches, curvature=curvature,
            max_batch_size=CNN_BATCH,
        )  # fmt: skip
        return influence.scores([test])

    return run


def _cnn_methods() -> dict[str, Callable]:
    methods = {
        "curvscope identity (gradient similarity)": _cnn_curvscope("identity"),
        "curvscope KFAC": _cnn_curvscope("kfac"),
        "curvscope EKFAC": _cnn_curvscope("ekfac"),
    }
    try:
        __import__("kronfluence")
        methods["Kronfluence EKFAC"] = lambda model, train, test: _kronfluence(
            model, train, test, batch_size=CNN_BATCH
        )
    except Exception:  # not installed here: the notes say so
        pass
    return methods


def timing_cnn_case(cfg: Config) -> list[Table]:
    model, train, test = _cnn_problem(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    table = Table(
        f"Scores of {len(test[1])} test x {len(train[1]):,} training images (3x32x32, synthetic) "
        f"on the ResNet-18-sized CNN ({num_params:,} parameters, eval mode), float32, one cold "
        "call each (set-up included)",
        ["method", "time (s)", "peak memory (MiB)"],
    )
    methods = _cnn_methods()
    variants = {name: (lambda m=m: m(model, train, test)) for name, m in methods.items()}
    times = time_once(variants)
    memory = memory_variants(variants, warm=False)
    for name in variants:
        table.add(name, times[name], mib(memory[name]))
    measured = {name: (times[name], memory[name]) for name in variants}
    _timing_checks(
        table,
        measured,
        [("curvscope EKFAC", "Kronfluence EKFAC"), ("curvscope KFAC", "Kronfluence EKFAC")],
    )
    table.notes += [
        f"Train-side per-example gradients are streamed {CNN_BATCH} at a time (curvscope "
        "`max_batch_size`, Kronfluence `per_device_train_batch_size`); the 100 test gradients, "
        "preconditioned, are held at once (100 x 11.2M floats = 4.5 GB) by both libraries.",
        f"Peak memory is measured on {CNN_MEMORY_TRAIN} of the training images (the memory "
        "child's allocator settings make it several times slower): with the training side "
        "streamed, the peak does not grow with their number (only the 100 x n_train scores "
        "do, 0.8 MB here).",
        "KFAC/EKFAC time includes the eigendecompositions of the Kronecker factors in float64 "
        "(the largest 4608 x 4608, three of them), done once whatever the number of training "
        "examples.",
        "Not run: curvscope GGN with CG and dattri's IF (CG) would need some 100 GGN/Hessian "
        "products over all 2,000 images per test example; dattri's TRAK builds a dense "
        "11.2M x 512 random projection on CPU (23 GB). Both far exceed this 2-core machine.",
    ]
    return [table]


CASES = [
    ("influence/lds", "Issue 11: influence functions, LDS", lds_case, False),
    ("influence/timing", "Issue 11: influence functions, time and memory", timing_case, True),
    (
        "influence/timing-cnn",
        "Issue 11: influence functions, time and memory on the ResNet-18-sized CNN",
        timing_cnn_case,
        True,
    ),
]
