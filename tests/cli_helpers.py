"""Running the CLI in-process and reading its one-line errors, for the test files that need both."""

from __future__ import annotations

from typer.testing import CliRunner

from cnntrain.cli import app


def invoke(*args: str, code: int = 0):
    """``cnntrain ARGS`` in this process; asserts its exit code."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def one_line_error(result) -> str:
    """The command's error: one ``error:`` line on stderr, no traceback anywhere."""
    text = result.stderr.strip()
    assert text.startswith("error:") and "\n" not in text and "Traceback" not in result.output, result.output
    return text
