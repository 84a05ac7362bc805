"""The shared pieces of the commands: the error wrapper and the multi-value command class."""

from __future__ import annotations

from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from curvscope.cli.loading import BadInputError
from curvscope.cli.options import MultiValueCommand, guarded


def _raise(error: BaseException):
    def run(**options):
        raise error

    return run


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (BadInputError("--x 3: expected 4."), 2, "curvscope: error: --x 3: expected 4.\n"),
        (KeyboardInterrupt(), 130, "curvscope: error: interrupted; no report was written.\n"),
        (
            RuntimeError("deep\n  inside"),
            1,
            "curvscope: error: the sweep failed (RuntimeError: deep inside); no report written.\n",
        ),
    ],
)
def test_guarded_turns_each_failure_into_one_line_and_an_exit_code(error, code, text, capsys):
    with pytest.raises(typer.Exit) as raised:
        guarded(_raise(error), {}, what="the sweep")
    assert raised.value.exit_code == code
    assert capsys.readouterr().err == text


def test_guarded_passes_the_options_through():
    seen = {}
    guarded(lambda **options: seen.update(options), {"a": 1, "b": "x"}, what="it")
    assert seen == {"a": 1, "b": "x"}


def _app() -> typer.Typer:
    app = typer.Typer()

    def command(
        values: Annotated[list[str] | None, typer.Option()] = None,
        name: Annotated[str, typer.Option()] = "",
    ) -> None:
        print(values, name)

    app.command(cls=MultiValueCommand)(command)
    return app


@pytest.mark.parametrize(
    ("args", "printed"),
    [
        (["--values", "0.5", "0.7", "-1", "--name", "a"], "['0.5', '0.7', '-1'] a"),
        (["--values", "magnitude", "obd"], "['magnitude', 'obd'] "),
        (["--name", "a", "--values", "1", "--values", "2"], "['1', '2'] a"),
        (["--name", "-2"], "None -2"),
    ],
)
def test_multi_value_command_reads_several_values_after_one_flag(args, printed):
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == printed


def test_multi_value_command_leaves_single_values_to_click():
    result = CliRunner().invoke(_app(), ["--name", "a", "b"])
    assert result.exit_code == 2
