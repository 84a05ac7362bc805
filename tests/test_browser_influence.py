"""The influence page opened in headless chromium: every image decodes, every section shows."""

import re

import torch
from test_browser import PROBE, _chromium, _run_chromium

from curvscope.report.influence_example import noisy_digits_example
from curvscope.report.influence_report import influence_report


def test_influence_page_loads_in_chromium_with_every_image_and_section(tmp_path):
    chromium = _chromium()
    example = noisy_digits_example(steps=30, dtype=torch.float64)
    inputs, labels = example.test
    report = influence_report(
        example.model, example.loss_fn, example.train, (inputs[:3], labels[:3]),
        curvature="identity", top=4, flipped=example.flipped, clean_labels=example.clean_labels,
    )  # fmt: skip
    directory = report.save(tmp_path / "influence")
    page = (directory / "index.html").read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    probed = directory / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = _run_chromium(
        chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
        probed.as_uri(),
    )  # fmt: skip
    match = re.search(r"images=(\d+) broken=(\d+) sections=([\w,-]*)", done.stdout)
    assert match, f"no probe in the dumped page; chromium said: {done.stderr[-2000:]}"
    assert int(match.group(1)) == 4
    assert int(match.group(2)) == 0
    assert match.group(3).split(",") == ["summary", "examples", "self-influence"]
