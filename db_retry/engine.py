"""Engine-level behaviour: what db-retry adds to every SQLAlchemy engine, through SQLAlchemy's public events.

Importing :mod:`db_retry` installs these listeners on :class:`sqlalchemy.engine.Engine` and
:class:`sqlalchemy.pool.Pool` themselves, so they apply to every engine (sync or async, asyncpg or
psycopg, any pool) whichever way the work commits: ``Connection.commit()``, ``async with
engine.begin()``, ``Session.commit()``, ``async with session.begin()`` or :class:`db_retry.Transaction`.
All of them end in ``Connection._commit_impl``, which fires the ``commit`` event and routes a failure
through ``handle_error``.

Each pooled DBAPI connection carries one :class:`ConnectionState` (in its pool record's ``info``): what
the connection is doing (:class:`Phase`) and what it has shown (which server answered it). Every
decision below reads it; the listeners are its only writers. ``architecture/engine.md`` draws the
state machine and gives the reasons.

- **A new connection proves a server answers** (one ``SELECT 1`` before the pool hands it out). If it
  does not, the connect fails with :class:`ServerNotAnsweringError`: the work never started, so waiting
  for the server is bounded by time (``DB_RETRY_OUTAGE_TIMEOUT``), never by attempts. A connection lost
  after that ran work: it counts as an attempt (a statement that kills its backend is not re-run for
  ever).
- **A lost COMMIT** becomes :class:`CommitOutcomeUnknownError`; a COMMIT the client never sent becomes
  :class:`CommitNotAppliedError`; a COMMIT the server refused keeps its error. In autocommit every
  statement is its own COMMIT: a statement lost in flight is outcome-unknown too.
- **A node-role error** (``25006``, a standby's ``0A000``) from a node that reports itself read-only
  refreshes the pool and waits for a writable node; the caller's own ``READ ONLY`` transaction on a
  writable node is not transient.
- **Statements prepared behind a transaction pooler** become :class:`PreparedStatementBehindPoolerError`.
- **A server error that aborts the transaction** is remembered per (sub)transaction, so
  :class:`db_retry.Transaction` and ``postgres_retry`` can tell without a round trip that it cannot go on.
- **Resolving a lost COMMIT** (opt-in: ``postgres_retry(resolve_commit=True)``, or the execution option
  ``db_retry_resolve_commit=True``): see :func:`_resolving_do_commit`. With ``"marker"`` instead of
  ``True``, across failovers too: :mod:`db_retry.markers`.
"""

import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import functools
import inspect
import logging
import re
import typing
import uuid
import weakref

import asyncpg
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine.interfaces import Dialect, ExceptionContext
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import await_only, greenlet_spawn
from sqlalchemy.util.concurrency import in_greenlet

from db_retry import markers, turns
from db_retry.liveness import QUICK, Wire, cancel_at_once, silent_last, tune_socket
from db_retry.retriable import (
    LOST_AT_COMMIT,
    LOST_CONNECTION_SQLSTATES,
    ErrorKind,
    classify,
    command_not_sent,
    leaves_connection_unusable,
    sqlstate_on_chain,
)
from db_retry.settings import get_settings


logger = logging.getLogger("db_retry.engine")

STATE: typing.Final = "db_retry_state"
RESOLVE_OPTION: typing.Final = "db_retry_resolve_commit"
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
# A statement that may queue a notification (NOTIFY, pg_notify): its transaction gets an id only at COMMIT.
_NOTIFIES: typing.Final = re.compile(r"notify", re.IGNORECASE)
_PROBE: typing.Final = "SELECT 1"
# How a lost COMMIT is resolved: by its transaction id on the same server, or by a marker row on whichever
# primary answers now.
Resolution: typing.TypeAlias = typing.Literal["xid", "marker"]
# Set by ``postgres_retry(resolve_commit=...)`` around the calls of its function.
resolve_commits: contextvars.ContextVar[Resolution | None] = contextvars.ContextVar(
    "db_retry_resolve_commits", default=None
)


def resolution(value: object) -> Resolution | None:
    """What a ``resolve_commit`` value asks for: ``True`` (the transaction id), ``"marker"``, or nothing.

    Anything else is refused, naming the value.
    """
    if value is True or value == "xid":
        return "xid"
    if value == "marker":
        return "marker"
    if value is False or value is None:
        return None
    msg = f"resolve_commit must be True, False or 'marker', got {value!r}"
    raise ValueError(msg)


@dataclasses.dataclass(slots=True)
class CallDeadline:
    """The deadline of one ``postgres_retry(deadline=...)`` call, as the listeners see it."""

    at: float  # event-loop time when the call's budget ends
    commit_cut: bool = False  # the caller's cancellation struck while COMMIT was in flight


# Set by ``postgres_retry(deadline=...)`` around the calls of its function.
call_deadline: contextvars.ContextVar[CallDeadline | None] = contextvars.ContextVar("db_retry_deadline", default=None)
# The server stops a statement (or a lock wait) the client has given up on: the time left, per transaction,
# in the placeholder style of each driver's DBAPI (asyncpg's adapter, psycopg).
_SERVER_LIMITS: typing.Final = {
    style: f"SELECT pg_catalog.set_config('statement_timeout', {mark}, true), "
    f"pg_catalog.set_config('lock_timeout', {mark}, true)"
    for style, mark in (("numeric_dollar", "$1"), ("pyformat", "%(ms)s"))
}

_P = typing.ParamSpec("_P")
_T = typing.TypeVar("_T")


def resolving_commits(
    func: typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]],
    how: Resolution = "xid",
) -> typing.Callable[_P, typing.Coroutine[typing.Any, typing.Any, _T]]:
    """``func`` with lost COMMITs resolved while it runs (what ``postgres_retry(resolve_commit=...)`` uses)."""

    @functools.wraps(func)
    async def resolving(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        token = resolve_commits.set(how)
        try:
            return await func(*args, **kwargs)
        finally:
            resolve_commits.reset(token)

    return resolving


class CommitOutcomeUnknownError(sa.exc.OperationalError):
    """The connection was lost while ``COMMIT`` was in flight: the work may or may not be committed.

    Raised wherever the commit happens (``Connection``/``Session`` ``commit()`` and ``begin()`` blocks,
    :meth:`db_retry.Transaction.commit`), and for a statement lost in flight in autocommit (each one is
    its own commit). :func:`db_retry.postgres_retry` does not retry it (retrying could apply the work
    twice) unless the call site says ``retry_ambiguous_commit=True``. The driver's own error is ``orig``
    and is chained as ``__cause__``.
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


class ServerNotAnsweringError(sa.exc.OperationalError):
    """A new connection did not answer its first query: no server stands behind it (yet).

    A pooler (PgBouncer) accepts client connections while its server restarts, then closes them. The
    work never started: :func:`db_retry.postgres_retry` waits for the server within
    ``DB_RETRY_OUTAGE_TIMEOUT`` without counting an attempt. The driver's error is ``orig``.
    """

    db_retry_kind: typing.ClassVar[ErrorKind] = ErrorKind.UNAVAILABLE

    def __str__(self) -> str:
        return f"a new connection did not answer its first query: {super().__str__()}"


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


# -- the state of one connection ------------------------------------------------------------------------


class Phase(enum.Enum):
    """What a pooled connection is doing, as far as a failure on it is concerned."""

    IDLE = "idle"  # no transaction began since the last COMMIT/ROLLBACK (or autocommit)
    IN_TRANSACTION = "in transaction"  # SQLAlchemy began a transaction
    COMMITTING = "committing"  # COMMIT was handed to the driver; a failure without a statement is its own
    RESOLVING = "resolving"  # the answer to COMMIT was lost; the server is being asked


_COMMIT_PHASES: typing.Final = frozenset({Phase.COMMITTING, Phase.RESOLVING})


@dataclasses.dataclass(frozen=True, slots=True)
class ServerIdentity:
    """Which server incarnation answered: any change means an id may name another transaction now."""

    system: str  # the cluster (pg_control_system's system identifier)
    timeline: str | None  # changes when a standby is promoted; None on a standby
    started: str  # the postmaster's start: changes on every restart
    reset: str | None  # shared statistics' reset time: changes when the server reinitializes after a crash


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """What the server said about a lost COMMIT."""

    applied: bool | None  # None: unknown
    reason: str


@dataclasses.dataclass(slots=True)
class ConnectionState:
    """Everything db-retry knows about one DBAPI connection; kept in its pool record's ``info``."""

    phase: Phase = Phase.IDLE
    resolve: Resolution | None = None  # how the COMMIT in flight is resolved if its answer is lost
    notified: bool = False  # the transaction may have queued a notification (its id comes at COMMIT)
    identity: ServerIdentity | None = None  # the primary this connection wrote to, once resolution asked
    verdict: Verdict | None = None  # the server's word on this connection's lost COMMIT
    failed_in: "weakref.ref[sa.RootTransaction | sa.NestedTransaction] | None" = None  # aborted by a server error
    pool: "weakref.ref[sa.pool.Pool] | None" = None  # the engine's pool at the last COMMIT: resolution connects there
    wire: Wire | None = None  # the TCP socket, as the liveness watchdog sees it (None: not TCP)
    role: typing.Callable[[], bool | None] | None = None  # reads what the server reports of its role
    read_only_at_begin: bool | None = None  # what the node said of itself when the transaction began
    paramstyle: str = ""  # the driver's placeholder style, for the marker's insert


def state_of(info: dict[typing.Any, typing.Any]) -> ConnectionState:
    """The state of the connection whose ``info`` this is (a connection made before import gets one now)."""
    state = info.get(STATE)
    if state is None:
        state = info[STATE] = ConnectionState()
    return typing.cast("ConnectionState", state)


def transaction_failed(connection: sa.Connection) -> bool:
    """Whether a server error aborted the connection's current (sub)transaction (``25P02`` would follow)."""
    state = connection.info.get(STATE)
    reference = state.failed_in if state is not None else None
    failed = reference() if reference is not None else None
    current = connection.get_nested_transaction() or connection.get_transaction()
    return failed is not None and failed is current and current.is_active


# -- listeners -------------------------------------------------------------------------------------------


@event.listens_for(sa.engine.Engine, "do_connect")
def _silent_hosts_last(
    _dialect: Dialect,
    _record: object,
    _cargs: object,
    cparams: dict[str, typing.Any],
) -> None:
    """A multi-host DSN that the driver walks in order (libpq, psycopg): hosts found silent lately go last."""
    host, port = cparams.get("host"), cparams.get("port")
    if isinstance(host, str) and "," in host and isinstance(port, str) and "hostaddr" not in cparams:
        moved = silent_last(host.split(","), port.split(","))
        if moved is not None:
            cparams["host"], cparams["port"] = ",".join(moved[0]), ",".join(moved[1])


@event.listens_for(sa.pool.Pool, "connect")
def _on_connect(
    dbapi_connection: typing.Any,  # noqa: ANN401 - any driver's connection
    record: sa.pool.ConnectionPoolEntry,
) -> None:
    """A new connection: keepalives, fresh state, and one round trip that proves a server answers behind it."""
    state = record.info[STATE] = ConnectionState()
    try:
        state.wire = tune_socket(dbapi_connection, get_settings())
        state.role = _role_reader(dbapi_connection)
        cancel_at_once(dbapi_connection)
        _waiting(state)
        _probe(dbapi_connection)
        _answered(state)
    except BaseException as exc:
        _discard(dbapi_connection)  # SQLAlchemy does not close a connection whose connect event failed
        # ... and a record that was reconnecting would keep it and hand it out, closed, at its next
        # checkout: the record lets it go (the next checkout connects afresh).
        record.dbapi_connection = None  # type: ignore[misc]
        if not isinstance(exc, Exception):
            raise  # the caller's cancellation, as it is
        raise ServerNotAnsweringError(_PROBE, None, exc, hide_parameters=True) from exc


def _probe(dbapi_connection: typing.Any) -> None:  # noqa: ANN401 - any driver's connection
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if hasattr(driver, "get_settings"):  # asyncpg: the simple protocol, outside any transaction
        await_only(driver.execute(_PROBE))
        return
    if inspect.iscoroutinefunction(getattr(driver, "set_autocommit", None)):  # psycopg 3 (async): no BEGIN first
        autocommit = driver.autocommit
        await_only(driver.set_autocommit(True))  # idle: no round trip
        try:
            await_only(driver.execute(_PROBE))
        finally:
            await_only(driver.set_autocommit(autocommit))
        return
    cursor = dbapi_connection.cursor()  # any other DBAPI driver (sync engines)
    try:
        cursor.execute(_PROBE)
        cursor.fetchall()
    finally:
        cursor.close()
    dbapi_connection.rollback()


def _discard(dbapi_connection: typing.Any) -> None:  # noqa: ANN401 - any driver's connection
    # Already broken: the connect error is the one to report, not a failure to close it.
    with contextlib.suppress(Exception):
        terminate = getattr(dbapi_connection, "terminate", None)
        if terminate is not None:  # SQLAlchemy's async adapters: abort the socket, no goodbye to a silent peer
            _abort(dbapi_connection)
            terminate()
        else:  # pragma: no cover - sync drivers
            dbapi_connection.close()


def _abort(dbapi_connection: typing.Any) -> None:  # noqa: ANN401 - any driver's connection
    """Abort the driver's socket at once, so that SQLAlchemy's graceful close that follows finds it closed.

    SQLAlchemy's asyncpg adapter closes an invalidated connection gracefully first (up to 2 s, its #10717),
    and asyncpg before 0.30 makes that close wait, without bound, for a cancel request still in flight:
    on a silent server, the cancel of an interrupted query never ends. asyncpg's ``terminate()`` aborts
    the socket synchronously and cancels that request. A psycopg connection has no such method and
    closes at once anyway (libpq's ``PQfinish``).
    """
    driver = getattr(dbapi_connection, "driver_connection", None)
    abort = getattr(driver, "terminate", None)
    if abort is not None and not inspect.iscoroutinefunction(abort):
        abort()


def _waiting(state: ConnectionState) -> None:
    if state.wire is not None:  # pragma: no branch - None over a Unix socket (the kit's servers: TCP only)
        state.wire.waiting()


def _answered(state: ConnectionState) -> None:
    if state.wire is not None:  # pragma: no branch - as above
        state.wire.answered()


@event.listens_for(sa.engine.Engine, "before_cursor_execute")
def _before_execute(connection: sa.Connection, *_: object) -> None:
    _waiting(state_of(connection.info))


@event.listens_for(sa.engine.Engine, "after_cursor_execute")
def _after_execute(connection: sa.Connection, *_: object) -> None:
    _answered(state_of(connection.info))


def _wants_resolution(connection: sa.Connection) -> Resolution | None:
    return resolve_commits.get() or resolution(connection.get_execution_options().get(RESOLVE_OPTION))


@event.listens_for(sa.engine.Engine, "begin")
def _on_begin(connection: sa.Connection) -> None:
    if connection.invalidated:  # pragma: no cover - SQLAlchemy begins on valid connections; ``info`` would reconnect
        return
    state = state_of(connection.info)
    state.phase = Phase.IN_TRANSACTION
    state.notified = False
    state.failed_in = None
    state.read_only_at_begin = _node_reports_read_only(state)
    _install(connection.engine.dialect)
    if _wants_resolution(connection):
        _install_resolution(connection.engine)
    deadline = call_deadline.get()
    request = turns.requested.get()
    if request is not None and request.holder is None:  # a hot call site: this transaction takes its turn
        _take_turn(connection, state, request, deadline)
    if deadline is not None:
        _limit_server_time(connection, deadline)


def _take_turn(
    connection: sa.Connection, state: ConnectionState, request: turns.TurnRequest, deadline: CallDeadline | None
) -> None:
    """Wait for the call site's turn on the server before the caller's first statement (:mod:`db_retry.turns`)."""
    time_left = None if deadline is None else deadline.at - asyncio.get_running_loop().time()
    dbapi_connection = connection.connection
    try:
        held = turns.take(dbapi_connection, request, connection.dialect.paramstyle, time_left=time_left)
    except BaseException as exc:
        _begin_statement_failed(dbapi_connection, exc)
        raise
    if held:
        request.holder = state


def _release_turn(state: ConnectionState) -> None:
    """The transaction ends (COMMIT or ROLLBACK is on its way): the call's next transaction asks again."""
    request = turns.requested.get()
    if request is not None and request.holder is state:
        request.holder = None


def _limit_server_time(connection: sa.Connection, deadline: CallDeadline) -> None:
    """The time left of the call becomes the transaction's ``statement_timeout`` and ``lock_timeout``.

    One round trip, inside the transaction (a constant statement: prepared once per connection).
    """
    statement = _SERVER_LIMITS.get(connection.dialect.paramstyle)
    if statement is None:  # pragma: no cover - another driver's placeholder style
        return
    left = f"{max(1, int((deadline.at - asyncio.get_running_loop().time()) * 1000))}ms"
    parameters: typing.Any = (left,) if connection.dialect.positional else {"ms": left}
    dbapi_connection = connection.connection
    try:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement, parameters)
        finally:
            cursor.close()
    except BaseException as exc:
        _begin_statement_failed(dbapi_connection, exc)
        raise


def _begin_statement_failed(dbapi_connection: typing.Any, exc: BaseException) -> None:  # noqa: ANN401 - any driver
    """A statement of the ``begin`` listener failed or was cancelled: discard its connection, mark what it means.

    SQLAlchemy does not handle errors raised in its begin event: left alone, a connection the server closed
    would go back to the pool and be handed out again and again. It is discarded here; the error (a lost
    connection, a cancellation) propagates to the retry.

    No statement of the caller has run yet: the drivers send the transaction's BEGIN with this, its first
    statement. So a connection found lost or broken here (one that PgBouncer cut while its server restarted,
    asyncpg's protocol left waiting on an error it was sent) is an attempt that never got a working
    connection: it waits for one within ``DB_RETRY_OUTAGE_TIMEOUT``, as a refused connect does, and costs the
    call none of its attempts. Likewise a standby's refusal of a SERIALIZABLE BEGIN (behind a proxy that
    still leads to the old leader): wait for a writable node.
    """
    if isinstance(exc, Exception) and (
        _is_node_role_error(sqlstate_on_chain(exc), exc) or classify(exc) in (ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE)
    ):
        exc.db_retry_kind = ErrorKind.UNAVAILABLE  # type: ignore[attr-defined]
    dbapi_connection.invalidate(exc if isinstance(exc, Exception) else None)


@event.listens_for(sa.engine.Engine, "commit")
def _on_commit(connection: sa.Connection) -> None:
    """COMMIT is handed to the driver: a failure before the next ``begin``/``rollback`` is the COMMIT's."""
    state = state_of(connection.info)
    state.phase = Phase.COMMITTING
    state.verdict = None
    _release_turn(state)
    state.resolve = _wants_resolution(connection)
    _install(connection.engine.dialect)
    if state.resolve:
        state.pool = weakref.ref(connection.engine.pool)  # the current one: engine.dispose() replaces it
        state.paramstyle = connection.dialect.paramstyle
        _install_resolution(connection.engine)


@event.listens_for(sa.engine.Engine, "rollback")
def _on_rollback(connection: sa.Connection) -> None:
    if not connection.invalidated:  # ``info`` of an invalidated connection would try to reconnect
        state = state_of(connection.info)
        state.phase = Phase.IDLE
        state.failed_in = None
        _release_turn(state)


def _note_notify(
    connection: sa.Connection,
    _cursor: object,
    statement: str,
    *_: object,
) -> None:
    """On engines that resolve commits: a statement that may queue a notification gets its id at COMMIT."""
    if _NOTIFIES.search(statement):
        state_of(connection.info).notified = True


@event.listens_for(sa.engine.Engine, "handle_error")
def _on_error(context: ExceptionContext) -> BaseException | None:
    connection = context.connection
    error = context.original_exception
    if connection is not None and not connection.invalidated:
        state = state_of(connection.info)
        _answered(state)
        if not isinstance(error, Exception) and state.phase in _COMMIT_PHASES and context.statement is None:
            deadline = call_deadline.get()
            if deadline is not None:  # the call's deadline (or another cancellation) struck during COMMIT
                deadline.commit_cut = True
    if not isinstance(error, Exception):
        return None  # the caller's own cancellation: SQLAlchemy invalidates the connection it interrupted
    if connection is None:
        _connect_failed(context, error)
        return None
    if connection.invalidated:  # pragma: no cover - SQLAlchemy does not report errors of a connection it gave up
        return None  # ... and its ``info`` would try to reconnect
    state = state_of(connection.info)
    # SQLAlchemy passes no statement for COMMIT (nor for BEGIN/ROLLBACK, whose events move the phase on).
    if state.phase in _COMMIT_PHASES and context.statement is None:
        state.phase = Phase.IDLE
        return _commit_failed(context, state, error)
    return _statement_failed(context, connection, state, error)


def _mark(context: ExceptionContext, kind: ErrorKind | None) -> None:
    """Tell ``classify`` what this listener learned of the error (SQLAlchemy's exception carries it)."""
    if context.sqlalchemy_exception is not None:  # pragma: no branch - the adapters wrap these as DBAPI errors
        context.sqlalchemy_exception.db_retry_kind = kind  # type: ignore[attr-defined]


def _note(context: ExceptionContext, note: str) -> None:
    if context.sqlalchemy_exception is not None:  # pragma: no branch - the adapters wrap these as DBAPI errors
        context.sqlalchemy_exception.add_note(note)


def _connect_failed(context: ExceptionContext, error: Exception) -> None:
    """A failed connect (or a fresh engine's first-connect queries): whatever it was, the work never started."""
    refused = _is_node_role_error(sqlstate_on_chain(error), error) or leaves_connection_unusable(error)
    if refused or classify(error) in (ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE):
        _mark(context, ErrorKind.UNAVAILABLE)


def _commit_lost(context: ExceptionContext, error: Exception) -> bool:
    return context.is_disconnect or isinstance(error, TimeoutError) or classify(error) in LOST_AT_COMMIT


def _commit_failed(context: ExceptionContext, state: ConnectionState, error: Exception) -> BaseException | None:
    verdict, state.verdict = state.verdict, None
    if command_not_sent(error):
        # The driver refused to send COMMIT (asyncpg: another operation in progress on the connection):
        # nothing committed. The connection is in a state no later operation can use: replace it.
        context.is_disconnect = True
        verdict = Verdict(applied=False, reason=f"COMMIT was never sent ({type(error).__name__})")
    elif not _commit_lost(context, error):
        if sqlstate_on_chain(error) == _UNDEFINED_TABLE and markers.TABLE in str(error):
            _note(
                context,
                f"db-retry: resolve_commit='marker' needs the table {markers.TABLE}: create it once with "
                "`db-retry markers install DSN` or `await db_retry.markers.install(engine)`",
            )
        return None  # the server answered: the COMMIT definitely failed
    if leaves_connection_unusable(error):
        context.is_disconnect = True  # whatever the COMMIT did, that connection cannot be used again
    error_class = (
        CommitNotAppliedError if verdict is not None and verdict.applied is False else CommitOutcomeUnknownError
    )
    lost = error_class("COMMIT", None, error, hide_parameters=True, connection_invalidated=context.is_disconnect)
    if verdict is not None:
        lost.add_note(f"db-retry asked the server about the lost COMMIT: {verdict.reason}")
    return lost


def _statement_failed(
    context: ExceptionContext, connection: sa.Connection, state: ConnectionState, error: Exception
) -> BaseException | None:
    code = sqlstate_on_chain(error)
    if code is not None or context.is_disconnect:  # the transaction cannot go on (25P02 would follow)
        transaction = connection.get_nested_transaction() or connection.get_transaction()
        state.failed_in = weakref.ref(transaction) if transaction is not None else None
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
        _mark(context, ErrorKind.OUTAGE)  # the statement was never sent; another connection will do
        return None
    if _is_node_role_error(code, error):
        _node_role_failed(context, state, code)
        return None
    lost = context.is_disconnect or code in LOST_CONNECTION_SQLSTATES or classify(error) is ErrorKind.AMBIGUOUS
    if lost and _autocommit(connection) and not _node_reports_read_only(state):
        # In autocommit the statement was its own transaction: the server may have committed it.
        return CommitOutcomeUnknownError(
            context.statement,
            context.parameters,
            error,
            hide_parameters=True,
            connection_invalidated=context.is_disconnect,
        )
    return None


def _autocommit(connection: sa.Connection) -> bool:
    return bool(getattr(connection.connection.dbapi_connection, "autocommit", False))


def _node_role_failed(context: ExceptionContext, state: ConnectionState, code: str | None) -> None:
    now = _node_reports_read_only(state)
    # Only a 25006 can be the caller's own doing: a standby's 0A000 ("cannot use serializable mode in a hot
    # standby") comes from a standby whatever the connection last heard of the node's role.
    if code == READ_ONLY_SQLSTATE and now is False and state.read_only_at_begin is False:
        # The node took writes when the transaction began and still does: the caller's own READ ONLY
        # transaction refused the write. Not transient. (A node that was read-only at BEGIN and is
        # writable now was demoted and came back: that is the node's doing, retried below.)
        _mark(context, None)
        return
    context.is_disconnect = True  # invalidates this connection and refreshes the pool
    if now or state.read_only_at_begin or code == FEATURE_NOT_SUPPORTED:  # pragma: no branch - None: before 14
        # No usable node for writes right now, as when no host fits target_session_attrs: wait for one
        # within DB_RETRY_OUTAGE_TIMEOUT (a failover, an address that moves) rather than count attempts.
        _mark(context, ErrorKind.UNAVAILABLE)


def _is_node_role_error(code: str | None, error: BaseException) -> bool:
    if code == READ_ONLY_SQLSTATE:
        return True
    return code == FEATURE_NOT_SUPPORTED and any(text in str(error) for text in _STANDBY_REFUSALS)


def _node_reports_read_only(state: ConnectionState) -> bool | None:
    """Whether the server said (ParameterStatus, PostgreSQL 14+) it is a standby or read-only; None: unknown.

    Read from what the driver keeps of the server's reports (no round trip), through the reader the
    pool's ``connect`` event made for this connection.
    """
    return state.role() if state.role is not None else None


def _role_reader(dbapi_connection: typing.Any) -> typing.Callable[[], bool | None] | None:  # noqa: ANN401
    """What the server reports of its role, read from the driver's own copy of ParameterStatus.

    Made once per connection (at a BEGIN it costs two lookups): asyncpg keeps one settings object per
    connection and updates it in place; psycopg asks libpq (``PQparameterStatus``).
    """
    driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
    if hasattr(driver, "get_settings"):  # asyncpg
        settings = driver.get_settings()
        return lambda: _says_read_only([getattr(settings, name, None) for name in _ROLE_PARAMETERS])
    pgconn = getattr(driver, "pgconn", None)
    if pgconn is not None:  # psycopg 3
        names = [name.encode() for name in _ROLE_PARAMETERS]
        return lambda: _says_read_only([pgconn.parameter_status(name) for name in names])
    return None  # pragma: no cover - another driver


def _says_read_only(values: list[typing.Any]) -> bool | None:
    if all(value is None for value in values):
        return None  # pragma: no cover - a server before PostgreSQL 14 (the suite runs 15)
    return any(value in {"on", b"on"} for value in values)


# -- resolving a lost COMMIT ----------------------------------------------------------------------------

# One round trip before COMMIT: the transaction's id (NULL if it wrote nothing) and, on a connection's
# first resolved COMMIT, which server incarnation this is. A transaction that may have queued a
# notification takes its id now (``pg_current_xact_id``): otherwise it would get one only at COMMIT.
_XID: typing.Final = "pg_catalog.pg_current_xact_id_if_assigned()::text"
_XID_FORCED: typing.Final = "pg_catalog.pg_current_xact_id()::text"
_IDENTITY_COLUMNS: typing.Final = (
    "(SELECT system_identifier FROM pg_catalog.pg_control_system())::text, "
    "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL "
    "ELSE substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8) END, "
    "pg_catalog.pg_postmaster_start_time()::text, "
    "pg_catalog.pg_stat_get_bgwriter_stat_reset_time()::text"
)
_INVALID_PARAMETER: typing.Final = "22023"  # pg_xact_status of an id the server has not given out yet
_UNDEFINED_TABLE: typing.Final = "42P01"
# The marker goes in only if the transaction wrote anything (it has an id), or may have queued a
# notification (which writes at COMMIT); RETURNING tells which. Per driver placeholder style.
_MARKER_INSERT: typing.Final = {
    forced: {
        style: f"INSERT INTO {markers.TABLE} (id) SELECT CAST({mark} AS uuid)"
        + ("" if forced else " WHERE pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL")
        + " RETURNING true"
        for style, mark in (("numeric_dollar", "$1"), ("pyformat", "%(marker)s"))
    }
    for forced in (False, True)
}
# Asked on the primary that answers now, in READ COMMITTED whatever the engine's isolation (a row that is
# not in the snapshot must conflict, not fail). Our own id, formatted by uuid: no placeholder needed.
_MARKER_PROBE: typing.Final = (
    f"INSERT INTO {markers.TABLE} (id) VALUES ('{{marker}}') ON CONFLICT (id) DO NOTHING RETURNING true"  # noqa: S608
)
_NO_ANSWER: typing.Final = "the server cannot be asked"


class _NotYet(Exception):  # noqa: N818 - a signal inside the resolution loop, never raised to callers
    """The server is not reachable yet, or the transaction is still in progress there."""

    def __init__(self, what: str, error: BaseException | None = None) -> None:
        super().__init__(f"{what} ({type(error).__name__})" if error is not None else what)


def _install(dialect: Dialect) -> None:
    """Wrap this engine's ``do_commit`` and ``do_rollback`` (once per dialect instance, so per engine).

    SQLAlchemy has no event around the DBAPI commit and rollback: the wrappers tell the liveness
    watchdog that the connection waits for the server, and resolve a lost COMMIT when asked to.
    """
    if getattr(dialect, "_db_retry_installed", False):
        return
    dialect.do_commit = functools.partial(_do_commit, dialect.do_commit)  # type: ignore[method-assign]
    dialect.do_rollback = functools.partial(_do_rollback, dialect.do_rollback)  # type: ignore[method-assign]
    dialect.do_terminate = functools.partial(_do_terminate, dialect.do_terminate)  # type: ignore[method-assign]
    dialect.do_close = functools.partial(_do_close, dialect.do_close)  # type: ignore[method-assign]
    dialect._db_retry_installed = True  # type: ignore[attr-defined]  # noqa: SLF001 - our own marker


def _do_terminate(original: typing.Callable[[typing.Any], None], dbapi_connection: typing.Any) -> None:  # noqa: ANN401
    """Drop an invalidated connection's socket at once (``_abort``); then SQLAlchemy's own terminate."""
    _abort(dbapi_connection)
    original(dbapi_connection)


def _do_close(original: typing.Callable[[typing.Any], None], dbapi_connection: typing.Any) -> None:  # noqa: ANN401
    """Close a pooled connection (``engine.dispose()``, recycling) in at most 1 s, also on a silent server.

    asyncpg's graceful close (a Terminate message, then waiting for the server to hang up) has no bound
    under SQLAlchemy's adapter: it is bounded here as a whole, and a connection that does not close in
    time is aborted. The bound covers all of it: before 0.30, asyncpg's own ``timeout=`` starts only after
    it has waited, without bound, for a cancel request still in flight. psycopg closes at once (libpq's
    ``PQfinish``).
    """
    driver: typing.Any = getattr(dbapi_connection, "driver_connection", None)
    abort = getattr(driver, "terminate", None)
    if abort is not None and not inspect.iscoroutinefunction(abort) and in_greenlet():
        try:
            await_only(_close_within(driver, QUICK))
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            abort()
    original(dbapi_connection)


async def _close_within(driver: typing.Any, seconds: float) -> None:  # noqa: ANN401 - asyncpg's connection
    async with asyncio.timeout(seconds):
        await driver.close()


def _do_rollback(original: typing.Callable[[PoolProxiedConnection], None], connection: PoolProxiedConnection) -> None:
    """ROLLBACK (also the pool's reset when a connection is returned): unanswered for 1 s, the connection is cut."""
    state = state_of(connection.info)
    if state.wire is not None:  # pragma: no branch - None over a Unix socket (the kit's servers: TCP only)
        state.wire.waiting(QUICK)
    try:
        original(connection)
    finally:
        _answered(state)


def _do_commit(original: typing.Callable[[PoolProxiedConnection], None], connection: PoolProxiedConnection) -> None:
    state = state_of(connection.info)
    if state.resolve:
        _resolving_do_commit(original, connection, state)
        return
    _waiting(state)
    try:
        original(connection)
    finally:
        _answered(state)


def _install_resolution(engine: sa.Engine) -> None:
    """Notice statements that may queue a notification on an engine that resolves commits (once per engine)."""
    dialect = engine.dialect
    if getattr(dialect, "_db_retry_resolving", False):
        return
    dialect._db_retry_resolving = True  # type: ignore[attr-defined]  # noqa: SLF001 - our own marker
    event.listen(engine, "before_cursor_execute", _note_notify)


def _fetch_row(
    connection: PoolProxiedConnection,
    query: str,
    parameters: typing.Any = None,  # noqa: ANN401 - DBAPI parameters
) -> tuple[typing.Any, ...]:
    cursor = connection.cursor()
    try:
        if parameters is None:
            cursor.execute(query)
        else:
            cursor.execute(query, parameters)
        row: typing.Sequence[typing.Any] = cursor.fetchone() or ()
    finally:
        cursor.close()
    return tuple(row)


def _resolving_do_commit(
    original: typing.Callable[[PoolProxiedConnection], None], connection: PoolProxiedConnection, state: ConnectionState
) -> None:
    """COMMIT; if its answer is lost, ask whether the transaction committed.

    Before COMMIT, one round trip: by transaction id, it reads the id (and, once per connection, the
    server's identity); by marker, it inserts the marker row (only if the transaction wrote anything).
    If COMMIT is lost (not refused: a refusal is a definite answer), fresh connections through the
    engine's current pool ask, for at most ``DB_RETRY_OUTAGE_TIMEOUT`` of real time: every connect and
    query runs under what is left of it. By id (``pg_xact_status``): committed on the same server
    incarnation, the commit returns; aborted, never written, or unknown to the server: not applied;
    anything else: unknown. By marker: whichever primary answers decides (:func:`_judge_marker`).
    """
    how, state.resolve = state.resolve, None
    try:
        judge = _prepare_marker(connection, state) if how == "marker" else _prepare_xid(connection, state)
    except Exception:
        state.verdict = Verdict(applied=False, reason="COMMIT was never sent")
        raise
    _waiting(state)
    try:
        original(connection)
    except Exception as exc:
        _answered(state)
        if command_not_sent(exc) or (classify(exc) not in LOST_AT_COMMIT and not isinstance(exc, TimeoutError)):
            raise  # refused by the server, or never sent: no need to ask (``_commit_failed`` tells which)
        state.phase = Phase.RESOLVING
        verdict = _ask(state, judge)
        state.phase = Phase.COMMITTING
        if verdict.applied:
            logger.info("a lost COMMIT was applied: %s", verdict.reason)
            connection.invalidate()  # its socket is gone: closed now, never reset on return to the pool
            return
        state.verdict = verdict
        raise
    finally:
        _answered(state)


_Judge: typing.TypeAlias = typing.Callable[[PoolProxiedConnection], "Verdict"]


def _prepare_xid(connection: PoolProxiedConnection, state: ConnectionState) -> _Judge | Verdict:
    """Read the transaction's id (and the server's identity, once): how to judge a lost COMMIT by them."""
    xid_column = _XID_FORCED if state.notified else _XID
    if state.identity is None:
        xid, *identity_row = _fetch_row(connection, f"SELECT {xid_column}, {_IDENTITY_COLUMNS}")
        identity = ServerIdentity(*identity_row)
        if identity.timeline is not None:  # a standby's identity changes if it is promoted: not kept
            state.identity = identity
    else:
        identity = state.identity
        (xid,) = _fetch_row(connection, f"SELECT {xid_column}")
    if xid is None:
        return Verdict(applied=False, reason="the transaction wrote nothing")
    return functools.partial(_judge, identity, str(xid))


def _prepare_marker(connection: PoolProxiedConnection, state: ConnectionState) -> _Judge | Verdict:
    """Insert the transaction's marker (if it wrote anything): how to judge a lost COMMIT by it."""
    marker = markers.new_marker()
    insert = _MARKER_INSERT[bool(state.notified)].get(state.paramstyle)
    if insert is None:  # pragma: no cover - another driver's placeholder style
        msg = f"resolve_commit='marker' does not support the paramstyle {state.paramstyle!r}"
        raise NotImplementedError(msg)
    parameters: typing.Any = (str(marker),) if "$1" in insert else {"marker": str(marker)}
    if not _fetch_row(connection, insert, parameters):
        return Verdict(applied=False, reason="the transaction wrote nothing")
    return functools.partial(_judge_marker, marker)


def _ask(state: ConnectionState, judge: _Judge | Verdict) -> Verdict:
    if isinstance(judge, Verdict):
        return judge  # known without asking
    pool = state.pool() if state.pool is not None else None
    if pool is None:  # pragma: no cover - the engine was garbage-collected during its own COMMIT
        return Verdict(applied=None, reason="the engine is gone")
    settings = get_settings()
    return await_only(_resolve(pool, judge, settings.outage_timeout, settings.outage_max_delay))


async def _resolve(pool: sa.pool.Pool, judge: _Judge, budget: float, pause: float) -> Verdict:
    """Ask on fresh connections until an answer comes or ``budget`` seconds of real time have passed."""
    throwaway = pool.recreate()  # the same creator (multi-host factory included), outside the engine's pool
    reason = _NO_ANSWER
    try:
        async with asyncio.timeout(budget):
            while True:
                try:
                    return await greenlet_spawn(_status, throwaway, judge)
                except _NotYet as exc:
                    reason = str(exc)
                await asyncio.sleep(pause)
    except TimeoutError:
        return Verdict(applied=None, reason=f"no answer within {budget:g}s: {reason}")
    finally:
        throwaway.dispose()


def _status(pool: sa.pool.Pool, judge: _Judge) -> Verdict:
    connection: PoolProxiedConnection | None = None
    try:
        connection = pool.connect()
        return judge(connection)
    except _NotYet:
        raise
    except Exception as exc:  # noqa: BLE001 - no connection yet, or it broke while asking: ask again
        raise _NotYet(_NO_ANSWER, exc) from None
    finally:
        if connection is not None:  # never back into a pool: this one is thrown away (terminated, not closed)
            connection.invalidate()


def _judge(identity: ServerIdentity, xid: str, connection: PoolProxiedConnection) -> Verdict:
    """By transaction id: only the same server incarnation can say."""
    now = ServerIdentity(*_fetch_row(connection, f"SELECT {_IDENTITY_COLUMNS}"))
    if now.system != identity.system or now.timeline != identity.timeline:
        return Verdict(applied=None, reason="another server or timeline answers now (a failover?)")
    if not xid.isdigit():  # pragma: no cover - the server gave it as a number
        return Verdict(applied=None, reason=f"unexpected transaction id {xid!r}")
    try:
        (status,) = _fetch_row(connection, f"SELECT pg_catalog.pg_xact_status('{xid}'::xid8)")
    except Exception as exc:
        if sqlstate_on_chain(exc) == _INVALID_PARAMETER and "in the future" in str(exc):
            # At or past the server's next id: it never became durable (lost in a crash), so it cannot
            # have committed. (A snapshot's xmax is no substitute: it lags behind transactions in progress.)
            return Verdict(applied=False, reason=f"transaction {xid} is unknown to the server")
        raise  # pragma: no cover - any other failure while asking: asked again (``_status``)
    if status == "in progress":
        raise _NotYet("transaction " + xid + " is still in progress")
    if status == "aborted":
        return Verdict(applied=False, reason=f"transaction {xid} aborted")
    if status == "committed" and now == identity:
        return Verdict(applied=True, reason=f"transaction {xid} committed")
    # Committed after a restart: after a crash the id of a transaction whose WAL was never flushed is
    # given out again (the postmaster keeps its start time; the shared statistics are reset), so the
    # answer may be another transaction's. NULL: too old to be known any more.
    restarted = f"the server restarted; transaction {xid} may be another one"
    return Verdict(applied=None, reason=restarted if status == "committed" else f"the server forgot {xid}")


def _judge_marker(marker: uuid.UUID, connection: PoolProxiedConnection) -> Verdict:
    """By marker: the primary that answers now inserts the same id, and always rolls back.

    The insert waits for a transaction that holds the id and may still commit; then it conflicts (the
    work committed, and it is part of the history this primary serves) or not (it is not, and never
    will be). A standby is not asked: only a primary's history decides.
    """
    cursor = connection.cursor()
    try:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    finally:
        cursor.close()
    if _fetch_row(connection, "SELECT pg_catalog.pg_is_in_recovery()")[0]:
        reason = "only a standby answers"
        raise _NotYet(reason)
    try:
        inserted = _fetch_row(connection, _MARKER_PROBE.format(marker=marker))
    finally:
        connection.rollback()
    if inserted:
        return Verdict(applied=False, reason=f"marker {marker} is not in the history of the primary that answers")
    return Verdict(applied=True, reason=f"marker {marker} committed")
