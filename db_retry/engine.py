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
- **Statements prepared behind a transaction pooler**: ``26000`` / ``42P05`` (or ``08P01`` "bind
  message supplies ...") about a statement the driver itself prepared (``__asyncpg_stmt_N__``,
  ``_pg3_N``) becomes :class:`PreparedStatementBehindPoolerError`, which says what to set; never retried.
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
import re
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
    LOST_CONNECTION_SQLSTATES,
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
_UNPROVEN: typing.Final = "db_retry_never_committed"
READ_ONLY_SQLSTATE: typing.Final = "25006"
FEATURE_NOT_SUPPORTED: typing.Final = "0A000"
# 0A000 messages of a standby refusing what only a primary does ("cannot use serializable mode in a hot
# standby", "cannot set transaction read-write mode during recovery").
_STANDBY_REFUSALS: typing.Final = ("hot standby", "during recovery")
_ROLE_PARAMETERS: typing.Final = ("in_hot_standby", "default_transaction_read_only")
# Codes of a statement name the server does not know or already has, and of a bind to the wrong one.
_PREPARED_STATEMENT_SQLSTATES: typing.Final = frozenset({"26000", "42P05", "08P01"})
# The names asyncpg (also under SQLAlchemy's adapter) and psycopg 3 give the statements they prepare.
_DRIVER_STATEMENT: typing.Final = re.compile(r'prepared statement "(__asyncpg_stmt_[0-9a-f]+__|_pg3_\d+)"')
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


class PreparedStatementBehindPoolerError(sa.exc.ProgrammingError):
    """The server does not know (or already has) a statement the driver prepared on this connection.

    That happens when a pooler in transaction mode (PgBouncer before 1.21, or without
    ``max_prepared_statements``) hands each transaction another server connection. Retrying does not
    help; turning the drivers' statement caches off does (see the message). Not retried.
    """

    db_retry_kind: typing.ClassVar[ErrorKind | None] = None

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n"
            "The driver's prepared statements do not survive a pooler in transaction mode. Turn them off: "
            "asyncpg: create_async_engine(url, connect_args={'statement_cache_size': 0}) with "
            "?prepared_statement_cache_size=0 in the URL (or both in the DSN given to build_connection_factory); "
            "psycopg: connect_args={'prepare_threshold': None}. PgBouncer 1.21+ can keep them instead "
            "(max_prepared_statements)."
        )


@event.listens_for(sa.pool.Pool, "connect")
def _note_new_connection(_dbapi_connection: object, record: sa.pool.ConnectionPoolEntry) -> None:
    """A new connection has not shown yet that a server stands behind it (a pooler accepts without one)."""
    record.info[_UNPROVEN] = True


@event.listens_for(sa.engine.Engine, "commit")
def _note_commit(connection: sa.Connection) -> None:
    """Mark the connection as committing: a failure before the next ``begin``/``rollback`` is the COMMIT's."""
    connection.info[_COMMITTING] = True
    connection.info.pop(_UNPROVEN, None)
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
    if not isinstance(error, Exception):
        return None  # the caller's own cancellation
    if connection is None:
        # A failed connect. A standby refusing what the engine sets up (SERIALIZABLE, read-write) while
        # connecting is a node that cannot serve writes now (asyncpg may report it only as the 25P01 of
        # the poisoned connection that follows): the work never started.
        refused = _is_node_role_error(sqlstate_on_chain(error), error) or leaves_connection_unusable(error)
        if refused and context.sqlalchemy_exception is not None:
            context.sqlalchemy_exception.db_retry_kind = ErrorKind.UNAVAILABLE  # type: ignore[attr-defined]
        return None
    if connection.invalidated:  # pragma: no cover - SQLAlchemy does not report errors of a connection it gave up
        return None  # ... and its ``info`` would try to reconnect
    # SQLAlchemy passes no statement for COMMIT (nor for BEGIN/ROLLBACK, whose events clear the mark).
    if connection.info.pop(_COMMITTING, False) and context.statement is None:
        return _commit_failed(context, connection, error)
    return _statement_failed(context, connection, error)


def _commit_failed(context: ExceptionContext, connection: sa.Connection, error: Exception) -> BaseException | None:
    verdict: _Verdict | None = connection.info.pop(_VERDICT, None)
    if not _commit_was_lost(context):
        return None  # the server answered: the COMMIT definitely failed
    error_class = (
        CommitNotAppliedError if verdict is not None and verdict.applied is False else CommitOutcomeUnknownError
    )
    unknown = error_class("COMMIT", None, error, hide_parameters=True, connection_invalidated=context.is_disconnect)
    if verdict is not None:
        unknown.add_note(f"db-retry asked the server about the lost COMMIT: {verdict.reason}")
    return unknown


def _statement_failed(context: ExceptionContext, connection: sa.Connection, error: Exception) -> BaseException | None:
    code = sqlstate_on_chain(error)
    if code in _PREPARED_STATEMENT_SQLSTATES and _DRIVER_STATEMENT.search(str(error)):
        return PreparedStatementBehindPoolerError(
            context.statement,
            context.parameters,
            error,
            hide_parameters=True,
            connection_invalidated=context.is_disconnect,
        )
    if leaves_connection_unusable(error):
        context.is_disconnect = True  # invalidates this connection and refreshes the pool
        if context.sqlalchemy_exception is not None:  # pragma: no branch - the adapters wrap these as DBAPI errors
            # Nothing ran on it; another connection will do (a 25P01 alone is the caller's own mistake).
            context.sqlalchemy_exception.db_retry_kind = ErrorKind.OUTAGE  # type: ignore[attr-defined]
        return None
    if _is_node_role_error(code, error):
        _node_role_failed(context, connection)
        return None
    if context.is_disconnect or code in LOST_CONNECTION_SQLSTATES:
        lost_only = code is None or code in LOST_CONNECTION_SQLSTATES  # not 57P01 and the like: a server spoke
        if lost_only and connection.info.get(_UNPROVEN) and context.sqlalchemy_exception is not None:
            # Lost before this connection ever committed: behind PgBouncer during a server restart, each
            # new client connection is accepted and then closed. No server is there yet: wait for one
            # within DB_RETRY_OUTAGE_TIMEOUT, as for a refused connection, rather than count attempts.
            context.sqlalchemy_exception.db_retry_kind = ErrorKind.UNAVAILABLE  # type: ignore[attr-defined]
        return None
    if code is None:  # pragma: no cover - driver errors without a code reach here only as disconnects (above)
        return None
    transaction = connection.get_nested_transaction() or connection.get_transaction()
    if transaction is not None:  # pragma: no branch - SQLAlchemy begins one before any statement runs
        connection.info[FAILED_IN] = weakref.ref(transaction)
    return None


def _node_role_failed(context: ExceptionContext, connection: sa.Connection) -> None:
    read_only = _node_reports_read_only(connection)
    if read_only is not False:  # the node is read-only, or the driver cannot tell: not the session's doing
        context.is_disconnect = True  # invalidates this connection and refreshes the pool
    if read_only and context.sqlalchemy_exception is not None:
        # No usable node for writes right now, as when no host fits target_session_attrs: wait for one
        # within DB_RETRY_OUTAGE_TIMEOUT (a failover, an address that moves) rather than count attempts.
        context.sqlalchemy_exception.db_retry_kind = ErrorKind.UNAVAILABLE  # type: ignore[attr-defined]


def _is_node_role_error(code: str | None, error: BaseException) -> bool:
    if code == READ_ONLY_SQLSTATE:
        return True
    return code == FEATURE_NOT_SUPPORTED and any(text in str(error) for text in _STANDBY_REFUSALS)


def _node_reports_read_only(connection: sa.Connection) -> bool | None:
    """Whether the server said (ParameterStatus, PostgreSQL 14+) it is a standby or read-only; None: unknown.

    Read from what the drivers keep of the server's reports: no round trip.
    """
    driver: typing.Any = connection.connection.driver_connection
    if hasattr(driver, "get_settings"):  # asyncpg
        settings = driver.get_settings()
        values = [getattr(settings, name, None) for name in _ROLE_PARAMETERS]
    elif hasattr(getattr(driver, "info", None), "parameter_status"):  # psycopg 3
        values = [driver.info.parameter_status(name) for name in _ROLE_PARAMETERS]
    else:  # pragma: no cover - another driver
        return None
    if all(value is None for value in values):
        return None  # pragma: no cover - a server before PostgreSQL 14 (the suite runs 15)
    return "on" in values


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


_NO_ANSWER: typing.Final = "the server cannot be asked"
_INVALID_PARAMETER: typing.Final = "22023"  # pg_xact_status of an id the server has not given out yet


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
        try:
            return _judge(identity, xid, connection)
        finally:
            connection.invalidate()  # never back into a pool: this one is thrown away
    except _NotYet:
        raise
    except Exception as exc:  # noqa: BLE001 - no connection, or it broke while asking: not yet
        raise _NotYet(_NO_ANSWER, exc) from None


def _judge(identity: _Identity, xid: str, connection: PoolProxiedConnection) -> _Verdict:
    now = _Identity(*_fetch_row(connection, f"SELECT {_IDENTITY_COLUMNS}"))
    if now.system != identity.system or now.timeline != identity.timeline:
        return _Verdict(applied=None, reason="another server or timeline answers now (a failover?)")
    if not xid.isdigit():  # pragma: no cover - the server gave it as a number
        return _Verdict(applied=None, reason=f"unexpected transaction id {xid!r}")
    try:
        (status,) = _fetch_row(connection, f"SELECT pg_catalog.pg_xact_status('{xid}'::xid8)")
    except Exception as exc:
        if sqlstate_on_chain(exc) == _INVALID_PARAMETER and "in the future" in str(exc):
            # At or past the server's next id: it never became durable (lost in a crash), so it cannot
            # have committed. (A snapshot's xmax is no substitute: it lags behind transactions in progress.)
            return _Verdict(applied=False, reason=f"transaction {xid} is unknown to the server")
        raise  # pragma: no cover - any other failure while asking: asked again (``_status``)
    if status == "in progress":
        raise _NotYet("transaction " + xid + " is still in progress")
    if status == "aborted":
        return _Verdict(applied=False, reason=f"transaction {xid} aborted")
    if status == "committed" and now.started == identity.started:
        return _Verdict(applied=True, reason=f"transaction {xid} committed")
    # Committed after a restart: after a crash the id of a transaction whose WAL was never flushed is
    # given out again, so the answer may be another transaction's. NULL: too old to be known any more.
    restarted = f"the server restarted; transaction {xid} may be another one"
    return _Verdict(applied=None, reason=restarted if status == "committed" else f"the server forgot {xid}")
