"""Writing BENCHMARKS.md: one section per case, merged by case name into an existing file.

A section starts with ``## <title>`` and names its case on its first line of text,
``_case `NAME`, ..._`` (the first ``case `NAME``` in a section counts, so hand-edited lines
keep working).
``python -m bench --only PREFIX --write FILE`` replaces only the sections of the cases it ran
and keeps the others, so each case can be re-measured on its own; the header (machine,
versions, date, method) is always rewritten. Sections come in the order of the case registry;
sections of cases no longer registered, or without a case line, are kept at the end.
"""

from __future__ import annotations

import datetime
import os
import re

_CASE_LINE = re.compile(r"case `([^`]+)`")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def section(name: str, title: str, elapsed_s: float, body: str) -> str:
    """The markdown of one case: title, case line (name, time, date) and its tables."""
    return f"## {title}\n\n_case `{name}`, {elapsed_s:.0f} s, measured {now()}_\n\n{body}"


def split_sections(text: str) -> tuple[str, list[tuple[str | None, str]]]:
    """The header (everything before the first ``## ``) and the sections as (case name or
    None, text), in file order."""
    starts = [m.start() for m in re.finditer(r"^## ", text, flags=re.MULTILINE)]
    if not starts:
        return text, []
    header = text[: starts[0]]
    chunks = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    out = []
    for chunk in chunks:
        match = _CASE_LINE.search(chunk)
        out.append((match.group(1) if match else None, chunk.rstrip("\n") + "\n"))
    return header, out


def merge(
    path: str, header: str, new: dict[str, str], order: list[str], *, replace: bool = False
) -> str:
    """The new file text: ``header``, then per case in ``order`` the section just measured
    (``new``) or else the one already in ``path``; then the other old sections."""
    old: list[tuple[str | None, str]] = []
    if not replace and os.path.exists(path):
        with open(path) as existing:
            _, old = split_sections(existing.read())
    kept = {name: text for name, text in old if name is not None}
    body = [new.get(name) or kept.get(name) for name in order]
    body += [text for name, text in old if name is None or name not in order]
    return header + "\n" + "\n".join(s.rstrip("\n") + "\n" for s in body if s)
