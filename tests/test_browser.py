"""The report opened in a real browser (Debian's headless chromium): images load, sections show.

CI (CI=true) installs chromium in .ci/run; there this test fails rather than skips without it.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import user_model

import curvscope

SECTIONS = ("summary", "eigenvalues", "density", "landscape", "layers", "uncertainty")

# Appended to a copy of the page: after load, record how many images failed to decode and
# which sections are rendered with a non-zero height.
PROBE = """
<script>
window.addEventListener("load", function () {
  var images = Array.from(document.images);
  var broken = images.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var shown = Array.from(document.querySelectorAll("section")).filter(function (s) {
    return s.offsetHeight > 0; }).map(function (s) { return s.id; });
  var mark = document.createElement("pre");
  mark.id = "probe";
  mark.textContent = "images=" + images.length + " broken=" + broken.length +
    " sections=" + shown.join(",");
  document.body.appendChild(mark);
});
</script>
"""


def _chromium() -> str:
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "chromium is not installed: .ci/run must install it (apt-get install chromium)"
            )
        pytest.skip("chromium is not installed (CI installs it)")
    return path


def _run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_report_loads_in_chromium_with_every_image_and_section(tmp_path):
    chromium = _chromium()
    report = curvscope.analyze(
        user_model.build_model(), torch.nn.CrossEntropyLoss(), user_model.build_data(),
        top_k=2, bottom_k=1, trace_matvecs=20, progress=False,
        held_out=user_model.build_held_out(),
    )  # fmt: skip
    directory = report.save(tmp_path / "report")
    page = (directory / "index.html").read_text(encoding="utf-8")
    probed = directory / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = _run_chromium(
        chromium, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
        probed.as_uri(),
    )  # fmt: skip
    match = re.search(r"images=(\d+) broken=(\d+) sections=([\w,]*)", done.stdout)
    assert match, f"no probe in the dumped page; chromium said: {done.stderr[-2000:]}"
    assert int(match.group(1)) == 8
    assert int(match.group(2)) == 0
    assert match.group(3).split(",") == list(SECTIONS)
    shot = tmp_path / "shot.png"
    _run_chromium(
        chromium, tmp_path / "profile", "--window-size=1280,900", f"--screenshot={shot}",
        (directory / "index.html").as_uri(),
    )  # fmt: skip
    assert shot.read_bytes().startswith(b"\x89PNG")
