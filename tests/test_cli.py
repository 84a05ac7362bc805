"""`curvscope analyze`: a user's model through --model/--data, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import user_model
from typer.testing import CliRunner

from curvscope.cli.app import app

TESTS = Path(__file__).parent
SMALL = ["--top-k", "2", "--bottom-k", "1", "--trace-matvecs", "20", "--no-density"]
USER = ["--model", "user_model:build_model", "--data", "user_model:build_data"]


def invoke(*args: str, tmp_path: Path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["analyze", *args, "--out", str(out), "--device", "cpu"])
    return result, out


def dense_reference(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and trace of the full-data Hessian, from torch.func."""
    model = user_model.build_model()
    model.load_state_dict(state)
    inputs, labels = user_model.full_data()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        outputs = torch.func.functional_call(model, params, (inputs,))
        return torch.nn.functional.cross_entropy(outputs, labels)

    hessian = torch.func.hessian(loss)(flat)
    return torch.linalg.eigvalsh(hessian), hessian.trace()


def test_user_model_with_checkpoint_matches_dense_hessian(tmp_path):
    model = user_model.build_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    args = [*USER, "--checkpoint", str(checkpoint), "--dtype", "float64", "--json", "--quiet"]
    result, out = invoke(*args, "--top-k", "2", "--bottom-k", "2", "--trace-matvecs", "90",
                         "--no-landscape", tmp_path=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "results.json").read_text())
    values, trace = dense_reference(model.state_dict())
    top = printed["top"]["values"]
    torch.testing.assert_close(torch.tensor(top), values.flip(0)[:2], rtol=1e-6, atol=1e-9)
    bottom = printed["bottom"]["values"]
    torch.testing.assert_close(torch.tensor(bottom), values[:2], rtol=1e-5, atol=1e-8)
    assert printed["trace"]["value"] == pytest.approx(float(trace), rel=1e-8)
    assert printed["trace"]["ci_low"] <= float(trace) + 1e-9 <= printed["trace"]["ci_high"] + 2e-9
    assert printed["num_params"] == 26 and printed["num_examples"] == 30
    assert printed["dtype"] == "float64"
    assert (out / "index.html").is_file()


def test_params_pattern_custom_loss_and_generator_data(tmp_path):
    args = ["--model", "user_model:build_model", "--data", "user_model:build_data_iterator"]
    result, _ = invoke(*args, "--loss", "user_model:half_squared_error", "--params", "2.*",
                         "--curvature", "ggn", "--no-landscape", "--json", "--quiet", *SMALL,
                         tmp_path=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["param_names"] == ["2.weight", "2.bias"]
    assert printed["num_params"] == 10 and printed["curvature"] == "ggn"


def test_summary_table_and_timings_are_printed(tmp_path):
    result, out = invoke(*USER, *SMALL, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    for word in ("largest eigenvalues", "trace", "time by step", "loading", "rendering"):
        assert word in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "diagonal.png", "eigenvalues.png", "index.html", "landscape_1d.png",
        "landscape_2d.png", "layers.png", "results.json",
    ]  # fmt: skip


BAD_INPUTS = [
    (["--model", "no_such_module:build", "--data", "user_model:build_data"], "cannot import"),
    (["--model", "user_model:no_such_factory", "--data", "user_model:build_data"], "no attribute"),
    (["--model", "user_model:NOT_CALLABLE", "--data", "user_model:build_data"], "callable"),
    (["--model", "user_model", "--data", "user_model:build_data"], "package.module:name"),
    (["--model", "user_model:build_string", "--data", "user_model:build_data"], "nn.Module"),
    (["--model", "user_model:build_broken", "--data", "user_model:build_data"], "cannot build"),
    (["--model", "user_model:build_model", "--data", "user_model:build_string"], "iterable"),
    (["--model", "user_model:build_model"], "--data is missing"),
    ([*USER, "--data", "user_model:build_wrong_width_data"], "does not fit"),
    ([*USER, "--loss", "hinge"], "unknown loss"),
    ([*USER, "--loss", "user_model:NOT_CALLABLE"], "expected a callable"),
    ([*USER, "--curvature", "kfac"], "--curvature 'kfac': unknown"),
    ([*USER, "--dtype", "float16"], "--dtype 'float16': unknown"),
    ([*USER, "--params", "nothing.here"], "matches no parameter"),
    ([*USER, "--checkpoint", "/nonexistent/weights.pt"], "no such file"),
    (["--checkpoint", "weights.pt"], "--checkpoint needs --model"),
]


@pytest.mark.parametrize(("args", "match"), BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_no_report(args, match, tmp_path):
    result, out = invoke(*args, *SMALL, tmp_path=tmp_path)
    assert result.exit_code == 2, result.output
    assert match in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("curvscope: error: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cuda_without_gpu_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "report"
    args = ["analyze", *USER, "--device", "cuda", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr
    assert not out.exists()


def test_checkpoint_with_wrong_keys_lists_missing_and_unexpected(tmp_path):
    state = user_model.build_model().state_dict()
    state["extra.weight"] = state.pop("2.bias")
    checkpoint = tmp_path / "weights.pt"
    torch.save(state, checkpoint)
    result, out = invoke(*USER, "--checkpoint", str(checkpoint), tmp_path=tmp_path)
    assert result.exit_code == 2
    assert "missing keys ['2.bias'], unexpected keys ['extra.weight']" in result.stderr
    assert not out.exists()


def test_checkpoint_with_wrong_shapes_is_bad_input(tmp_path):
    state = user_model.build_model().state_dict()
    state["2.bias"] = torch.zeros(7, dtype=torch.float64)
    torch.save(state, tmp_path / "w.pt")
    result, out = invoke(*USER, "--checkpoint", str(tmp_path / "w.pt"), tmp_path=tmp_path)
    assert result.exit_code == 2 and "size mismatch" in result.stderr
    assert not out.exists()


def test_checkpoint_carrying_code_is_refused(tmp_path):
    state = dict(user_model.build_model().state_dict())
    state["payload"] = user_model.Payload()
    torch.save(state, tmp_path / "code.pt")
    result, out = invoke(*USER, "--checkpoint", str(tmp_path / "code.pt"), tmp_path=tmp_path)
    assert result.exit_code == 2 and "refused to load" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unreadable_checkpoint_is_bad_input(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    result, out = invoke(*USER, "--checkpoint", str(tmp_path / "junk.pt"), tmp_path=tmp_path)
    assert result.exit_code == 2 and "junk.pt" in result.stderr
    assert not out.exists()


def test_crash_inside_the_computation_exits_1_and_writes_nothing(tmp_path):
    result, out = invoke(*USER, "--loss", "user_model:crashing_loss", *SMALL, tmp_path=tmp_path)
    assert result.exit_code == 1, result.output
    assert "boom inside the computation" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_help_lists_every_option():
    result = CliRunner().invoke(app, ["analyze", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--checkpoint", "--data", "--loss", "--curvature", "--params",
                   "--top-k", "--bottom-k", "--trace-matvecs", "--no-density", "--no-landscape",
                   "--device", "--dtype", "--seed", "--out", "--json", "--quiet",
                   "--held-out-data", "--no-uncertainty"):  # fmt: skip
        assert option in result.stdout


def _console_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "curvscope"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(script), "analyze", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip


def test_console_script_runs_a_user_model_and_refuses_bad_input(tmp_path):
    done = _console_script(*USER, *SMALL, "--quiet", "--json", "--out", "rep", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schema_version"] == 1
    assert (tmp_path / "rep" / "index.html").is_file()
    bad = _console_script(*USER, "--curvature", "kfac", "--out", "bad", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "curvscope: error: --curvature 'kfac': unknown; expected one of hessian, ggn, fisher."
    ]
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_demo_built_in_example_end_to_end(tmp_path):
    done = _console_script(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "curvscope-report" / "results.json").read_text())
    assert report["num_params"] == 2410 and report["num_examples"] == 1797 - 360  # 360 held out
    assert len(report["top"]["values"]) == 6 and len(report["bottom"]["values"]) == 3
    assert report["top"]["values"][0] > 0
    assert "time by step" in done.stdout and "training" in done.stdout
    uncertainty = report["uncertainty"]
    assert (uncertainty["num_validation"], uncertainty["num_test"]) == (180, 180)
    assert uncertainty["metrics"]["trained"]["accuracy"] > 0.8
    assert "uncertainty (test NLL)" in done.stdout
    assert (tmp_path / "curvscope-report" / "reliability.png").exists()


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    result, out = invoke(*USER, *SMALL, "--no-landscape", "--json", tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and not out.exists()


def test_held_out_data_adds_the_uncertainty_section_and_no_uncertainty_skips_it(tmp_path):
    held = ["--held-out-data", "user_model:build_held_out", "--no-landscape", "--json"]
    result, out = invoke(*USER, *SMALL, *held, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert report["uncertainty"]["num_test"] == 10
    assert report["settings"]["uncertainty"] is True
    assert (out / "evidence.png").exists() and (out / "reliability.png").exists()
    result, out = invoke(*USER, *SMALL, *held, "--no-uncertainty", tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["uncertainty"] is None
    result, _ = invoke(
        *USER, *SMALL, "--held-out-data", "user_model:build_string", tmp_path=tmp_path
    )
    assert result.exit_code == 2 and "--held-out-data 'user_model:build_string'" in result.output
