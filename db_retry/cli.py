"""The ``db-retry`` command line.

A subcommand is a function that takes the subparsers object, adds its own parser and sets a
``handler`` default: a function of the parsed arguments that returns the exit status. Listing that
function in :data:`COMMANDS` is all it takes to wire it in.
"""

import argparse
import collections.abc
import importlib.metadata
import sys
import typing

from db_retry.demo import add_demo_command
from db_retry.health import add_check_command


__all__ = ["COMMANDS", "Handler", "Registrar", "build_parser", "main"]

DISTRIBUTION: typing.Final = "db-retry"

Handler: typing.TypeAlias = collections.abc.Callable[[argparse.Namespace], int]
SubParsers: typing.TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # noqa: SLF001 - typeshed's name
Registrar: typing.TypeAlias = collections.abc.Callable[[SubParsers], None]

# Subcommands in the order `--help` lists them.
COMMANDS: tuple[Registrar, ...] = (add_demo_command, add_check_command)


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree on sys.path, never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="db-retry",
        description=(
            "Async PostgreSQL reliability for SQLAlchemy + asyncpg: retries, multi-host failover, "
            "transactions, and a fault-injection test kit."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    if COMMANDS:
        subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
        for register in COMMANDS:
            register(subparsers)
    return parser


def main(argv: collections.abc.Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
