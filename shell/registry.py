"""The meta-command registry (`.tables`, `.mode csv`, `\\dt`, `help`, ...) and how a meta-command
line is read.

A handler takes the shell state and its argument words and returns what to show: text (data, or
a confirmation for settings), a `Shown`, or a `ScriptRun` (`.read`: the script runner runs the
file). It never prints, so handlers are unit-tested without a terminal. `.help` is generated from
the registry (litecli's `@special_command` idea).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..query.errors import TdbqlError, nearest
from .output import ShellState, Shown


@dataclass(frozen=True)
class ScriptRun:
    """A handler's request to run a script file in place (`.read FILE`)."""

    path: Path


Handler = Callable[[ShellState, list[str]], "str | Shown | ScriptRun"]


@dataclass(frozen=True)
class MetaCommand:
    name: str
    usage: str
    help: str
    handler: Handler
    aliases: tuple[str, ...] = field(default=())
    setting: bool = False  # changes a shell setting; its output only confirms it
    arguments: tuple[str, ...] = ()  # what each argument is, for completion: table, file, or a|b|c choices
    fill_from: int = 0  # the first argument whose `$name` parameters are filled (.param NAME is a name)


REGISTRY: dict[str, MetaCommand] = {}
_WORDS = re.compile(r"\s*(\S+)\s*(.*)", re.S)


def meta_command(name: str, usage: str, help: str, aliases: tuple[str, ...] = (), setting: bool = False,
                 arguments: tuple[str, ...] = (), fill_from: int = 0):
    """Register a handler under `.name` and its aliases."""

    def register(handler: Handler) -> Handler:
        command = MetaCommand(name, usage, help, handler, aliases, setting, arguments, fill_from)
        for key in (name, *aliases):
            REGISTRY[key] = command
        return handler

    return register


def is_meta(text: str) -> bool:
    """Whether a statement that starts `text` is a meta-command: `.name`, a psql `\\name`, or `help`."""
    stripped = text.lstrip()
    if stripped[:1] in (".", "\\"):
        return True
    return re.match(r"help(\s|$)", stripped, re.IGNORECASE) is not None


def parse_meta(line: str) -> tuple[MetaCommand, list[str]]:
    """The command a meta-command line names, and its argument words (shell quoting)."""
    match = _WORDS.match(line)
    if match is None:
        raise TdbqlError("empty meta-command (try .help)")
    name, rest = match.group(1).lower(), match.group(2)
    command = REGISTRY.get(name)
    if command is None:
        raise TdbqlError(f"unknown command '{name}' (try .help)", suggestion=nearest(name, REGISTRY))
    try:
        args = shlex.split(rest)
    except ValueError as exc:
        raise TdbqlError(f"cannot read the arguments of {command.name}: {exc}") from exc
    return command, args


def commands() -> list[MetaCommand]:
    """Each registered command once, in registration order."""
    return list({id(c): c for c in REGISTRY.values()}.values())
