"""The benchmark harness: timing, peak memory, tables and the environment header.

Timing: every variant of a case is warmed up once, then timed several times in the same
process, the variants interleaved round-robin so that a slow drift of the (shared) machine hits
all of them alike; we report the median. Ratios are always between variants measured in the same
round-robin.

Peak memory on CPU: torch's CPU tensors are invisible to tracemalloc, so we read the kernel's
resident-set high-water mark. Before a measured call we write ``5`` to ``/proc/self/clear_refs``
(Linux >= 4.0), which resets ``VmHWM`` to the current ``VmRSS``; the peak of the call is then
``VmHWM - VmRSS`` read just before it. Memory is measured in a child process per case
(``python -m bench --memory-child CASE``) run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at
4 KiB, so that every tensor larger than a page is its own mmap, returned to the kernel when
freed: freed memory is then not silently reused by the next call, and the high-water mark is
the honest peak of the call alone. Timings come from the parent process, which keeps the
default allocator. On CUDA we use ``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: glibc settings under which the resident-set high-water mark is an honest per-call peak.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096"}


class _Memory:
    """Where peak memory comes from. In a memory child (``python -m bench --memory-child``),
    ``memory_variants`` measures and records, and ``time_variants`` does nothing; in the timing
    process, ``memory_variants`` replays what the child recorded, in the same order."""

    child = False
    recorded: list[dict[str, float]] = []  # noqa: RUF012 - process-wide state, on purpose
    replay: list[dict[str, float]] | None = None


MEMORY = _Memory()


@dataclass
class Config:
    """What the cases may spend: ``quick`` shrinks repeats and problem sizes for smoke runs."""

    quick: bool = False
    repeats: int = 5
    budget_s: float = 6.0

    def n(self, full: int, quick: int) -> int:
        """A size or count: ``full`` normally, ``quick`` under ``--quick``."""
        return quick if self.quick else full


@dataclass
class Timing:
    """Median (and all) wall times of one variant, in seconds."""

    median: float
    times: list[float]

    @property
    def repeats(self) -> int:
        return len(self.times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _once(fn: Callable[[], Any]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def time_variants(
    variants: dict[str, Callable[[], Any]], cfg: Config, *, min_repeats: int = 1
) -> dict[str, Timing]:
    """Warm each variant up once, then time them interleaved; the repeats of each variant are
    chosen so that it spends about ``cfg.budget_s`` (between ``min_repeats`` and a cap)."""
    if MEMORY.child:
        return {name: Timing(float("nan"), [float("nan")]) for name in variants}
    warm = {name: _once(fn) for name, fn in variants.items()}
    cap = 3 if cfg.quick else 50
    wanted = {
        name: max(min_repeats, min(cap, int(cfg.budget_s / max(t, 1e-6))))
        for name, t in warm.items()
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(max(wanted.values())):
        for name, fn in variants.items():
            if round_ < wanted[name]:
                times[name].append(_once(fn))
    return {name: Timing(statistics.median(ts), ts) for name, ts in times.items()}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory(fn: Callable[[], Any], *, device: str = "cpu") -> float:
    """Peak memory of one call of ``fn`` above what was live before it, in bytes.

    The result of ``fn`` is kept until the peak is read, so it counts.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return float(peak)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM") - before
    del result
    return float(peak * 1024)


def time_once(variants: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """One cold call of each variant, in seconds: for variants that take minutes, where a
    warm-up would double the cost and one-off set-up is part of what is measured."""
    if MEMORY.child:
        return {name: float("nan") for name in variants}
    out = {}
    for name, fn in variants.items():
        gc.collect()
        start = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - start
    return out


def memory_variants(
    variants: dict[str, Callable[[], Any]], *, warm: bool = True
) -> dict[str, float]:
    """Peak memory (bytes) of one call of each variant, each after a warm-up call (none with
    ``warm=False``, for variants that take minutes).

    Measured in a separate child process run under ``MALLOC_ENV`` (see the module docstring),
    so that the timing process keeps glibc's default allocator behaviour.
    """
    if not MEMORY.child:
        if MEMORY.replay:
            recorded = MEMORY.replay.pop(0)
            return {name: recorded.get(name, float("nan")) for name in variants}
        return {name: float("nan") for name in variants}
    out = {}
    for name, fn in variants.items():
        if warm:
            fn()
        out[name] = peak_memory(fn)
    MEMORY.recorded.append(out)
    return out


# -- tables ------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """A target checked against a measurement."""

    target: str
    measured: str
    passed: bool | None
    why: str = ""

    @property
    def label(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


@dataclass
class Table:
    """One measured table: a title, columns, rows, free-form notes and verdicts."""

    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    def add(self, *row: Any) -> None:
        self.rows.append(list(row))

    def check(self, target: str, measured: str, passed: bool | None, why: str = "") -> None:
        self.verdicts.append(Verdict(target, measured, passed, why))

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in self.rows]
        if self.verdicts:
            lines += ["", "| target | measured | result |", "|---|---|---|"]
            for v in self.verdicts:
                result = v.label + (f": {v.why}" if v.why and v.passed is not True else "")
                lines.append(f"| {v.target} | {v.measured} | {result} |")
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def fmt(value: Any) -> str:
    """Format a table cell: floats with 3-4 significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.3g}"
    return str(value)


def ms(seconds: float) -> float:
    return seconds * 1e3


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")
