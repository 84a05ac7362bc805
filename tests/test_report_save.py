"""``report._save.save_report``: the one atomic save of a report directory."""

from __future__ import annotations

import json

import pytest

from curvscope.report._save import save_report


def _save(directory, html=lambda figures: f"<p>{sorted(figures)}</p>", value=1):
    return save_report(
        directory,
        figures=lambda: {"a.png": b"\x89PNG"},
        to_json=lambda: json.dumps({"value": value}),
        to_html=html,
    )


def test_writes_the_files_and_replaces_an_old_report(tmp_path):
    target = _save(tmp_path / "nested" / "rep")
    assert target == (tmp_path / "nested" / "rep").resolve()
    assert sorted(p.name for p in target.iterdir()) == ["a.png", "index.html", "results.json"]
    assert (target / "index.html").read_text() == "<p>['a.png']</p>"
    (target / "stale.txt").write_text("old")
    _save(target, value=2)
    assert json.loads((target / "results.json").read_text()) == {"value": 2}
    assert not (target / "stale.txt").exists()
    assert [p.name for p in target.parent.iterdir()] == ["rep"]


def test_a_failure_keeps_the_previous_report_and_leaves_no_temporary(tmp_path):
    target = _save(tmp_path / "rep")

    def broken(figures):
        raise RuntimeError("render")

    with pytest.raises(RuntimeError, match="render"):
        _save(target, html=broken, value=2)
    assert json.loads((target / "results.json").read_text()) == {"value": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]
    with pytest.raises(RuntimeError):
        _save(tmp_path / "new", html=broken)
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]
