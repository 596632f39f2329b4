"""The `softmask-peft` command (also `python -m softmask_peft`).

The library itself has no subcommand: installed packages contribute them through the entry-point
group `softmask_peft.commands`, each entry point naming a `Command` (the benchmark harness,
`softmask_bench`, adds demo, bench and das-pretrain with the `bench` extra). The command's
arguments are only declared once it is chosen, so `softmask-peft --help` imports neither torch
nor the harness's dependencies.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from .errors import SoftMaskError

COMMAND_GROUP = "softmask_peft.commands"
INSTALL_HINT = 'the benchmark commands (demo, bench, das-pretrain) come with the bench extra: pip install "softmask-peft[bench]"'


@dataclass(frozen=True)
class Command:
    """One subcommand: its one-line help, how it declares its arguments, and what it runs.

    `run(args)` returns the exit status; a `SoftMaskError` it raises becomes exit status 2.
    `requires` are the import names the command needs beyond the core, which the extra
    `extra` installs; a missing one is named, with the pip command, before anything runs.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""
    epilog: str = ""
    requires: tuple[str, ...] = ()
    extra: str = "bench"


def installed_commands() -> dict[str, Command]:
    """The subcommands registered under `COMMAND_GROUP`, by name."""
    return {ep.name: ep.load() for ep in entry_points(group=COMMAND_GROUP)}


def _top_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softmask-peft",
        description="Continual learning without forgetting by soft-masking gradients with "
        "accumulated importance (SPG, DAS).",
        epilog=None if commands else f"No command is installed: {INSTALL_HINT}",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in sorted(commands):
        # arguments are declared by the command's own parser, once chosen
        sub.add_parser(name, help=commands[name].help, add_help=False)
    return parser


def _command_parser(name: str, command: Command) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"softmask-peft {name}",
        description=command.description or command.help,
        epilog=command.epilog or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, like argparse)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = installed_commands()
    wanted = next((a for a in argv if not a.startswith("-")), None)
    if wanted is not None and not commands:
        print(f"softmask-peft: no command {wanted!r}: {INSTALL_HINT}", file=sys.stderr)
        return 2
    top, rest = _top_parser(commands).parse_known_args(argv)
    command = commands[top.command]
    missing = [name for name in command.requires if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"softmask-peft {top.command}: needs {', '.join(missing)}, not installed: "
            f'pip install "softmask-peft[{command.extra}]"',
            file=sys.stderr,
        )
        return 2
    args = _command_parser(top.command, command).parse_args(rest)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return command.run(args)
    except SoftMaskError as e:
        print(f"softmask-peft {top.command}: error: {e}", file=sys.stderr)
        return 2
