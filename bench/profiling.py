"""Where the time goes: a reproducible torch.profiler summary of two calls side by side.

Used by the cases for every ratio that misses its target: the curvscope call and the plain
PyTorch call it is compared with are each profiled (after a warm-up call; calls under 0.5 s
are repeated and averaged), and the table lists the aten operators with the most self CPU
time in either, plus the time outside aten operators (Python, functorch and dispatcher
overhead), so that the extra time of the slower call can be read off row by row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile

from .harness import MEMORY, Table


def op_times(
    fn: Callable[[], Any], *, min_s: float = 0.5, max_calls: int = 50
) -> tuple[dict[str, tuple[float, int]], float]:
    """Profile ``fn``: aten op name -> (self CPU seconds, calls), and the wall time under the
    profiler (seconds), all per call of ``fn``. Calls that take milliseconds are repeated (up
    to ``max_calls``, about ``min_s`` in all) so that one hiccup of a shared machine does not
    make the table."""
    start = time.perf_counter()
    fn()
    repeats = max(1, min(max_calls, int(min_s / max(time.perf_counter() - start, 1e-6))))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        wall = (time.perf_counter() - start) / repeats
    out: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0 and event.key.startswith("aten::"):
            seconds, calls = out.get(event.key, (0.0, 0))
            out[event.key] = (seconds + event.self_cpu_time_total * 1e-6, calls + event.count)
    return {k: (s / repeats, round(c / repeats)) for k, (s, c) in out.items()}, wall


def profile_pair(
    title: str, ours: tuple[str, Callable[[], Any]], plain: tuple[str, Callable[[], Any]], top=8
) -> Table | None:
    """A table of the ``top`` aten ops (by self CPU time, in either call) of ``ours`` against
    ``plain``, with the time outside aten ops and the totals. None in a memory child."""
    if MEMORY.child:
        return None
    (ours_name, ours_fn), (plain_name, plain_fn) = ours, plain
    ours_ops, ours_wall = op_times(ours_fn)
    plain_ops, plain_wall = op_times(plain_fn)
    table = Table(
        f"Profile: {title}",
        ["aten op (self CPU)", f"{ours_name} (ms)", "calls", f"{plain_name} (ms)", "calls"],
    )
    names = set(ours_ops) | set(plain_ops)

    def worst(name: str) -> float:
        return max(ours_ops.get(name, (0.0, 0))[0], plain_ops.get(name, (0.0, 0))[0])

    for name in sorted(names, key=worst, reverse=True)[:top]:
        o, p = ours_ops.get(name, (0.0, 0)), plain_ops.get(name, (0.0, 0))
        table.add(name, o[0] * 1e3, o[1], p[0] * 1e3, p[1])
    rest = sorted(names, key=worst, reverse=True)[top:]
    table.add(
        "other aten ops",
        sum(ours_ops.get(n, (0.0, 0))[0] for n in rest) * 1e3,
        sum(ours_ops.get(n, (0.0, 0))[1] for n in rest),
        sum(plain_ops.get(n, (0.0, 0))[0] for n in rest) * 1e3,
        sum(plain_ops.get(n, (0.0, 0))[1] for n in rest),
    )
    ours_aten = sum(s for s, _ in ours_ops.values())
    plain_aten = sum(s for s, _ in plain_ops.values())
    table.add(
        "outside aten ops (Python, functorch, dispatch)",
        max(ours_wall - ours_aten, 0.0) * 1e3,
        "-",
        max(plain_wall - plain_aten, 0.0) * 1e3,
        "-",
    )
    table.add("wall time under the profiler", ours_wall * 1e3, "-", plain_wall * 1e3, "-")
    table.notes.append(
        "Per call, from one profiled call each (torch.profiler, CPU) after warm-up, or the "
        "mean of several where a call takes under 0.5 s; the profiler itself adds some "
        "overhead per op. Self CPU time summed over threads can exceed the wall time."
    )
    return table
