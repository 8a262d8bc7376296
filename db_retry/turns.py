"""Turns on the server: the calls of one hot call site take turns across processes and event loops.

A hot spot that lives in one event loop cannot see its rivals in other worker processes, pods or
threads with loops of their own. While :mod:`db_retry.retry` finds that a call site keeps losing
conflicts to rivals outside its loop, each transaction of that site's calls first takes a
transaction-scoped advisory lock keyed by the site (``pg_advisory_xact_lock(NAMESPACE, key)``), from
SQLAlchemy's ``begin`` event (:mod:`db_retry.engine`). PostgreSQL queues the rivals; COMMIT or
ROLLBACK releases the turn, whatever ends the transaction, also behind a transaction pooler.

The wait must not freeze the transaction's snapshot: under REPEATABLE READ and SERIALIZABLE the first
statement takes it, and a transaction that waited for its turn inside would read the rows as they
were before the previous turn committed, and lose to it. So the turn is *tried* (``pg_try_...``, no
wait). When a rival holds it, that transaction is rolled back (nothing ran in it yet), the wait
happens in a throwaway transaction of its own (the lock taken and let go at once: the previous turn
has ended), and a fresh transaction tries again. The wait is bounded by ``lock_timeout`` (the call's
patience, or less when its deadline is nearer); a call whose patience runs out goes ahead without a
turn. Waiting for a turn is not an attempt. A cancellation of the call cancels the wait (the
connection is discarded, as for any statement cut short). ``architecture/retry.md`` has the reasons.
"""

import contextvars
import dataclasses
import hashlib
import time
import typing

from db_retry.retriable import sqlstate_on_chain


# The first key of every advisory lock db-retry takes ("dbRT"); pg_locks shows it as classid, objsubid 2.
# The two-key form never collides with an application's own one-key (bigint) advisory locks.
NAMESPACE: typing.Final = 0x64625254
_LOCK_NOT_AVAILABLE: typing.Final = "55P03"
# Per placeholder style of each driver's DBAPI (asyncpg's adapter, psycopg): the wait for a turn, bounded.
# The subquery (scanned before the target list is computed) sets lock_timeout for the throwaway transaction
# before the lock is asked for.
_WAIT: typing.Final = {
    style: "SELECT pg_catalog.pg_advisory_xact_lock({namespace}, {key})::text "
    "FROM (SELECT pg_catalog.set_config('lock_timeout', " + mark + ", true)) AS patience"
    for style, mark in (("numeric_dollar", "$1"), ("pyformat", "%(ms)s"))
}


def site_key(module: str, qualname: str) -> int:
    """The lock key of a call site: the same in every process that runs this code (a signed 32-bit int)."""
    digest = hashlib.blake2b(f"{module}:{qualname}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclasses.dataclass(slots=True, eq=False, kw_only=True)
class TurnRequest:
    """One attempt of a hot call site asks its transactions to take the site's turn on the server."""

    key: int
    patience: float  # the longest this attempt waits for a turn, in seconds
    holder: object | None = None  # the connection state whose transaction holds the turn now
    waited: int = 0  # how many times a rival held the turn when this attempt asked for it
    timed_out: bool = False  # patience ran out: the attempt went ahead without a turn


# Set by ``postgres_retry`` around each attempt of a call site that takes turns on the server.
requested: contextvars.ContextVar[TurnRequest | None] = contextvars.ContextVar("db_retry_turn", default=None)


def take(
    dbapi_connection: typing.Any,  # noqa: ANN401 - the pool's connection proxy of any driver
    request: TurnRequest,
    paramstyle: str,
    *,
    time_left: float | None,
) -> bool:
    """Hold the site's turn for the transaction beginning on ``dbapi_connection``; False: went ahead without.

    Runs inside SQLAlchemy's ``begin`` event, before any statement of the caller: the driver sends
    BEGIN with the first statement, so rolling back here ends only what this function began.
    """
    wait = _WAIT.get(paramstyle)
    if wait is None:  # pragma: no cover - another driver's placeholder style
        return False
    attempt = f"SELECT pg_catalog.pg_try_advisory_xact_lock({NAMESPACE}, {request.key})"
    wait = wait.format(namespace=NAMESPACE, key=request.key)
    patience = request.patience if time_left is None else min(request.patience, time_left)
    give_up_at = time.monotonic() + patience
    cursor = dbapi_connection.cursor()
    try:
        while True:
            cursor.execute(attempt)
            if cursor.fetchone()[0]:
                return True
            request.waited += 1
            dbapi_connection.rollback()  # its snapshot predates the turn it waits for: begin afresh after
            left = give_up_at - time.monotonic()
            if left <= 0:
                request.timed_out = True
                return False
            limit = f"{max(1, int(left * 1000))}ms"
            try:
                cursor.execute(wait, (limit,) if paramstyle == "numeric_dollar" else {"ms": limit})
            except Exception as exc:
                if sqlstate_on_chain(exc) != _LOCK_NOT_AVAILABLE:
                    raise
                dbapi_connection.rollback()
                request.timed_out = True
                return False
            dbapi_connection.rollback()  # the previous turn has ended: let go, and try in a fresh transaction
    finally:
        cursor.close()
