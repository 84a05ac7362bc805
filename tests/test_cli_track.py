"""`curvscope track`: the built-in run, a user's model, and bad input."""

import json
from pathlib import Path

import pytest
import torch
import user_model
from typer.testing import CliRunner

from curvscope.cli.app import app

USER = ["--model", "user_model:build_model", "--data", "user_model:build_data"]


def invoke(*args: str, out: Path):
    return CliRunner().invoke(app, ["track", *args, "--out", str(out), "--device", "cpu"])


def test_built_in_run_writes_a_self_contained_report(tmp_path):
    out = tmp_path / "track"
    result = invoke("--steps", "40", "--every", "20", "--quiet", out=out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "results.json", "sharpness.png"]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == [0, 20, 40] and len(results["sharpness"]) == 3
    assert results["threshold"] == 2.0 and results["lr"] == 1.0 and results["status"] == "completed"
    assert len(results["losses"]) == 41 and results["losses"][-1] < results["losses"][0]
    assert all(r > 0 for r in results["residual_norms"][0])
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html and "https://" not in html
    assert (out / "sharpness.png").read_bytes().startswith(b"\x89PNG")


def test_user_model_first_record_is_the_dense_top_eigenvalue(tmp_path):
    out = tmp_path / "track"
    args = [*USER, "--lr", "0.5", "--steps", "10", "--every", "5", "--top-k", "2"]
    result = invoke(*args, "--dtype", "float64", "--optimizer", "momentum", "--quiet", out=out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == [0, 5, 10] and results["threshold"] == pytest.approx(3.8 / 0.5)
    model = user_model.build_model()
    inputs, labels = user_model.full_data()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(flat):
        pieces = flat.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        output = torch.func.functional_call(model, params, (inputs,))
        return torch.nn.functional.cross_entropy(output, labels)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    top = torch.linalg.eigvalsh(torch.func.hessian(loss)(theta)).flip(0)[:2]
    first = torch.tensor(results["eigenvalues"][0])
    assert torch.all((first - top).abs() <= torch.tensor(results["residual_norms"][0]) + 1e-12)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--lr", "0"], "--lr 0.0: expected a learning rate > 0"),
        (["--lr", "-0.1"], "--lr -0.1: expected a learning rate > 0"),
        (["--steps", "0"], "--steps 0: expected an integer >= 1"),
        (["--every", "0"], "--every 0: expected an integer >= 1"),
        (["--optimizer", "adam"], "--optimizer 'adam': unknown; expected one of gd, momentum"),
        (["--model", "user_model:build_model"], "--data is missing"),
        (["--checkpoint", "x.pt"], "--checkpoint needs --model"),
        ([*USER, "--loss", "nope"], "--loss 'nope': unknown loss"),
        (["--dtype", "float16"], "--dtype 'float16': unknown"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_directory(args, phrase, tmp_path):
    out = tmp_path / "track"
    result = invoke(*args, out=out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curvscope: error: "), result.stderr
    assert phrase in lines[0], lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []
