"""`curvscope influence`: a user's model through --model/--data, the built-in example, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import user_model
from typer.testing import CliRunner

import curvscope
from curvscope.cli.app import app

TESTS = Path(__file__).parent
USER = ["--model", "user_model:build_model", "--data", "user_model:build_data"]


def invoke(*args: str, tmp_path: Path):
    out = tmp_path / "influence"
    command = ["influence", *args, "--out", str(out), "--device", "cpu"]
    return CliRunner().invoke(app, command), out


def test_user_model_with_checkpoint_matches_the_python_api(tmp_path):
    model = user_model.build_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    args = [*USER, "--checkpoint", str(tmp_path / "weights.pt"), "--dtype", "float64"]
    result, out = invoke(*args, "--num-test", "4", "--top", "3", "--json", "--quiet",
                         "--damping", "0.1", tmp_path=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "results.json", "scores.png"]
    inputs, labels = user_model.full_data()
    influence = curvscope.InfluenceFunction(
        model, torch.nn.CrossEntropyLoss(), user_model.build_data(), damping=0.1
    )
    top = influence.top((inputs[:4], labels[:4]), k=3)
    assert printed["curvature"] == "ggn" and printed["solver"] == "exact"
    assert printed["num_params"] == 26 and printed["num_train"] == 30
    assert len(printed["examples"]) == 4
    for row, example in enumerate(printed["examples"]):
        assert [t["index"] for t in example["helpful"]] == top.helpful_indices[row].tolist()
        assert [t["index"] for t in example["harmful"]] == top.harmful_indices[row].tolist()
        scores = torch.tensor([t["score"] for t in example["helpful"]])
        torch.testing.assert_close(scores, top.helpful_scores[row], rtol=1e-12, atol=0)
    assert printed["solver_status"]["scores"]["status"] == "exact"
    assert printed["self_influence"][0]["score"] >= printed["self_influence"][-1]["score"]


def test_test_data_solver_and_summary(tmp_path):
    args = [*USER, "--test-data", "user_model:build_data", "--curvature", "hessian"]
    result, out = invoke(*args, "--solver", "cg", "--damping", "1.0", "--num-test", "2",
                         tmp_path=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    for word in ("most helpful", "cg", "time", "products", "report"):
        assert word in result.stdout
    saved = json.loads((out / "results.json").read_text())
    assert saved["solver"] == "cg" and saved["solver_status"]["scores"]["status"] == "converged"


BAD_INPUTS = [
    ([*USER, "--curvature", "newton"], "--curvature 'newton': unknown"),
    ([*USER, "--solver", "direct"], "--solver 'direct': unknown"),
    ([*USER, "--damping", "-1"], "--damping -1.0: expected a number >= 0"),
    ([*USER, "--num-test", "0"], "--num-test 0: expected an integer >= 1"),
    ([*USER, "--top", "0"], "--top 0: expected an integer >= 1"),
    ([*USER, "--max-batch-size", "0"], "--max-batch-size 0: expected an integer >= 1"),
    ([*USER, "--dtype", "float16"], "--dtype 'float16': unknown"),
    (["--model", "user_model:build_model"], "--data is missing"),
    (["--model", "no_such_module:build", "--data", "user_model:build_data"], "cannot import"),
    ([*USER, "--test-data", "user_model:build_wrong_width_data"], "does not fit"),
    (["--model", "user_model:build_model", "--data", "user_model:build_wrong_width_data"], "fit"),
    ([*USER, "--params", "nothing.here"], "matches no parameter"),
    ([*USER, "--checkpoint", "/nonexistent/weights.pt"], "no such file"),
    (["--checkpoint", "weights.pt"], "--checkpoint needs --model"),
    (["--flip-fraction", "1.5"], "--flip-fraction 1.5: expected a number in [0, 1)"),
]


@pytest.mark.parametrize(("args", "match"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_no_report(args, match, tmp_path):
    result, out = invoke(*args, tmp_path=tmp_path)
    assert result.exit_code == 2, result.output
    assert match in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("curvscope: error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_crash_inside_the_computation_exits_1_and_writes_nothing(tmp_path):
    result, out = invoke(*USER, "--loss", "user_model:crashing_loss", tmp_path=tmp_path)
    assert result.exit_code == 1, result.output
    assert "boom inside the computation" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_help_lists_every_option():
    result = CliRunner().invoke(app, ["influence", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--checkpoint", "--data", "--test-data", "--loss", "--curvature",
                   "--solver", "--damping", "--params", "--num-test", "--top", "--flip-fraction",
                   "--max-batch-size", "--device", "--dtype", "--seed", "--out", "--json",
                   "--quiet"):  # fmt: skip
        assert option in result.stdout


@pytest.mark.slow
def test_built_in_example_through_the_console_script(tmp_path):
    script = Path(sys.executable).parent / "curvscope"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent / "src")}
    done = subprocess.run(
        [str(script), "influence", "--curvature", "identity", "--num-test", "3", "--out", "inf"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "inf"
    saved = json.loads((out / "results.json").read_text())
    assert saved["num_train"] == 1500 and saved["num_flipped"] == 150
    assert saved["num_params"] == 2410 and len(saved["examples"]) == 3
    assert saved["flipped_auc"] > 0.9
    assert len(saved["examples"][0]["helpful"]) == 5
    assert sorted(p.name for p in out.iterdir()) == [
        "examples.png", "flipped_found.png", "index.html", "results.json", "scores.png",
        "self_influence.png",
    ]  # fmt: skip
    assert "flipped labels found" in done.stdout
