"""The ``db-retry`` command line: ``check``, ``demo`` and ``markers``, as plain argparse subparsers."""

import argparse
import collections.abc
import importlib.metadata
import sys
import textwrap
import typing

from db_retry import demo, health, markers
from db_retry.validation import number_argument


__all__ = ["build_parser", "main"]

DISTRIBUTION: typing.Final = "db-retry"

CHECK_DESCRIPTION: typing.Final = """\
Probe every host of DSN at once and print reachability, connect latency, role,
server version and replication lag, and which host each target_session_attrs
value would pick. DSN is a URL (postgresql://user:password@host:5432/db, several
hosts as ?host=h1:5432&host=h2:5432) or a libpq connection string
('host=h1,h2 port=5432,5432 dbname=db user=app').

The lag columns, for standbys (a primary shows -):
  LAG BYTES   WAL the primary has written that this standby has not replayed
              yet (needs a reachable primary in the DSN)
  UNREPLAYED  WAL this standby has received but not replayed yet, in bytes
  LAG S       0 when nothing the primary wrote is missing, else seconds since
              the last replayed commit (also needs a reachable primary)

Exit status: 0 when some host satisfies the DSN's target_session_attrs, 1 when
none does, 2 on a malformed DSN or bad options."""

DEMO_DESCRIPTION: typing.Final = f"""\
Start a throwaway PostgreSQL primary and streaming standby on loopback ports,
run bank transfers through db-retry (SERIALIZABLE transactions, retries, a
multi-host read-write connection) for --duration seconds while the --faults are
injected one after another, then check that no money was lost or created and
that every transfer reported as done is in the ledger exactly once. Needs the
PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup); the
servers are stopped at the end.

Faults: {", ".join(demo.FAULTS)}.
Ctrl-C stops the faults and prints the report so far, with the invariant check.

Exit status: 0 when the invariant holds, 1 when it breaks, 2 on bad options or
missing server binaries, 130 after Ctrl-C."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; option help wrapped between words only (never inside ``restart-fast``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source tree on sys.path, never installed
        return "unknown"


def _add_check(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "check",
        help="probe every host of a DSN: reachable, latency, role, version, replication lag",
        description=CHECK_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("dsn", metavar="DSN", help="a PostgreSQL URL or libpq connection string, one host or several")
    parser.add_argument(
        "--timeout",
        type=number_argument(unit="seconds"),
        default=health.DEFAULT_TIMEOUT,
        metavar="S",
        help=f"connect timeout of each host in seconds (default {health.DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=health.run_check)


def _add_demo(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run transfers through the library on a throwaway cluster while injecting faults",
        description=DEMO_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--duration",
        type=number_argument(unit="seconds"),
        default=demo.DEFAULT_DURATION,
        metavar="S",
        help="how long the transfers run, in seconds (default: %(default)g)",
    )
    parser.add_argument(
        "--workers",
        type=number_argument(minimum=1, inclusive=True, integer=True),
        default=demo.DEFAULT_WORKERS,
        metavar="N",
        help="concurrent callers (default: %(default)s)",
    )
    parser.add_argument(
        "--accounts",
        type=number_argument(minimum=2, inclusive=True, integer=True),
        default=demo.DEFAULT_ACCOUNTS,
        metavar="N",
        help="accounts money moves between (default: %(default)s)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(demo.FAULTS),
        metavar="LIST",
        help=f"faults to inject, comma-separated, in order, from: {', '.join(demo.FAULTS)} (default: all four); "
        "an empty string for none",
    )
    parser.add_argument(
        "--topology",
        choices=demo.TOPOLOGIES,
        default="kit",
        help="what the transfers go through: kit (the kit's primary + standby, multi-host DSN), patroni (a Patroni "
        "cluster, multi-host DSN; faults switchover, failover), haproxy (the same through HAProxy), pgbouncer "
        "(transaction pooling; faults restart-fast, restart-immediate), moving-endpoint (one address that moves "
        "to the promoted standby; fault move); default: %(default)s. --faults defaults to all of the topology's",
    )
    parser.add_argument(
        "--markers",
        choices=demo.MARKER_MODES,
        default="both",
        help="which transfers write a commit marker (resolve_commit='marker'), so that a COMMIT lost to a fault is "
        "resolved by whichever primary answers next: every other worker, side by side with the rest under the same "
        "faults (both), all (on) or none (off); default: %(default)s. The report counts outcome-unknown transfers "
        "with markers and without",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON (progress goes to stderr)")
    parser.set_defaults(handler=demo.run_demo_command)


MARKERS_DESCRIPTION: typing.Final = f"""\
Manage the commit-marker table that resolve_commit="marker" writes to
({markers.TABLE}).

  install  create the schema and the table if missing (needs the CREATE
           privilege on the database); run it once, before the first call
           with resolve_commit="marker"
  prune    delete markers older than --retention seconds, in batches; run it
           from a scheduler at least once per retention, so the table holds
           at most two retentions' worth of markers

With several hosts in DSN, the one that takes writes is used. Exit status: 0
when done, 1 when the server refused, 2 on a malformed DSN or bad options."""


def _add_markers(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    parser = subparsers.add_parser(
        "markers",
        help="install or prune the commit-marker table of resolve_commit='marker'",
        description=MARKERS_DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("action", choices=("install", "prune"), help="what to do")
    parser.add_argument("dsn", metavar="DSN", help="a PostgreSQL URL or libpq connection string, one host or several")
    parser.add_argument(
        "--retention",
        type=number_argument(unit="seconds"),
        default=markers.DEFAULT_RETENTION,
        metavar="S",
        help="prune: keep markers younger than this, in seconds (default: %(default)g); it must be longer than "
        "DB_RETRY_OUTAGE_TIMEOUT, the time a lost COMMIT is resolved within",
    )
    parser.set_defaults(handler=markers.run_markers_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="db-retry",
        description=(
            "Async PostgreSQL reliability for SQLAlchemy + asyncpg: retries, multi-host failover, "
            "transactions, and a fault-injection test kit."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_check(subparsers)
    _add_demo(subparsers)
    _add_markers(subparsers)
    return parser


def main(argv: collections.abc.Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: collections.abc.Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)
