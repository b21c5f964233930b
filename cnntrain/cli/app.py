"""The command line's frame: the Typer app, its consoles, the error wrapper, help-text helpers.

``command`` is the wrapper every command is registered through (see the package docstring);
``default`` reads a help text's default from ``TrainConfig``.
"""

# ruff: noqa: E501

from __future__ import annotations

import dataclasses
import errno
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from cnntrain import __version__
from cnntrain.cli.group import CnnTrainGroup
from cnntrain.config import TrainConfig
from cnntrain.errors import CnnTrainError, UsageError, first_line

app = typer.Typer(
    name="cnntrain",
    help="Train, fine-tune, evaluate and run CNN image classifiers (PyTorch + torchvision).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=CnnTrainGroup,
)
# Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns; logs can be wider.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])
Opt = typer.Option


# --------------------------------------------------------------------------- errors and help texts


def fail(exc: CnnTrainError) -> NoReturn:
    """One line, whatever the message carries (DataLoader workers append their traceback).

    Under torchrun other ranks name themselves, and stay silent when stopped by a signal
    (rank 0 already says where the run was saved)."""
    from cnntrain.train.distributed import rank
    from cnntrain.train.signals import Interrupted

    line = first_line(exc)
    if rank() == 0:
        err.print(f"[bold red]error:[/] {escape(line)}", markup=True, highlight=False)
    elif not isinstance(exc, Interrupted):
        err.print(f"[bold red]error (rank {rank()}):[/] {escape(line)}", markup=True, highlight=False)
    raise typer.Exit(exc.exit_code)


def path_refused(exc: OSError) -> CnnTrainError:
    """The one-line error for a path the operating system will not even look up: too long, in a
    folder without permission, too many levels of links. ``Path.exists()`` and ``is_file()`` raise
    these instead of answering False, so they can come from any check of any path option of any
    command; they are turned into an error here, once, rather than at each of those checks."""
    name = exc.filename if isinstance(exc.filename, str) else repr(exc.filename)
    kind = UsageError if exc.errno == errno.ENAMETOOLONG else CnnTrainError
    return kind(f"cannot use {first_line(name, 200)}: {exc.strerror or exc}")


def command(name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """``app.command``, with every ``CnnTrainError`` of the command leaving through ``fail``, and an
    ``OSError`` about a named path too (``path_refused``); any other exception is a bug to see whole."""

    def register(func: F) -> F:
        @functools.wraps(func)  # Typer reads the options from the wrapped signature
        def run(*args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except CnnTrainError as exc:
                fail(exc)
            except OSError as exc:
                if exc.filename is None:
                    raise
                fail(path_refused(exc))

        app.command(name, **kwargs)(run)
        return run  # type: ignore[return-value]

    return register


def check_choice(option: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"{option} must be one of {', '.join(choices)}, not {value!r}")


def one_of(choices: Sequence[str]) -> str:
    """``('a', 'b', 'c')`` -> ``'a, b or c'``, for help texts."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else "".join(choices)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def default(name: str, when_none: str = "none") -> str:
    """``(default: X)`` with X read from ``TrainConfig``; ``when_none`` says what None means."""
    value = _DEFAULTS[name]
    if value is None:
        text = when_none
    elif isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"(default: {text})"


def _version(value: bool) -> None:
    if value:
        print(f"cnntrain {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """cnntrain: transfer learning for image classifiers from the command line."""



def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
