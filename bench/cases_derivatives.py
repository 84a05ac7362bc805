"""Issue 2: exact derivatives of functions (Hessian, Jacobian, HVP, chunked memory)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

import curvscope

from . import models
from .harness import Config, Table, memory_variants, mib, ms, ratio, time_variants

MISSING = "curvscope.{} is not implemented yet"


def _bind(fn: Callable, *args, **kwargs) -> Callable[[], object]:
    return lambda: fn(*args, **kwargs)


def flat_loss(problem: models.Problem, num_samples: int, dtype=torch.float32):
    """The mean cross-entropy of the model on the first samples as f(theta), theta flat (P,)."""
    inputs, targets = problem.full_batch
    inputs, targets = inputs[:num_samples].to(dtype), targets[:num_samples]
    model = problem.model.to(dtype)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(dtype)

    def f(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = flat[start : start + size].view(shape)
            start += size
        return F.cross_entropy(functional_call(model, params, (inputs,)), targets)

    return f, theta


def loop_hessian(f: Callable, theta: torch.Tensor) -> torch.Tensor:
    """The classic forum answer: one backward pass per row of the Hessian."""
    theta = theta.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    rows = [torch.autograd.grad(grad[i], theta, retain_graph=True)[0] for i in range(len(grad))]
    return torch.stack(rows)


def _hessian_case(cfg: Config, problem: models.Problem, num_samples: int) -> Table:
    f, theta = flat_loss(problem, num_samples)
    table = Table(
        f"Full Hessian of the digits MLP loss, {theta.numel():,} parameters, {num_samples:,} "
        "samples (float32)",
        ["method", "median time (ms)", "repeats", "time / curvscope", "max abs diff to loop"],
    )
    variants = {
        "(a) loop of autograd.grad rows": lambda: loop_hessian(f, theta),
        "(b) autograd.functional.hessian(vectorize=True)": lambda: (
            torch.autograd.functional.hessian(f, theta, vectorize=True)
        ),
        "(c) torch.func.hessian": lambda: torch.func.hessian(f)(theta),
    }
    has = hasattr(curvscope, "hessian")
    if has:
        variants["curvscope.hessian"] = lambda: curvscope.hessian(f, theta)
    reference = loop_hessian(f, theta)
    diffs = {name: float((fn() - reference).abs().max()) for name, fn in variants.items()}
    times = time_variants(variants, cfg)
    base = times["curvscope.hessian"].median if has else float("nan")
    for name, timing in times.items():
        row = [name, ms(timing.median), timing.repeats, ratio(timing.median, base), diffs[name]]
        table.add(*row)
    if not has:
        table.notes.append(MISSING.format("hessian"))
        return table
    fastest_name = min((n for n in times if n.startswith("(")), key=lambda n: times[n].median)
    speedup = times[fastest_name].median / base
    table.check(
        "curvscope no slower than the fastest of (a)-(c)",
        f"fastest peer {fastest_name[:3]} / curvscope = {speedup:.2f}x",
        speedup >= 1.0,
        "curvscope.hessian is slower than that composition on this size",
    )
    if num_samples == 128:
        loop = times["(a) loop of autograd.grad rows"].median / base
        table.check(
            ">= 5x faster than the loop on 128 samples",
            f"{loop:.1f}x",
            loop >= 5.0,
            "the loop is already cheap at this size on this CPU",
        )
    return table


def hessian_cases(cfg: Config) -> list[Table]:
    problem = models.digits()
    sizes = [128, 512] if cfg.quick else [128, 1797]
    return [_hessian_case(cfg, problem, n) for n in sizes]


def hessian_memory(cfg: Config) -> list[Table]:
    problem = models.digits()
    num_samples = 512 if cfg.quick else 1797
    f, theta = flat_loss(problem, num_samples)
    table = Table(
        f"Peak memory of the full Hessian ({theta.numel():,} parameters, {num_samples:,} "
        "samples): chunk_size against unchunked",
        ["method", "peak memory (MiB)", "memory / unchunked", "median time (ms)"],
    )
    if not hasattr(curvscope, "hessian"):
        table.notes.append(MISSING.format("hessian"))
        return [table]
    variants = {
        "curvscope.hessian (unchunked)": lambda: curvscope.hessian(f, theta),
        "curvscope.hessian(chunk_size=256)": lambda: curvscope.hessian(f, theta, chunk_size=256),
        "curvscope.hessian(chunk_size=32)": lambda: curvscope.hessian(f, theta, chunk_size=32),
        "(a) loop of autograd.grad rows": lambda: loop_hessian(f, theta),
    }
    memory = memory_variants(variants)
    times = time_variants(variants, cfg)
    base = memory["curvscope.hessian (unchunked)"]
    for name in variants:
        table.add(name, mib(memory[name]), ratio(memory[name], base), ms(times[name].median))
    table.notes.append(
        f"The result itself is {theta.numel() ** 2 * 4 / 2**20:.1f} MiB and is part of every peak."
    )
    small = memory["curvscope.hessian(chunk_size=32)"] / base
    table.check(
        "a small chunk_size lowers the peak",
        f"chunk_size=32 uses {small:.2f}x the unchunked peak",
        small < 1.0,
        "no memory saved",
    )
    return [table]


def _mlp_map(d_in: int, d_out: int, width: int = 256) -> Callable:
    generator = torch.Generator().manual_seed(3)
    w1 = torch.randn(width, d_in, generator=generator) / d_in**0.5
    w2 = torch.randn(d_out, width, generator=generator) / width**0.5
    return lambda x: torch.tanh(w2 @ torch.tanh(w1 @ x))


def jacobian_cases(cfg: Config) -> list[Table]:
    table = Table(
        "Jacobian of a tall (32 -> 2048) and a wide (2048 -> 32) map: mode='auto' against "
        "forward and reverse",
        ["map", "auto (ms)", "forward (ms)", "reverse (ms)", "auto / best", "repeats"],
    )
    if not hasattr(curvscope, "jacobian"):
        table.notes.append(MISSING.format("jacobian"))
        return [table]
    for label, d_in, d_out in [("tall 32 -> 2048", 32, 2048), ("wide 2048 -> 32", 2048, 32)]:
        f = _mlp_map(d_in, d_out)
        x = torch.randn(d_in, generator=torch.Generator().manual_seed(4))
        variants = {
            m: _bind(curvscope.jacobian, f, x, mode=m) for m in ("auto", "forward", "reverse")
        }
        times = time_variants(variants, cfg, min_repeats=10)
        best = min(times["forward"].median, times["reverse"].median)
        r = times["auto"].median / best
        table.add(
            label,
            *(ms(times[m].median) for m in ("auto", "forward", "reverse")),
            r,
            times["auto"].repeats,
        )
        table.check(f"{label}: auto within 1.15x of the better mode", f"{r:.2f}x", r <= 1.15)
    return [table]


def hvp_cases(cfg: Config) -> list[Table]:
    problem = models.digits()
    table = Table(
        "HVP of the digits MLP loss (2,410 parameters): mode='auto' against both compositions, "
        "and against one gradient",
        [
            *("samples", "auto (ms)", "fwd-over-rev (ms)", "rev-over-rev (ms)", "gradient (ms)"),
            *("auto / best", "HVP(auto) / gradient"),
        ],
    )
    if not hasattr(curvscope, "hvp"):
        table.notes.append(MISSING.format("hvp"))
        return [table]
    for num_samples in [128, 512] if cfg.quick else [128, 1797]:
        f, theta = flat_loss(problem, num_samples)
        v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(5))
        modes = ("auto", "forward-over-reverse", "reverse-over-reverse")
        variants = {m: _bind(curvscope.hvp, f, theta, v, mode=m) for m in modes}
        variants["gradient"] = _bind(torch.func.grad(f), theta)
        times = time_variants(variants, cfg, min_repeats=10)
        med = {k: t.median for k, t in times.items()}
        best = min(med["forward-over-reverse"], med["reverse-over-reverse"])
        r = med["auto"] / best
        table.add(
            num_samples,
            *(ms(med[k]) for k in (*modes, "gradient")),
            r,
            med["auto"] / med["gradient"],
        )
        table.check(f"{num_samples} samples: auto within 1.1x of the faster", f"{r:.2f}x", r <= 1.1)
    return [table]


CASES = [
    ("derivatives/hessian", "Issue 2: full Hessian of the digits MLP loss", hessian_cases, False),
    ("derivatives/jacobian", "Issue 2: Jacobian mode selection", jacobian_cases, False),
    ("derivatives/hvp", "Issue 2: Hessian-vector products", hvp_cases, False),
    ("derivatives/memory", "Issue 2: peak memory of chunked Hessians", hessian_memory, True),
]
