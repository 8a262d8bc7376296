"""Engine-level behaviour: what db-retry adds to every SQLAlchemy engine, through SQLAlchemy's public events.

Importing :mod:`db_retry` installs these listeners on :class:`sqlalchemy.engine.Engine` itself, so they
apply to every engine (sync or async, asyncpg or psycopg, any pool) whichever way the work commits:
``Connection.commit()``, ``async with engine.begin()``, ``Session.commit()``, ``async with
session.begin()`` or :class:`db_retry.Transaction`. All of them end in ``Connection._commit_impl``,
which fires the ``commit`` event and routes a failure through ``handle_error``.

- **A lost COMMIT** (the connection or the server went away while ``COMMIT`` was in flight) becomes
  :class:`CommitOutcomeUnknownError`: the transaction may or may not be committed, so it is not retried
  unless the call site opts in. A COMMIT that the server refused (``40001`` at commit, a deferred
  constraint) is a definite failure and keeps its error.
- **A node-role error** (``25006``: a write reached a read-only node, e.g. a demoted primary behind a
  DSN, DNS name or VIP that moved) counts as a disconnect: SQLAlchemy invalidates that connection and
  the pool's other connections of the same age, so the next checkout connects afresh (to the new
  primary, with the read-write factory) instead of going back to the read-only node. No round trip is
  added at checkout.
- **A connection the driver left unusable** without a SQLSTATE (asyncpg's protocol state errors) is
  treated as a disconnect too.
- **A server error that aborts the transaction** is remembered per (sub)transaction, so
  :class:`db_retry.Transaction` can tell without a round trip that it must roll back first.
- **Resolving a lost COMMIT** (opt-in: ``postgres_retry(resolve_commit=True)`` for a call site, or the
  execution option ``db_retry_resolve_commit=True`` for an engine or connection). Before ``COMMIT`` the
  transaction's id is read (``pg_current_xact_id_if_assigned()``, one round trip). If the answer to
  ``COMMIT`` is lost, a fresh connection asks the server (``pg_xact_status``), provided it is the same
  server on the same timeline: committed, the commit returns normally and the work goes on; aborted,
  or nothing written, :class:`CommitNotAppliedError` (retried); anything else, including a failover in
  between, :class:`CommitOutcomeUnknownError`.

``architecture/engine.md`` has the reasons.
"""

import asyncio
import contextvars
import dataclasses
import functools
import logging
import typing
import weakref

import sqlalchemy as sa
import tenacity
from sqlalchemy import event
from sqlalchemy.engine.interfaces import Dialect, ExceptionContext
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import await_only

from db_retry.retriable import (
    LOST_AT_COMMIT,
    ErrorKind,
    classify,
    leaves_connection_unusable,
    sqlstate_on_chain,
)


logger = logging.getLogger("db_retry.engine")

FAILED_IN: typing.Final = "db_retry_failed_transaction"
RESOLVE_OPTION: typing.Final = "db_retry_resolve_commit"
_COMMITTING: typing.Final = "db_retry_committing"
_WANT_RESOLUTION: typing.Final = "db_retry_want_resolution"
_IDENTITY: typing.Final = "db_retry_server_identity"
_VERDICT: typing.Final = "db_retry_commit_verdict"
READ_ONLY_SQLSTATE: typing.Final = "25006"
# Set by ``postgres_retry(resolve_commit=True)`` around the calls of its function.
resolve_commits: contextvars.ContextVar[bool] = contextvars.ContextVar("db_retry_resolve_commits", default=False)

_P = typing.ParamSpec("_P")
_T = typing.TypeVar("_T")


def resolving_commits(
    func: typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]],
) -> typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]]:
    """``func`` with lost COMMITs resolved while it runs (what ``postgres_retry(resolve_commit=True)`` uses)."""

    @functools.wraps(func)
    async def resolving(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        token = resolve_commits.set(True)
        try:
            return await func(*args, **kwargs)
        finally:
            resolve_commits.reset(token)

    return resolving


class CommitOutcomeUnknownError(sa.exc.OperationalError):
    """The connection was lost while ``COMMIT`` was in flight: the work may or may not be committed.

    Raised wherever the commit happens (``Connection``/``Session`` ``commit()`` and ``begin()`` blocks,
    :meth:`db_retry.Transaction.commit`). :func:`db_retry.postgres_retry` does not retry it (retrying
    could apply the work twice) unless the call site says ``retry_ambiguous_commit=True``. The driver's
    own error is ``orig`` and is chained as ``__cause__``.
    """

    db_retry_kind: typing.ClassVar[ErrorKind] = ErrorKind.AMBIGUOUS

    def __str__(self) -> str:
        return (
            "the connection was lost while COMMIT was in flight; the transaction may or may not have been "
            f"committed: {super().__str__()}"
        )


class CommitNotAppliedError(sa.exc.OperationalError):
    """The answer to ``COMMIT`` was lost, and the server has since said the transaction did not commit.

    Or it never wrote anything (no transaction id), or ``COMMIT`` was never sent. Safe to run the work
    again: :func:`db_retry.postgres_retry` retries it like a lost connection.
    """

    db_retry_kind: typing.ClassVar[ErrorKind] = ErrorKind.OUTAGE

    def __str__(self) -> str:
        return f"COMMIT was not applied (the server said so after the connection was lost): {super().__str__()}"


@event.listens_for(sa.engine.Engine, "commit")
def _note_commit(connection: sa.Connection) -> None:
    """Mark the connection as committing: a failure before the next ``begin``/``rollback`` is the COMMIT's."""
    connection.info[_COMMITTING] = True
    if resolve_commits.get() or connection.get_execution_options().get(RESOLVE_OPTION):
        connection.info[_WANT_RESOLUTION] = True
        _install_resolving_commit(connection.engine.dialect, connection.engine.pool)


@event.listens_for(sa.engine.Engine, "begin")
@event.listens_for(sa.engine.Engine, "rollback")
def _clear_commit(connection: sa.Connection) -> None:
    if not connection.invalidated:  # ``info`` of an invalidated connection would try to reconnect
        connection.info.pop(_COMMITTING, None)


def _commit_was_lost(context: ExceptionContext) -> bool:
    error = context.original_exception
    return context.is_disconnect or isinstance(error, TimeoutError) or classify(error) in LOST_AT_COMMIT


@event.listens_for(sa.engine.Engine, "handle_error")
def _on_error(context: ExceptionContext) -> BaseException | None:
    connection = context.connection
    error = context.original_exception
    if connection is None or connection.invalidated or not isinstance(error, Exception):
        # A failed connect (the factory reports those), a connection already known dead (its ``info``
        # would try to reconnect), or the caller's own cancellation.
        return None
    # SQLAlchemy passes no statement for COMMIT (nor for BEGIN/ROLLBACK, whose events clear the mark).
    if connection.info.pop(_COMMITTING, False) and context.statement is None:
        verdict: _Verdict | None = connection.info.pop(_VERDICT, None)
        if not _commit_was_lost(context):
            return None  # the server answered: the COMMIT definitely failed
        error_class = (
            CommitNotAppliedError if verdict is not None and verdict.applied is False else CommitOutcomeUnknownError
        )
        unknown = error_class(
            "COMMIT",
            None,
            error,
            hide_parameters=True,
            connection_invalidated=context.is_disconnect,
        )
        if verdict is not None:
            unknown.add_note(f"db-retry asked the server about the lost COMMIT: {verdict.reason}")
        return unknown
    code = sqlstate_on_chain(error)
    if code == READ_ONLY_SQLSTATE or (code is None and leaves_connection_unusable(error)):
        context.is_disconnect = True  # invalidates this connection and refreshes the pool
        return None
    if context.is_disconnect or code is None:
        return None
    transaction = connection.get_nested_transaction() or connection.get_transaction()
    if transaction is not None:  # pragma: no branch - SQLAlchemy begins one before any statement runs
        connection.info[FAILED_IN] = weakref.ref(transaction)
    return None


# -- resolving a lost COMMIT ----------------------------------------------------------------------------

# One round trip before COMMIT: the transaction's id (NULL if it wrote nothing) and, on a connection's
# first write, which server this is: the cluster (system identifier), the timeline (it changes when a
# standby is promoted) and the postmaster's start (it changes when the server restarts).
_XID_QUERY: typing.Final = "SELECT pg_catalog.pg_current_xact_id_if_assigned()::text"
_IDENTITY_COLUMNS: typing.Final = (
    "(SELECT system_identifier FROM pg_catalog.pg_control_system())::text, "
    "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8) END, "
    "pg_catalog.pg_postmaster_start_time()::text"
)
_XID_AND_IDENTITY_QUERY: typing.Final = f"{_XID_QUERY}, {_IDENTITY_COLUMNS}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Identity:
    system: str
    timeline: str | None  # None on a standby
    started: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Verdict:
    applied: bool | None  # None: unknown
    reason: str


_CANNOT_CONNECT: typing.Final = "cannot connect"
_CANNOT_ASK: typing.Final = "cannot ask"


class _NotYet(Exception):  # noqa: N818 - a signal inside the resolution loop, never raised to callers
    """The server is not reachable yet, or the transaction is still in progress there."""

    def __init__(self, what: str, error: BaseException | None = None) -> None:
        super().__init__(f"{what} ({type(error).__name__})" if error is not None else what)


def _install_resolving_commit(dialect: Dialect, pool: sa.pool.Pool) -> None:
    """Give this engine's dialect a ``do_commit`` that can resolve a lost COMMIT (once per engine)."""
    if getattr(dialect, "_db_retry_resolving", False):
        return
    original = dialect.do_commit
    dialect.do_commit = functools.partial(_resolving_do_commit, original, weakref.ref(pool))  # type: ignore[method-assign]
    dialect._db_retry_resolving = True  # type: ignore[attr-defined]  # noqa: SLF001 - our own marker


def _fetch_row(connection: PoolProxiedConnection, query: str) -> tuple[typing.Any, ...]:
    cursor = connection.cursor()
    try:
        cursor.execute(query)
        row: typing.Sequence[typing.Any] = cursor.fetchone() or ()
    finally:
        cursor.close()
    return tuple(row)


def _resolving_do_commit(
    original: typing.Callable[[PoolProxiedConnection], None],
    pool_ref: "weakref.ref[sa.pool.Pool]",
    connection: PoolProxiedConnection,
) -> None:
    if not connection.info.pop(_WANT_RESOLUTION, False):
        original(connection)
        return
    identity: _Identity | None = connection.info.get(_IDENTITY)
    try:
        if identity is None:
            xid, system, timeline, started = _fetch_row(connection, _XID_AND_IDENTITY_QUERY)
            identity = _Identity(system, timeline, started)
            if timeline is not None:  # a standby's identity changes if it is promoted: not kept
                connection.info[_IDENTITY] = identity
        else:
            (xid,) = _fetch_row(connection, _XID_QUERY)
    except Exception:
        connection.info[_VERDICT] = _Verdict(applied=False, reason="COMMIT was never sent")
        raise
    try:
        original(connection)
    except Exception:
        verdict = _Verdict(applied=False, reason="the transaction wrote nothing") if xid is None else None
        pool = pool_ref()
        if verdict is None and pool is not None:
            verdict = _ask_the_server(pool, identity, str(xid))
        if verdict is not None and verdict.applied:
            logger.info("a lost COMMIT was applied: %s", verdict.reason)
            connection.invalidate(soft=True)  # its socket is gone: replace it at the next checkout
            return
        connection.info[_VERDICT] = verdict
        raise


def _ask_the_server(pool: sa.pool.Pool, identity: _Identity, xid: str) -> _Verdict:
    """Whether transaction ``xid`` committed, asked on fresh connections until the bound passes."""
    from db_retry.settings import get_settings  # noqa: PLC0415 - settings import this module's users

    settings = get_settings()
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_delay(settings.outage_timeout),
        wait=tenacity.wait_random_exponential(multiplier=settings.outage_delay, max=settings.outage_max_delay),
        retry=tenacity.retry_if_exception_type(_NotYet),
        sleep=lambda seconds: await_only(asyncio.sleep(seconds)),
        reraise=True,
    )
    throwaway = pool.recreate()  # the same creator (multi-host factory included), outside the engine's pool
    try:
        return retrying(_status, throwaway, identity, xid)
    except _NotYet as exc:
        return _Verdict(applied=None, reason=f"no answer within {settings.outage_timeout:g}s: {exc}")
    finally:
        throwaway.dispose()


def _status(pool: sa.pool.Pool, identity: _Identity, xid: str) -> _Verdict:
    try:
        connection = pool.connect()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: not yet
        raise _NotYet(_CANNOT_CONNECT, exc) from None
    try:
        return _judge(identity, xid, _fetch_row(connection, f"SELECT {_IDENTITY_COLUMNS}"), connection)
    except _NotYet:
        raise
    except Exception as exc:  # noqa: BLE001 - the connection broke while asking: not yet
        raise _NotYet(_CANNOT_ASK, exc) from None
    finally:
        connection.invalidate()  # never back into a pool: this one is thrown away


def _judge(identity: _Identity, xid: str, row: tuple[typing.Any, ...], connection: PoolProxiedConnection) -> _Verdict:
    now = _Identity(*row)
    if now.system != identity.system or now.timeline != identity.timeline:
        return _Verdict(applied=None, reason="another server or timeline answers now (a failover?)")
    if not xid.isdigit():  # pragma: no cover - the server gave it as a number
        return _Verdict(applied=None, reason=f"unexpected transaction id {xid!r}")
    next_xid, status = _fetch_row(
        connection,
        f"SELECT pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot())::text, "
        f"CASE WHEN pg_catalog.pg_snapshot_xmax(pg_catalog.pg_current_snapshot()) > '{xid}'::xid8 "
        f"THEN pg_catalog.pg_xact_status('{xid}'::xid8) END",
    )
    if status is None and int(next_xid) <= int(xid):
        # The id was never made durable (lost in a crash): the transaction cannot have committed.
        return _Verdict(applied=False, reason=f"transaction {xid} is unknown to the server")
    if status == "in progress":
        raise _NotYet("transaction " + xid + " is still in progress")
    if status == "aborted":
        return _Verdict(applied=False, reason=f"transaction {xid} aborted")
    if status == "committed" and now.started == identity.started:
        return _Verdict(applied=True, reason=f"transaction {xid} committed")
    if status == "committed":
        # After a crash the id of a transaction whose WAL was never flushed is given out again: the
        # answer may be another transaction's.
        return _Verdict(applied=None, reason=f"the server restarted; transaction {xid} may be another one")
    return _Verdict(applied=None, reason=f"the server no longer knows transaction {xid}")
