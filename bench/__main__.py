"""``python -m bench``: run the benchmark cases and (optionally) write BENCHMARKS.md.

python -m bench                       # every case, printed
python -m bench --quick               # small sizes and few repeats (a smoke run)
python -m bench --only operators      # the cases whose name starts with "operators"
python -m bench --write BENCHMARKS.md # write the markdown report
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from .environment import header
from .harness import MALLOC_ENV, Config, Table


def _cases():
    from . import cases_analyze, cases_derivatives, cases_estimators, cases_operators

    return [
        *cases_derivatives.CASES,
        *cases_operators.CASES,
        *cases_estimators.CASES,
        *cases_analyze.CASES,
    ]


def _reexec_with_malloc_env() -> None:
    """Restart under the glibc settings that make peak-memory readings honest (harness.py)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    env = {**os.environ, **MALLOC_ENV}
    os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="write the markdown report to FILE")
    parser.add_argument("--only", metavar="PREFIX", action="append", help="case-name prefix")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    cases = _cases()
    if args.list:
        for name, title, _ in cases:
            print(f"{name:32s} {title}")
        return 0
    _reexec_with_malloc_env()
    cfg = Config(quick=args.quick, budget_s=1.0 if args.quick else 6.0)
    chosen = [c for c in cases if not args.only or any(c[0].startswith(p) for p in args.only)]
    if not chosen:
        parser.error(f"no case starts with {args.only}; see --list")
    started = time.perf_counter()
    sections: list[str] = []
    for name, title, run in chosen:
        print(f"== {name}: {title}", file=sys.stderr, flush=True)
        case_start = time.perf_counter()
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
