"""Issue 14: one-shot pruning, accuracy against sparsity, against torch.nn.utils.prune and
Torch-Pruning; and the time of layer-wise OBS on a ResNet-18-sized CNN."""

from __future__ import annotations

import copy
import importlib.metadata
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import curvscope
from curvscope.prune.curvature import reuse_curvature
from curvscope.prune.sweep import evaluate
from curvscope.report.digits import digits_train_test, load_digits

from .harness import Config, Table
from .models import SmallCNN

SPARSITIES = (0.5, 0.7, 0.9, 0.95)
#: (label, prune_sweep options); "kfac" rows only where curvscope has KFACOperator.
CURVSCOPE = [
    ("curvscope magnitude", {"methods": ["magnitude"]}),
    ("curvscope OBD (GGN diagonal)", {"methods": ["obd"]}),
    ("curvscope OBS (dense GGN per layer)", {"methods": ["obs"]}),
    ("curvscope OBS (KFAC)", {"methods": ["obs"], "curvature": "kfac"}),
    ("curvscope OBS (GGN diagonal)", {"methods": ["obs"], "curvature": "diagonal"}),
    ("curvscope OBS (dense GGN), global", {"methods": ["obs"], "scope": "global"}),
    ("curvscope layer_obs", {"methods": ["layer_obs"]}),
    ("curvscope layer_obs, global", {"methods": ["layer_obs"], "scope": "global"}),
]


def _digits_problem(cfg: Config):
    model, loss_fn, train, test = digits_train_test(steps=300)
    return "digits MLP (64-32-10 tanh, 2,410 parameters)", model, loss_fn, train, train, test


def _digits_images(dtype=torch.float32):
    """Digits as 3x32x32 images (upsampled, channels repeated), with the digits_train_test split."""
    inputs, labels = load_digits(dtype=dtype)
    images = F.interpolate(inputs.view(-1, 1, 8, 8), size=32, mode="bilinear").repeat(1, 3, 1, 1)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = len(labels) - round(0.25 * len(labels))
    return (images[order[:cut]], labels[order[:cut]]), (images[order[cut:]], labels[order[cut:]])


def _cnn_problem(cfg: Config):
    (x, y), (x_test, y_test) = _digits_images()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(cfg.n(150, 20)):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for parameter in model.parameters():
        parameter.grad = None
    model.eval()
    calibration = [(x[i : i + 128], y[i : i + 128]) for i in range(0, cfg.n(512, 128), 128)]
    title = "small CNN (bench models.SmallCNN, 3,418 parameters) on digits upsampled to 32x32"
    return title, model, nn.CrossEntropyLoss(), calibration, [(x, y)], [(x_test, y_test)]


def _torch_prune(model: nn.Module, sparsity: float, how: str) -> nn.Module:
    pruned = copy.deepcopy(model)
    modules = [m for m in pruned.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if how == "global":
        pairs = [(m, "weight") for m in modules]
        torch_prune.global_unstructured(pairs, torch_prune.L1Unstructured, amount=sparsity)
    else:
        for module in modules:
            torch_prune.l1_unstructured(module, "weight", amount=sparsity)
    for module in modules:
        torch_prune.remove(module, "weight")
    return pruned


def _accuracy_table(cfg: Config, title: str, model, loss_fn, calibration, train, test) -> Table:
    sparsities = SPARSITIES[::2] if cfg.quick else SPARSITIES
    table = Table(
        f"Accuracy against sparsity, one-shot, no fine-tuning: {title}",
        ["method", *[f"test accuracy at {s:.0%}" for s in sparsities], "seconds (all sparsities)"],
    )
    _, dense = evaluate(model, loss_fn, test)
    table.add("dense (no pruning)", *[dense] * len(sparsities), "-")
    results: dict[str, list[float]] = {}
    for label, how in [("torch.nn.utils.prune l1_unstructured (per layer)", "layer"),
                       ("torch.nn.utils.prune global_unstructured", "global")]:  # fmt: skip
        start = time.perf_counter()
        row = [evaluate(_torch_prune(model, s, how), loss_fn, test)[1] for s in sparsities]
        table.add(label, *row, time.perf_counter() - start)
    with reuse_curvature():  # the dense GGN blocks are computed once, by the first row needing them
        for label, options in CURVSCOPE:
            row = _curvscope_row(label, options, model, loss_fn, calibration, test, sparsities)
            table.add(*row)
            if isinstance(row[1], float):
                results[label] = row[1:-1]
    if 0.9 in sparsities:
        _verdicts(table, dense, results, sparsities.index(0.9))
    table.notes.append(
        "Test accuracy on the held-out quarter of the digits (digits_train_test split, seed 0); "
        "curvature and layer inputs from the calibration batches "
        f"({sum(len(y) for _, y in calibration)} examples); damping 0.01. Time: all sparsities "
        "of a row; the dense GGN blocks are computed once (in the OBD row) and reused by the "
        "OBS rows, and the layer inputs once (in the first layer_obs row)."
    )
    return table


def _curvscope_row(label, options, model, loss_fn, calibration, test, sparsities) -> list:
    """[label, accuracy per sparsity..., seconds] of one prune_sweep."""
    if options.get("curvature") == "kfac" and not hasattr(curvscope, "KFACOperator"):
        return [label, *["-"] * len(sparsities), "not run: no curvscope.KFACOperator yet"]
    start = time.perf_counter()
    sweep = curvscope.prune_sweep(
        model, loss_fn, calibration, sparsities=list(sparsities), test_data=test, **options
    )
    return [label, *[p.test_accuracy for p in sweep.points], time.perf_counter() - start]


def _verdicts(table: Table, dense: float, results: dict, index: int) -> None:
    lost_magnitude = dense - results["curvscope magnitude"][index]
    for label in ["curvscope OBS (dense GGN per layer)", "curvscope layer_obs"]:
        lost = dense - results[label][index]
        table.check(
            f"{label.removeprefix('curvscope ')} at 90%: loses < half the accuracy magnitude loses",
            f"loses {lost:.3f}, magnitude {lost_magnitude:.3f} ({lost / lost_magnitude:.2f}x)",
            lost < lost_magnitude / 2,
        )


def _channel_table(cfg: Config, title: str, model, loss_fn, calibration, train, test) -> Table:
    table = Table(
        f"Channel pruning (whole output rows/channels; the head keeps its 10 outputs): {title}",
        ["method", "fraction of channels", "weights zero or removed", "test accuracy", "seconds"],
    )
    params = [n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]
    params = params[:-1]  # the head's rows are the classes
    total = sum(model.get_parameter(n).numel() for n in params)
    for ratio in (0.25, 0.5):
        for method in ["magnitude", "obs", "layer_obs"]:
            start = time.perf_counter()
            result = curvscope.prune(model, loss_fn, calibration, sparsity=ratio, method=method,
                                     structure="channel", params=params)  # fmt: skip
            seconds = time.perf_counter() - start
            accuracy = evaluate(result.model, loss_fn, test)[1]
            table.add(f"curvscope {method}, channel", ratio, float(result.sparsity), accuracy,
                      seconds)  # fmt: skip
        table.add(*_torch_pruning_row(model, loss_fn, test, ratio, total, params))
    return table


def _torch_pruning_row(model, loss_fn, test, ratio, total, params) -> list:
    try:
        import torch_pruning as tp
    except ImportError as error:
        return ["Torch-Pruning MagnitudePruner (L2)", ratio, "-", f"not run: {error}", "-"]
    pruned = copy.deepcopy(model)
    example = test[0][0][:2]
    ignored = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1:]
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        pruned, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored,
    )  # fmt: skip
    pruner.step()
    seconds = time.perf_counter() - start
    left = sum(pruned.get_parameter(n).numel() for n in params)
    version = importlib.metadata.version("torch-pruning")
    label = f"Torch-Pruning {version} MagnitudePruner (L2; removes channels and their inputs)"
    return [label, ratio, 1 - left / total, evaluate(pruned, loss_fn, test)[1], seconds]


def _resnet18() -> tuple[str, nn.Module]:
    from .models_scale import ResNet18

    source = "bench.models_scale.ResNet18"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        return source, ResNet18().eval()


def _resnet_table(cfg: Config) -> Table:
    source, model = _resnet18()
    count = sum(p.numel() for p in model.parameters())
    images = cfg.n(128, 16)
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(images, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (images,), generator=gen)
    data = [(inputs[i : i + 32], labels[i : i + 32]) for i in range(0, images, 32)]
    table = Table(
        f"layer_obs on a ResNet-18-sized CNN ({source}, {count:,} parameters; CIFAR-shaped "
        f"random images), {images} calibration images, CPU",
        ["sparsity", "structure", "wall time (s)", "CPU time (s)", "achieved sparsity", "layers"],
    )
    start, cpu = time.perf_counter(), time.process_time()
    result = curvscope.prune(model, nn.CrossEntropyLoss(), data, sparsity=0.5, method="layer_obs")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    table.add(0.5, "unstructured", seconds, cpu, float(result.sparsity), len(result.masks))
    table.notes.append(
        f"Load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
        "(CPU time counts every thread of the process)."
    )
    table.check("layer_obs to 50% on the ResNet-18-sized CNN in < 2 minutes on CPU",
                f"{seconds:.1f} s", seconds < 120)  # fmt: skip
    return table


def digits_cases(cfg: Config) -> list[Table]:
    with reuse_curvature():
        return [_accuracy_table(cfg, *_digits_problem(cfg))]


def cnn_cases(cfg: Config) -> list[Table]:
    problem = _cnn_problem(cfg)
    with reuse_curvature():  # the channel table reuses the dense blocks of the accuracy table
        return [_accuracy_table(cfg, *problem), _channel_table(cfg, *problem)]


def resnet_cases(cfg: Config) -> list[Table]:
    return [_resnet_table(cfg)]


CASES = [
    ("prune/digits", "Issue 14: pruning the digits MLP", digits_cases, False),
    ("prune/cnn", "Issue 14: pruning the small CNN", cnn_cases, False),
    (
        "prune/resnet18",
        "Issue 14: layer_obs on a ResNet-18",
        lambda cfg: [_resnet_table(cfg)],
        False,
    ),
]
