"""The one atomic save of a report directory, used by every report type.

A report (``index.html``, ``results.json`` and its PNG figures) is built in a temporary
directory beside the target and moved into place with one rename, so a failed or interrupted
save never leaves a half-written directory; an existing report directory is replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


def save_report(
    directory: str | os.PathLike[str],
    *,
    figures: Callable[[], Mapping[str, bytes]],
    to_json: Callable[[], str],
    to_html: Callable[[Mapping[str, bytes]], str],
) -> Path:
    """Write the figures, ``results.json`` and ``index.html`` into ``directory``, atomically.

    Args:
        directory: where the report goes (created; its parent is created if missing).
        figures: returns the PNG files, ``{file name: bytes}``.
        to_json: returns the text of ``results.json``.
        to_html: returns the text of ``index.html`` given the figures.

    Returns:
        The report directory as a resolved ``Path``.
    """
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staging.chmod(0o755)
        pngs = figures()
        for name, png in pngs.items():
            (staging / name).write_bytes(png)
        (staging / "results.json").write_text(to_json(), encoding="utf-8")
        (staging / "index.html").write_text(to_html(pngs), encoding="utf-8")
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is swapped out, then removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
