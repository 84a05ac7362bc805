"""The README's API tour must run as written: every ```python block, in order, in one namespace."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_an_api_tour():
    assert len(_python_blocks()) >= 3


def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(_python_blocks()):
        try:
            exec(compile(block, f"README.md block {number}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the failure message is the point
            pytest.fail(f"README.md python block {number} failed: {error!r}\n{block}")
