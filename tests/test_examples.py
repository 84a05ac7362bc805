"""Every script in examples/ runs with this Python and exits 0; the derivative examples print the
issue's exact numbers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))

#: Lines that must appear in the output of a script (the examples of the derivative API).
EXPECTED = {
    "jacobian_jvp_vjp.py": [
        "J = [[1.0, 1.0], [3.0, 2.0], [4.0, 0.0]]",
        "J v = [1.0, 3.0, 4.0]",
        "J^T u = [431.0, 21.0]",
    ],
    "hessian_quadratic.py": [
        "H = [[2.0, 1.0], [1.0, 6.0]]",
        "H v = [2.5, 4.0]",
        "diag(H) = [2.0, 6.0]",
    ],
    "higher_derivatives.py": ["order 1: 27", "order 2: 18", "order 3: 6", "order 4: 0"],
}


def run(script: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    completed = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=script.parent.parent,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, f"{script.name} failed:\n{completed.stderr[-3000:]}"
    return completed.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=[script.name for script in SCRIPTS])
def test_example_runs(script):
    output = run(script)
    for line in EXPECTED.get(script.name, []):
        assert line in output.splitlines(), f"{script.name}: missing {line!r} in\n{output}"


def test_log_and_sqrt_closed_forms_hold():
    output = run(EXAMPLES / "log_sqrt_closed_forms.py")
    errors = [float(line.rsplit("=", 1)[1]) for line in output.splitlines() if "max |" in line]
    assert len(errors) == 2 and max(errors) < 1e-12


def test_derivative_examples_exist():
    names = {script.name for script in SCRIPTS}
    assert set(EXPECTED) | {"log_sqrt_closed_forms.py"} <= names
