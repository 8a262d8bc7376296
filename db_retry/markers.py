"""Commit markers: a lost COMMIT resolved by whichever primary serves the cluster now, also after a failover.

A transaction id means nothing to another server (a promoted standby gives the same ids to other
transactions), but a row does. With ``resolve_commit="marker"`` the work's own transaction inserts one
row with a fresh id into :data:`TABLE` just before COMMIT (in the round trip that ``resolve_commit=True``
spends reading the transaction id). If the answer to COMMIT is lost, db-retry asks the primary that
answers now, through the engine's own connection factory, to insert the same id:

- the insert waits for a transaction still holding that id (it may still be committing), then finds the
  row (the work committed and is part of the history that survived) or not (it did not: safe to run
  again). The asking transaction is always rolled back.
- a standby is never asked: only a primary's history decides.

The table is created by :func:`install` (or ``db-retry markers install DSN``), never implicitly, and
emptied of markers older than the retention by :func:`prune` (or ``db-retry markers prune DSN``). Ids are
time-ordered (UUID version 7 layout), so pruning walks the primary key and the index grows at its right
edge, like a sequence's.
"""

import argparse
import asyncio
import os
import time
import typing
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db_retry.connections import build_connection_factory
from db_retry.dsn import DSNError, is_dsn_multihost, parse_url
from db_retry.validation import check_number


__all__ = ["DEFAULT_RETENTION", "TABLE", "install", "new_marker", "prune", "run_markers_command"]

SCHEMA: typing.Final = "db_retry"
TABLE: typing.Final = f"{SCHEMA}.commit_markers"
# Far longer than any resolution runs (DB_RETRY_OUTAGE_TIMEOUT, 40 s by default): a marker is needed only
# until the lost COMMIT it stands for is resolved.
DEFAULT_RETENTION: typing.Final = 3600.0
CONNECT_TIMEOUT: typing.Final = 10.0  # seconds, per host, for the commands
_DDL: typing.Final = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id uuid PRIMARY KEY)",
    (
        f"COMMENT ON TABLE {TABLE} IS 'db-retry commit markers: one row per write transaction with "
        'resolve_commit="marker"; pruned by db-retry markers prune\''
    ),
)


def new_marker(now: float | None = None) -> uuid.UUID:
    """A fresh marker id: 48 bits of milliseconds since the epoch, then 74 random bits (UUID version 7)."""
    milliseconds = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    random = int.from_bytes(os.urandom(10)) & ((1 << 74) - 1)
    value = (milliseconds << 80) | (0x7 << 76) | ((random >> 62) << 64) | (0b10 << 62) | (random & ((1 << 62) - 1))
    return uuid.UUID(int=value)


def _oldest_kept(retention: float) -> uuid.UUID:
    """The smallest id a marker made ``retention`` seconds ago or later can have."""
    milliseconds = int((time.time() - retention) * 1000) & ((1 << 48) - 1)
    return uuid.UUID(int=milliseconds << 80)


async def install(engine: AsyncEngine) -> None:
    """Create the marker table (and its schema) if missing; needs the CREATE privilege on the database."""
    async with engine.begin() as connection:
        for statement in _DDL:
            await connection.execute(sa.text(statement))


async def prune(engine: AsyncEngine, *, retention: float = DEFAULT_RETENTION, batch: int = 10_000) -> int:
    """Delete markers older than ``retention`` seconds, ``batch`` rows per transaction; the number deleted.

    Run it from a scheduler (``db-retry markers prune DSN``) at least once per retention: the table then
    holds at most the markers of the last two retentions. Batches skip rows another pruner holds.
    """
    check_number("retention", retention, unit="seconds")
    check_number("batch", batch, minimum=1, inclusive=True, integer=True)
    cutoff = str(_oldest_kept(retention))
    statement = sa.text(
        f"DELETE FROM {TABLE} WHERE id IN "  # noqa: S608 - a constant table name
        f"(SELECT id FROM {TABLE} WHERE id < CAST(:cutoff AS uuid) ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED)"
    )
    deleted = 0
    while True:
        async with engine.begin() as connection:
            count = (await connection.execute(statement, {"cutoff": cutoff, "batch": batch})).rowcount
        deleted += count
        if count < batch:
            return deleted


def run_markers_command(args: argparse.Namespace) -> int:
    """``db-retry markers install|prune DSN``: 0 when done, 1 when the server refused, 2 on a bad DSN."""
    try:
        url = parse_url(args.dsn).set(drivername="postgresql+asyncpg")
    except DSNError as exc:  # its message never shows the password
        print(f"db-retry markers: {exc}")  # noqa: T201
        return 2
    return asyncio.run(_run(args.action, url, args.retention))


def _writable_host(url: sa.URL) -> dict[str, typing.Any]:
    """Several hosts: the one that takes writes now, as the library's factory picks it."""
    if not is_dsn_multihost(url):
        return {}
    if "target_session_attrs" not in url.query:
        url = url.update_query_dict({"target_session_attrs": "read-write"})
    return {"async_creator": build_connection_factory(url, CONNECT_TIMEOUT)}


async def _run(action: str, url: sa.URL, retention: float) -> int:
    engine = create_async_engine(url, pool_size=1, **_writable_host(url))
    try:
        if action == "install":
            await install(engine)
            print(f"db-retry markers: {TABLE} is ready")  # noqa: T201
        else:
            deleted = await prune(engine, retention=retention)
            print(f"db-retry markers: deleted {deleted} markers older than {retention:g} s")  # noqa: T201
    except sa.exc.DBAPIError as exc:
        print(f"db-retry markers {action}: {type(exc.orig).__name__}: {exc.orig}")  # noqa: T201
        return 1
    finally:
        await engine.dispose()
    return 0
