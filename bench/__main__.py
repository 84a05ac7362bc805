"""``python -m bench``: run the benchmark cases and (optionally) write BENCHMARKS.md.

python -m bench                       # every case, printed
python -m bench --quick               # small sizes and few repeats (a smoke run)
python -m bench --only operators      # the cases whose name starts with "operators"
python -m bench --write BENCHMARKS.md # write the markdown report
python -m bench --only scale --write BENCHMARKS.md  # re-measure some cases: only their
                                      # sections of BENCHMARKS.md are replaced (report.py)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .environment import header
from .harness import MALLOC_ENV, MEMORY, Config, Table
from .report import merge, section

#: Case modules run first, in this order; every other ``bench/cases_*.py`` follows by name.
_FIRST = [
    "derivatives",
    "operators",
    "estimators",
    "lanczos_scale",
    "analyze",
    "scale",
    "structured",
]


def _cases():
    """Every case of every ``bench/cases_*.py`` module (a new module needs no registration)."""
    found = sorted(path.stem[len("cases_") :] for path in Path(__file__).parent.glob("cases_*.py"))
    names = [name for name in _FIRST if name in found] + [n for n in found if n not in _FIRST]
    return [case for name in names for case in importlib.import_module(f"bench.cases_{name}").CASES]


def _memory_child(name: str, quick: bool) -> list[dict[str, float]] | None:
    """Run case ``name`` in a child process that only measures peak memory (harness.py)."""
    command = [sys.executable, "-m", "bench", "--memory-child", name]
    command += ["--quick"] if quick else []
    env = {**os.environ, **MALLOC_ENV}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"memory child of {name} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_memory_child(cases, name: str, quick: bool) -> int:
    MEMORY.child = True
    (run,) = [c[2] for c in cases if c[0] == name]
    with contextlib.redirect_stdout(sys.stderr):
        run(Config(quick=quick, budget_s=1.0 if quick else 6.0))
    print(json.dumps(MEMORY.recorded))
    return 0


def _write(args, cfg: Config, total: float, sections: dict, cases: list, chosen: int) -> None:
    """Merge the sections measured so far into ``args.write`` (report.py)."""
    order = [c[0] for c in cases]
    ran = "every case" if chosen == len(cases) else ", ".join(sections)
    replace = args.replace and len(sections) == 1  # drop the old sections once, at the start
    report = merge(args.write, header(cfg, total, ran), sections, order, replace=replace)
    with open(args.write, "w") as out:
        out.write(report)
    print(f"wrote {args.write}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write",
        metavar="FILE",
        help="write the markdown report to FILE, replacing only the sections of the cases run",
    )
    parser.add_argument(
        "--replace", action="store_true", help="with --write: drop the sections not run"
    )
    parser.add_argument("--only", metavar="PREFIX", action="append", help="case-name prefix")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--memory-child", metavar="CASE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = _cases()
    if args.list:
        for name, title, _, _ in cases:
            print(f"{name:32s} {title}")
        return 0
    if args.memory_child:
        return _run_memory_child([c[:3] for c in cases], args.memory_child, args.quick)
    cfg = Config(quick=args.quick, budget_s=1.0 if args.quick else 6.0)
    chosen = [c for c in cases if not args.only or any(c[0].startswith(p) for p in args.only)]
    if not chosen:
        parser.error(f"no case starts with {args.only}; see --list")
    started = time.perf_counter()
    sections: dict[str, str] = {}
    for name, title, run, measures_memory in chosen:
        print(f"== {name}: {title}", file=sys.stderr, flush=True)
        case_start = time.perf_counter()
        MEMORY.replay = _memory_child(name, args.quick) if measures_memory else None
        try:
            tables: list[Table] = run(cfg)
            text = "".join(t.markdown() + "\n" for t in tables)
        except Exception:  # one failing case must not hide the others
            text = f"**{name} failed:**\n\n```\n{traceback.format_exc()}```\n"
        elapsed = time.perf_counter() - case_start
        sections[name] = section(name, title, elapsed, text)
        print(sections[name], flush=True)
        if args.write:  # after every case, so that a killed run keeps what it measured
            _write(args, cfg, time.perf_counter() - started, sections, cases, len(chosen))
    print(f"== total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
