"""curvscope.analyze and Report: values against dense float64 references, JSON, saving, HTML."""

import base64
import json
import subprocess
import sys

import pytest
import torch
import user_model

import curvscope
from curvscope.cli.loading import BadInputError, resolve_params
from curvscope.report import html, plots
from curvscope.report.analyze import layer_groups
from curvscope.report.landscape import quadratic_radius


def _dense_hessian(model, names):
    inputs, labels = user_model.full_data()
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        update = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        outputs = torch.func.functional_call(model, {**params, **update}, (inputs,))
        return torch.nn.functional.cross_entropy(outputs, labels)

    return torch.func.hessian(loss)(flat).detach(), loss, flat


@pytest.fixture(scope="module")
def analysed():
    model = user_model.build_model()
    report = curvscope.analyze(
        model,
        torch.nn.CrossEntropyLoss(),
        user_model.build_data(),
        top_k=2,
        bottom_k=2,
        trace_matvecs=90,
        seed=3,
        progress=False,
    )
    return model, report


def test_analyze_matches_dense_hessian(analysed):
    model, report = analysed
    names = [name for name, _ in model.named_parameters()]
    hessian, loss, flat = _dense_hessian(model, names)
    values = torch.linalg.eigvalsh(hessian)
    torch.testing.assert_close(report.top.values, values.flip(0)[:2], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(report.bottom.values, values[:2], rtol=1e-5, atol=1e-8)
    assert report.trace.value == pytest.approx(float(hessian.trace()), rel=1e-8)
    assert report.loss == pytest.approx(float(loss(flat)), rel=1e-12)
    gradient = torch.func.grad(loss)(flat)
    assert report.gradient_norm == pytest.approx(float(gradient.norm()), rel=1e-8)
    assert report.diagonal.estimate.value.shape == (26,)
    assert (report.num_params, report.num_examples, report.curvature) == (26, 30, "hessian")


def test_per_layer_blocks_match_dense_blocks(analysed):
    model, report = analysed
    assert [layer.name for layer in report.layers] == ["0", "2"]
    for layer in report.layers:
        block, _, _ = _dense_hessian(model, list(layer.param_names))
        top = float(torch.linalg.eigvalsh(block)[-1])
        assert float(layer.top_eigenvalue.values[0]) == pytest.approx(top, rel=1e-6)
        assert float(layer.trace.value) == pytest.approx(float(block.trace()), rel=1e-6)
        assert layer.num_params == block.shape[0]


def test_landscape_and_quadratic_model(analysed):
    _, report = analysed
    scape = report.landscape
    middle = len(scape.top.t) // 2
    assert scape.top.t[middle] == 0.0
    assert scape.top.loss[middle] == pytest.approx(report.loss, rel=1e-12)
    assert scape.top.quadratic[middle] == pytest.approx(report.loss, rel=1e-12)
    assert scape.top.curvature == pytest.approx(float(report.top.values[0]))
    assert scape.grid is not None and len(scape.grid.loss) == 15 and len(scape.grid.loss[0]) == 15
    assert scape.num_loss_evaluations == 2 * 21 + 15 * 15
    # near t = 0 the quadratic model is accurate (its error is third order in t), not far away
    error = [abs(a - b) for a, b in zip(scape.top.loss, scape.top.quadratic, strict=True)]
    change = [abs(q - report.loss) for q in scape.top.quadratic]
    assert error[middle + 1] < 0.1 * change[middle + 1]
    assert error[middle + 1] / change[middle + 1] < error[-1] / change[-1]
    assert 0 < scape.top.quadratic_radius <= scape.radius


def test_steps_count_time_and_products(analysed):
    _, report = analysed
    names = [step.name for step in report.steps]
    assert names == [
        "operator set-up", "loss and gradient", "top eigenvalues", "bottom eigenvalues", "trace",
        "spectral density", "diagonal", "per-layer blocks", "landscape",
    ]  # fmt: skip
    by_name = {step.name: step for step in report.steps}
    assert by_name["trace"].num_matvecs == report.trace.num_matvecs <= 90
    assert by_name["landscape"].num_loss_evaluations == 267
    assert report.num_matvecs == sum(step.num_matvecs for step in report.steps)
    assert all(step.seconds >= 0 for step in report.steps)


def test_to_dict_is_json_and_round_trips(analysed):
    _, report = analysed
    data = report.to_dict()
    assert data["schema_version"] == 1
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert json.loads(report.to_json()) == data
    assert "vectors" not in data["top"]
    assert data["top"]["values"] == pytest.approx(report.top.values.tolist())
    assert data["landscape"]["grid"]["loss"][7][7] == pytest.approx(report.loss)
    assert set(data["interpretation"]) >= {"sharpness", "stationarity", "gradient", "trace"}
    assert data["seconds"] == pytest.approx(report.seconds)


def test_readings_say_minimum_or_saddle(analysed):
    _, report = analysed
    lowest = float(report.bottom.values.min())
    reading = report.interpretation["stationarity"]
    assert reading.startswith("saddle" if lowest < -0.01 * report.top.values[0] else "")
    assert report.interpretation["sharpness"].split(":")[0] in ("sharp", "flat", "moderately sharp")


def test_save_writes_every_file_and_replaces_atomically(analysed, tmp_path):
    _, report = analysed
    target = report.save(tmp_path / "out")
    names = sorted(p.name for p in target.iterdir())
    assert names == [
        "density.png", "diagonal.png", "eigenvalues.png", "index.html", "landscape_1d.png",
        "landscape_2d.png", "layers.png", "results.json",
    ]  # fmt: skip
    for name in names:
        if name.endswith(".png"):
            assert (target / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads((target / "results.json").read_text()) == report.to_dict()
    (target / "stale.txt").write_text("old")
    report.save(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_leaves_nothing(analysed, tmp_path, monkeypatch):
    _, report = analysed

    def broken(_report):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(plots, "render_figures", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        report.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_report(analysed, tmp_path, monkeypatch):
    _, report = analysed
    report.save(tmp_path / "out")
    before = (tmp_path / "out" / "index.html").read_text()
    monkeypatch.setattr(html, "render_html", lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        report.save(tmp_path / "out")
    assert (tmp_path / "out" / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_html_has_every_section_and_inline_pngs(analysed):
    _, report = analysed
    page = report.to_html()
    for section in ("summary", "eigenvalues", "density", "landscape", "layers"):
        assert f'<section id="{section}">' in page
    sources = page.split('src="data:image/png;base64,')[1:]
    assert len(sources) == 6
    for source in sources:
        assert base64.b64decode(source.split('"')[0]).startswith(b"\x89PNG")
    assert "http://" not in page and "https://" not in page
    fragment = report._repr_html_()
    assert "<html" not in fragment and '<section id="summary">' in fragment


def test_minimal_report_without_optional_parts(tmp_path):
    report = curvscope.analyze(
        user_model.build_model(),
        torch.nn.CrossEntropyLoss(),
        user_model.build_data(),
        curvature="fisher",
        top_k=1,
        bottom_k=0,
        trace_matvecs=9,
        density=False,
        per_layer=False,
        landscape=False,
        progress=False,
    )
    assert report.bottom is None and report.density is None and report.landscape is None
    assert report.layers == ()
    page = report.to_html()
    assert "Not computed (density=False)" in page and "Not computed (landscape=False)" in page
    assert sorted(report.figures()) == ["diagonal.png", "eigenvalues.png"]
    json.loads(report.to_json())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"curvature": "kfac"}, ValueError, r"analyze\(curvature=...\): expected one of"),
        ({"top_k": 0}, ValueError, r"analyze\(top_k=...\): expected an integer >= 1"),
        ({"bottom_k": -1}, ValueError, r"analyze\(bottom_k=...\): expected an integer >= 0"),
        ({"trace_matvecs": 2}, ValueError, r"analyze\(trace_matvecs=...\): expected an integer"),
        ({"seed": 1.5}, TypeError, r"analyze\(seed=...\): expected an integer"),
    ],
)
def test_analyze_validates_its_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        curvscope.analyze(
            user_model.build_model(), torch.nn.CrossEntropyLoss(), user_model.build_data(),
            **kwargs,
        )  # fmt: skip


def test_analyze_refuses_a_non_module():
    with pytest.raises(TypeError, match=r"analyze\(model=...\): expected a torch.nn.Module"):
        curvscope.analyze(lambda x: x, torch.nn.CrossEntropyLoss(), user_model.build_data())


def test_helpers():
    assert layer_groups(["a.w", "a.b", "c"]) == {"a": ["a.w", "a.b"], "c": ["c"]}
    assert quadratic_radius([-1.0, 0.0, 1.0, 2.0], [1.0, 0.0, 1.0, 9.0], [1, 0, 1, 4], 0.0) == 1.0
    model = user_model.build_model()
    assert resolve_params(model, "0.weight,2.bias") == ["0.weight", "2.bias"]
    assert resolve_params(model, r"\d\.bias") == ["0.bias", "2.bias"]
    assert resolve_params(model, None) is None
    with pytest.raises(BadInputError, match="matches no parameter"):
        resolve_params(model, "3.*")


def test_importing_curvscope_does_not_import_plotting_or_cli_libraries():
    code = (
        "import sys, curvscope; "
        "print(sorted(m for m in ('matplotlib', 'jinja2', 'typer') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def uncertain():
    model = user_model.build_model()
    report = curvscope.analyze(
        model, torch.nn.CrossEntropyLoss(), user_model.build_data(), top_k=1, bottom_k=0,
        trace_matvecs=9, density=False, per_layer=False, landscape=False, progress=False,
        held_out=user_model.build_held_out(),
    )  # fmt: skip
    return model, report


def test_uncertainty_section_matches_a_laplace_approximation(uncertain):
    from curvscope.laplace.predictive import reliability

    model, report = uncertain
    u = report.uncertainty
    assert report.steps[-1].name == "uncertainty (Laplace)"
    assert u.structure == "kfac" and (u.num_validation, u.num_test) == (10, 10)
    la = curvscope.LaplaceApproximation(
        model, torch.nn.CrossEntropyLoss(), user_model.build_data(), structure="kfac", subset="all"
    )
    for delta, value in zip(u.prior_grid, u.log_evidence, strict=True):
        assert value == pytest.approx(la.log_marginal_likelihood(delta), abs=1e-9)
    best = max(u.log_evidence)
    assert la.log_marginal_likelihood(u.prior_evidence) >= best - 1e-9
    assert u.validation_nll[u.prior_grid.index(u.prior_validation)] == min(u.validation_nll)
    held = user_model.build_held_out()
    x = torch.cat([xb for xb, _ in held])
    y = torch.cat([yb for _, yb in held])
    odd = torch.cat([torch.arange(1, 12, 2), 12 + torch.arange(1, 8, 2)])  # the test half
    with torch.no_grad():
        trained = reliability(torch.softmax(model(x[odd]), dim=1), y[odd])
    assert u.metrics["trained"]["nll"] == pytest.approx(trained["nll"], rel=1e-12)
    la.prior_precision = u.prior_validation
    laplace = reliability(la.predict(x[odd]), y[odd])
    assert u.metrics["laplace_validation"]["nll"] == pytest.approx(laplace["nll"], rel=1e-9)
    assert u.metrics["laplace_validation"]["ece"] == pytest.approx(laplace["ece"], rel=1e-9)


def test_uncertainty_in_json_figures_and_html(uncertain):
    _, report = uncertain
    data = report.to_dict()
    assert json.loads(report.to_json()) == data
    assert data["uncertainty"]["prior_evidence"] == report.uncertainty.prior_evidence
    assert set(data["uncertainty"]["metrics"]) == {
        "trained", "laplace_evidence", "laplace_validation",
    }  # fmt: skip
    assert {"evidence.png", "reliability.png"} <= set(report.figures())
    page = report.to_html()
    assert '<section id="uncertainty">' in page and "prior by validation" in page


def test_uncertainty_is_skipped_without_held_out_data_or_when_turned_off(analysed):
    _, report = analysed
    assert report.uncertainty is None
    assert "Not computed (needs held-out data" in report.to_html()
    off = curvscope.analyze(
        user_model.build_model(), torch.nn.CrossEntropyLoss(), user_model.build_data(), top_k=1,
        bottom_k=0, trace_matvecs=9, density=False, per_layer=False, landscape=False,
        progress=False, held_out=user_model.build_held_out(), uncertainty=False,
    )  # fmt: skip
    assert off.uncertainty is None and off.to_dict()["uncertainty"] is None
