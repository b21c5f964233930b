"""The rules of the command line that are not any one command's: spellings, usage errors, help.

Typer parses ``cnntrain``'s arguments; this group class, given to ``typer.Typer(cls=...)``,
changes three things about how it does so, for every command at once:

- the tutorials' spelling of an on/off option, ``--freeze-layers False`` or ``--amp=true``,
  means what it says instead of an "unexpected extra argument";
- a usage error, Typer's own included, is one line on stderr and exit code 2, as every other
  cnntrain error is, instead of a boxed block; an empty path (an unset shell variable) is one,
  where Python would read it as the current folder;
- the help shows no type for on/off options (``<bool>``) and arguments by their names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from typer.core import TyperArgument, TyperGroup, TyperOption

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def _flags(command: Any) -> dict[str, tuple[str, str | None]]:
    """Every on/off option of ``command``: its spellings -> (the 'on' spelling, the 'off' one or None)."""
    found: dict[str, tuple[str, str | None]] = {}
    for param in command.params:
        if isinstance(param, TyperOption) and param.is_bool_flag:
            on = next(o for o in param.opts if o.startswith("--"))
            off = next((o for o in param.secondary_opts if o.startswith("--")), None)
            for spelling in (*param.opts, *param.secondary_opts):
                found[spelling] = (on, off) if spelling not in param.secondary_opts else (off or on, on)
    return found


def _as_word(value: str) -> bool | None:
    word = value.strip().lower()
    return True if word in TRUE_WORDS else False if word in FALSE_WORDS else None


def spell_flags(command: Any, args: Sequence[str]) -> list[str]:
    """``--flag True|False`` and ``--flag=yes|no`` rewritten as ``--flag`` / ``--no-flag``.

    A false value of an option without a ``--no-`` form leaves it out, which is what "off"
    means for it. Words after ``--`` are never touched: they are arguments."""
    flags = _flags(command)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        name, eq, attached = arg.partition("=")
        value = _as_word(attached) if eq else (_as_word(args[i + 1]) if i + 1 < len(args) else None)
        if name in flags and value is not None:
            on, off = flags[name]
            chosen = on if value else off
            if chosen is not None:
                out.append(chosen)
            i += 1 if eq else 2
            continue
        out.append(arg)
        i += 1
    return out


def _is_path(param: Any) -> bool:
    import pathlib

    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return isinstance(annotation, type) and issubclass(annotation, pathlib.PurePath)


def empty_path(command: Any, args: Sequence[str]) -> str | None:
    """The first path option given an empty value (``--data-path "$DATA_DIR"`` with the variable
    unset), which would otherwise mean the current folder; None when there is none."""
    paths = {o for p in command.params if isinstance(p, TyperOption) and _is_path(p) for o in p.opts}
    for i, arg in enumerate(args):
        if arg == "--":
            break
        name, eq, attached = arg.partition("=")
        value = attached if eq else (args[i + 1] if i + 1 < len(args) else None)
        if name in paths and value is not None and not value.strip():
            return name
    return None


def _subcommand(group: TyperGroup, args: Sequence[str]) -> Any:
    name = next((a for a in args if not a.startswith("-")), None)
    return group.commands.get(name) if name else None


def _one_line(exc: Any) -> str:
    """Click's message, plus where the help is, on one line."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
    return f"{message}{where}"


def _usage_name(param: TyperArgument) -> str:
    """The usual convention, ``IMAGE...``, ``[PATTERN]``, ``[ARCH]...``, not Typer's ``{IMAGE}...``."""
    name = param.display_name_raw
    many = "..." if param.nargs != 1 else ""
    return f"{name}{many}" if param.required else f"[{name}]{many}"


def _tidy_help(command: Any) -> None:
    """No ``<bool>`` beside on/off options; arguments by their names, not ``{inputs}... <list[str]>``."""
    make_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for param in command.params:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
        elif isinstance(param, TyperArgument):
            usage = _usage_name(param)
            # Typer has no setting for these two; the instance attributes shadow its methods.
            param._usage_display_name = lambda usage=usage: usage  # type: ignore[method-assign,misc]
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]


class CnnTrainGroup(TyperGroup):
    """The ``cnntrain`` group: every command parses under the rules of this module."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for command in (self, *self.commands.values()):
            _tidy_help(command)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

        args = list(sys.argv[1:] if args is None else args)
        command = _subcommand(self, args)
        try:
            if command is not None:
                args = spell_flags(command, args)
                if (empty := empty_path(command, args)) is not None:
                    raise UsageError(f"{empty} is empty (an unset shell variable?); give a path, or leave the option "
                                     "out for its default")
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # the help is already printed
            if not standalone_mode:
                raise
            sys.exit(exc.exit_code)
        except ClickException as exc:
            if not standalone_mode:
                raise
            from cnntrain.cli.app import err

            err.print(f"[bold red]error:[/] {_escape(_one_line(exc))}", markup=True, highlight=False)
            sys.exit(exc.exit_code)
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
