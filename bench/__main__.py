"""``python -m bench``: run the benchmark cases and (optionally) write BENCHMARKS.md.

python -m bench                       # every case, printed
python -m bench --quick               # small sizes and few repeats (a smoke run)
python -m bench --only operators      # the cases whose name starts with "operators"
python -m bench --write BENCHMARKS.md # write the markdown report
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback

from .environment import header
from .harness import MALLOC_ENV, MEMORY, Config, Table


def _cases():
    from . import cases_analyze, cases_derivatives, cases_estimators, cases_operators
    from .cases_influence import CASES as INFLUENCE
    from .cases_lanczos_scale import CASES as LANCZOS_SCALE

    return [
        *cases_derivatives.CASES,
        *cases_operators.CASES,
        *cases_estimators.CASES,
        *LANCZOS_SCALE,
        *cases_analyze.CASES,
        *INFLUENCE,
    ]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="write the markdown report to FILE")
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
    sections: list[str] = []
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
        section = f"## {title}\n\n_case `{name}`, {elapsed:.0f} s_\n\n{text}"
        print(section, flush=True)
        sections.append(section)
    total = time.perf_counter() - started
    print(f"== total {total:.0f} s", file=sys.stderr)
    if args.write:
        report = header(cfg, total) + "\n" + "\n".join(sections)
        with open(args.write, "w") as out:
            out.write(report)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
