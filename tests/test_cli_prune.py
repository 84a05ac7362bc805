"""`curvscope prune`: the built-in example, a user's model, and bad input."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curvscope.cli.app import app

USER = ["--model", "user_model:build_model", "--data", "user_model:build_data"]


def invoke(*args: str, tmp_path: Path):
    out = tmp_path / "pruned"
    result = CliRunner().invoke(app, ["prune", *args, "--out", str(out), "--device", "cpu"])
    return result, out


def test_built_in_example_writes_page_json_and_png(tmp_path):
    args = ["--sparsity", "0.5", "0.9", "--methods", "magnitude", "layer_obs", "--json"]
    result, out = invoke(*args, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert json.loads(result.stdout) == saved
    points = {(p["method"], p["sparsity"]): p for p in saved["points"]}
    assert set(points) == {(m, s) for m in ["magnitude", "layer_obs"] for s in [0.5, 0.9]}
    assert saved["dense_test_accuracy"] > 0.9 and saved["layers"] == ["0.weight", "2.weight"]
    for point in points.values():
        assert point["achieved"] == pytest.approx(point["sparsity"], abs=1e-3)
        assert 0 <= point["test_accuracy"] <= 1 and point["test_loss"] > 0
    assert points["layer_obs", 0.9]["test_accuracy"] > points["magnitude", 0.9]["test_accuracy"]
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "http" not in html.replace("http-equiv", "")
    assert "Sparsity per layer" in html and "layer_obs @ 0.9" in html
    assert (out / "accuracy_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curvscope prune" in result.stderr  # the summary table goes to stderr with --json


def test_user_model_with_structure_and_test_data(tmp_path):
    args = [*USER, "--test-data", "user_model:build_data", "--structure", "channel",
            "--sparsity", "0.5", "--methods", "obs", "obd", "--quiet"]  # fmt: skip
    result, out = invoke(*args, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["structure"] == "channel" and len(saved["points"]) == 2
    assert result.stdout == ""


BAD_INPUTS = [
    (["--sparsity", "1.5"], "--sparsity 1.5: expected numbers in [0, 1)"),
    (["--sparsity", "0.5", "-0.2"], "--sparsity -0.2"),
    (["--sparsity", "half"], "--sparsity half"),
    (["--methods", "obs", "random"], "--methods 'random': unknown"),
    (["--structure", "5:4"], "--structure '5:4'"),
    (["--structure", "blocks"], "--structure 'blocks'"),
    (["--scope", "model"], "--scope 'model'"),
    (["--damping", "-1"], "--damping -1.0"),
    (["--curvature", "exact"], "--curvature 'exact'"),
    (["--model", "user_model:build_model"], "--data is missing"),
    ([*USER, "--params", "nothing.here"], "matches no parameter"),
    ([*USER, "--params", "0.bias", "--methods", "layer_obs"], "curvscope.prune(params=...)"),
]


@pytest.mark.parametrize(("args", "match"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_no_report(args, match, tmp_path):
    result, out = invoke(*args, tmp_path=tmp_path)
    assert result.exit_code == 2, result.output
    assert match in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("curvscope: error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_help_lists_the_options():
    result = CliRunner().invoke(app, ["prune", "--help"])
    assert result.exit_code == 0
    for option in ["--sparsity", "--methods", "--curvature", "--structure", "--test-data"]:
        assert option in result.output
