"""Which database errors are transient: a pure decision over an exception's chain, from one table.

``SQLSTATES`` maps each code db-retry knows to a :class:`Rule` (a kind and the reason for it);
``DRIVER_RULES`` does the same for the drivers' errors that carry no SQLSTATE. :func:`classify`
walks an exception from the outside in and the outermost link that says something decides:

- a cancellation or exit (any ``BaseException`` that is not an ``Exception``) is never retried;
- this package's own errors (``db_retry_kind``, also set by :mod:`db_retry.engine` on SQLAlchemy's
  exception when it learned more), a SQLSTATE, or a driver error a rule knows: that rule;
- a wrapper (SQLAlchemy's ``DBAPIError``, a driver error no rule knows, an exception raised ``from``
  another) says nothing itself: what it wraps decides. SQLAlchemy's ``connection_invalidated`` flag
  counts only when nothing below says more;
- any other exception is the caller's own (a ``ValueError``, a ``23505`` of a fallback INSERT): not
  transient, whatever it was raised while handling.

Whatever decides, a retry is refused when any link anywhere on the chain is an ambiguous COMMIT:
running the work again could apply it twice. ``architecture/retriable.md`` has the table with reasons.
"""

import collections.abc
import dataclasses
import enum
import re
import typing

import asyncpg
from sqlalchemy.exc import DBAPIError


class ErrorKind(enum.Enum):
    """What a failure says about the next attempt."""

    CONFLICT = "conflict"  # another transaction won; retry soon (an attempt)
    OUTAGE = "outage"  # the connection or the server went away after the work reached it (an attempt)
    UNAVAILABLE = "unavailable"  # no usable server could be reached: the work never started (bounded by time)
    AMBIGUOUS = "ambiguous"  # a COMMIT may or may not have been applied; retrying could apply it twice


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """One row of the classification table: the kind (``None``: not transient) and why."""

    kind: ErrorKind | None
    reason: str


_CONFLICT: typing.Final = ErrorKind.CONFLICT
_OUTAGE: typing.Final = ErrorKind.OUTAGE
_UNAVAILABLE: typing.Final = ErrorKind.UNAVAILABLE
_LOST: typing.Final = "the connection is gone, and its transaction with it; a lost COMMIT is caught before"

SQLSTATES: typing.Final[collections.abc.Mapping[str, Rule]] = {
    "40001": Rule(_CONFLICT, "serialization_failure: rolled back; a fresh snapshot sees the winner's write"),
    "40P01": Rule(_CONFLICT, "deadlock_detected: the victim rolled back; the other side's locks go at its commit"),
    "08000": Rule(_OUTAGE, f"connection_exception: {_LOST}"),
    "08001": Rule(_OUTAGE, f"sqlclient_unable_to_establish_sqlconnection: {_LOST}"),
    "08003": Rule(_OUTAGE, f"connection_does_not_exist: {_LOST}"),
    "08004": Rule(_OUTAGE, f"sqlserver_rejected_establishment_of_sqlconnection: {_LOST}"),
    "08006": Rule(_OUTAGE, f"connection_failure: {_LOST}"),
    "57P01": Rule(_OUTAGE, "admin_shutdown: backend terminated or fast shutdown; its transaction rolled back"),
    "57P02": Rule(_OUTAGE, "crash_shutdown: another backend crashed and every session was reset"),
    "25006": Rule(_OUTAGE, "read_only_sql_transaction: a write reached a read-only node (see db_retry.engine)"),
    "57P03": Rule(_UNAVAILABLE, "cannot_connect_now: sent only at connect, while starting, stopping or recovering"),
    "53300": Rule(_UNAVAILABLE, "too_many_connections: sent only at connect; wait for a slot"),
    "08007": Rule(ErrorKind.AMBIGUOUS, "transaction_resolution_unknown: the COMMIT may have been applied"),
    "40003": Rule(None, "statement_completion_unknown: a statement may have been applied; as unsafe as 08007"),
    "40002": Rule(None, "transaction_integrity_constraint_violation: the data is wrong; a retry fails alike"),
    "25P02": Rule(None, "in_failed_sql_transaction: a symptom of an earlier error, which is the one to see"),
    "57014": Rule(None, "query_canceled: a statement timeout or cancel; running it again costs the same"),
}
LOST_CONNECTION_SQLSTATES: typing.Final = frozenset(
    code for code, rule in SQLSTATES.items() if code.startswith("08") and rule.kind is _OUTAGE
)
PROTOCOL_VIOLATION: typing.Final = "08P01"
_NO_ACTIVE_TRANSACTION: typing.Final = "25P01"
# PgBouncer reports its own conditions as 08P01 with these messages (it has no codes of its own).
POOLER_UNAVAILABLE_MESSAGES: typing.Final = (
    "server login has been failing",
    "pgbouncer cannot connect to server",
    "query_wait_timeout",
    "no more connections allowed",
    "server_connect_timeout",
)
POOLER_LOST_MESSAGES: typing.Final = ("server conn crashed", "server shutting down", "pooler is shutting down")
_POOLER_UNAVAILABLE: typing.Final = Rule(_UNAVAILABLE, "PgBouncer could not get a server connection: never started")
_POOLER_LOST: typing.Final = Rule(_OUTAGE, "PgBouncer lost or closed the server connection under the work")
_PROTOCOL_BUG: typing.Final = Rule(None, "protocol_violation: a client bug sends the same bytes again")
_UNKNOWN_CODE: typing.Final = Rule(None, "a code db-retry does not know as transient (integrity, syntax, ...)")
# Messages of driver errors without a SQLSTATE: psycopg's connect failures (also when the server said
# "starting up"), and the ways asyncpg and psycopg report a connection lost under them.
_CONNECT_FAILED_MESSAGES: typing.Final = ("connection failed", "connection timeout expired", "connection is bad")
_LOST_MESSAGES: typing.Final = (
    "connection is closed",
    "connection is lost",
    "server closed the connection",
    "consuming input failed",
    "could not receive data",
    "could not send data",
    "ssl syscall error",
    "ssl connection has been closed",
    "eof detected",
    "no connection to the server",
    "terminating connection",
)
_NOT_SENT_MESSAGES: typing.Final = ("cannot switch to state", "another operation is in progress")
_RESULTS_OUT_OF_STEP: typing.Final = re.compile(r"received \d+ results from command")

_MAX_CHAIN: typing.Final = 64
RETRIED_KINDS: typing.Final = frozenset({ErrorKind.CONFLICT, ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE})
# A COMMIT that failed with one of these kinds may have been applied: the answer never arrived.
LOST_AT_COMMIT: typing.Final = frozenset({ErrorKind.OUTAGE, ErrorKind.UNAVAILABLE, ErrorKind.AMBIGUOUS})


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE an exception carries itself (asyncpg, psycopg, SQLAlchemy's adapted errors), if any."""
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) and len(code) == 5 else None  # noqa: PLR2004 - SQLSTATEs are 5 chars


def _is_psycopg_error(exc: BaseException, name: str = "OperationalError") -> bool:
    # By name: psycopg is optional, and its errors arrive raw as well as wrapped by SQLAlchemy.
    return any(f"{cls.__module__}.{cls.__qualname__}" == f"psycopg.{name}" for cls in type(exc).__mro__)


def _psycopg_out_of_step(exc: BaseException) -> bool:
    """Psycopg read more results than the command it sent has: something else answered first on the socket.

    Seen behind PgBouncer while its server restarts: an error it sent on an idle client connection is read
    as the first result of the next command (``received 2 results from command 'BEGIN ...'``). Nothing of
    that command can be trusted; the connection cannot be used again.
    """
    return _is_psycopg_error(exc, "InternalError") and _RESULTS_OUT_OF_STEP.match(_message(exc)) is not None


def _message(exc: BaseException) -> str:
    """What the error says, lowercase; empty if it cannot say (some wrappers' ``__str__`` raise)."""
    try:
        return str(exc).lower()
    except Exception:  # noqa: BLE001 - a broken __str__ must not break the classification
        return ""


def _psycopg_connect_failed(exc: BaseException) -> bool:
    return _is_psycopg_error(exc) and (
        _message(exc).startswith(_CONNECT_FAILED_MESSAGES) or type(exc).__name__ == "ConnectionTimeout"
    )


def _psycopg_lost(exc: BaseException) -> bool:
    return _is_psycopg_error(exc) and any(text in _message(exc) for text in _LOST_MESSAGES)


def _asyncpg_state_broke(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.InternalClientError) and not isinstance(exc, asyncpg.TargetServerAttributeNotMatched)


# Driver errors without a SQLSTATE, in order: the first that matches decides.
DRIVER_RULES: typing.Final[tuple[tuple[typing.Callable[[BaseException], bool], Rule], ...]] = (
    (
        lambda exc: isinstance(exc, asyncpg.TargetServerAttributeNotMatched),
        Rule(_UNAVAILABLE, "asyncpg's multi-host connect found no host of the wanted role (yet)"),
    ),
    (_asyncpg_state_broke, Rule(_OUTAGE, "asyncpg's protocol state broke: the connection is unusable")),
    (
        lambda exc: isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in _message(exc),
        Rule(_OUTAGE, "asyncpg: the connection was closed under the work"),
    ),
    (_psycopg_connect_failed, Rule(_UNAVAILABLE, "psycopg: raised by connect, the work never started")),
    (_psycopg_out_of_step, Rule(_OUTAGE, "psycopg read another command's results: the connection is unusable")),
    (_psycopg_lost, Rule(_OUTAGE, "psycopg: the connection was lost under the work")),
    (
        lambda exc: isinstance(exc, ConnectionError),
        Rule(_UNAVAILABLE, "a bare socket error escapes the drivers only while connecting"),
    ),
)


def rule_for_code(code: str, exc: BaseException) -> Rule:
    """The table's row for ``code`` (08P01 is read by its message: PgBouncer has no codes of its own)."""
    if code == PROTOCOL_VIOLATION:
        message = _message(exc)
        if any(text in message for text in POOLER_UNAVAILABLE_MESSAGES):
            return _POOLER_UNAVAILABLE
        if any(text in message for text in POOLER_LOST_MESSAGES):
            return _POOLER_LOST
        return _PROTOCOL_BUG
    return SQLSTATES.get(code, _UNKNOWN_CODE)


class _Says(enum.Enum):
    DECIDES = "decides"  # the link says what happened
    FLAG = "flag"  # only SQLAlchemy's connection_invalidated flag: a fallback
    NOTHING = "nothing"  # a wrapper: what it wraps decides


_LIBRARIES: typing.Final = ("sqlalchemy", "asyncpg", "psycopg")


def _verdict(link: BaseException, *, driver: bool = False) -> tuple[ErrorKind | None, _Says]:
    """What one link says; ``driver``: it is a driver's error (SQLAlchemy's ``orig``), never the caller's own."""
    if not isinstance(link, Exception):
        return None, _Says.DECIDES  # cancellation, exit: never retried, whatever it interrupted
    if hasattr(link, "db_retry_kind"):  # this package's own errors, or what db_retry.engine learned of one
        own: ErrorKind | None = link.db_retry_kind
        return own, _Says.DECIDES
    code = sqlstate_of(link)
    if code is not None:
        return rule_for_code(code, link).kind, _Says.DECIDES
    for matches, rule in DRIVER_RULES:
        if matches(link):
            return rule.kind, _Says.DECIDES
    if isinstance(link, DBAPIError) and link.connection_invalidated:
        return ErrorKind.OUTAGE, _Says.FLAG
    if driver or _is_library_error(link) or _below(link):
        return None, _Says.NOTHING
    return None, _Says.DECIDES  # the caller's own error: not transient, whatever it was raised while handling


def _is_library_error(link: BaseException) -> bool:
    return type(link).__module__.split(".", 1)[0] in _LIBRARIES


def _below(link: BaseException) -> list[BaseException]:
    """What ``link`` wraps: SQLAlchemy's ``orig`` and an explicit ``__cause__``; a library error's context."""
    explicit = [below for below in (getattr(link, "orig", None), link.__cause__) if isinstance(below, BaseException)]
    if explicit:
        return explicit
    if _is_library_error(link) and link.__context__ is not None and not link.__suppress_context__:
        return [link.__context__]
    return []


def _chain(exc: BaseException) -> typing.Iterator[BaseException]:
    """``exc`` and every exception on its ``__cause__``/``__context__``/``orig`` chain, each once (cycle-safe)."""
    seen: set[int] = set()
    pending = [exc]
    while pending and len(seen) < _MAX_CHAIN:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = (current.__context__, getattr(current, "orig", None), current.__cause__)
        pending.extend(link for link in linked if isinstance(link, BaseException))


def sqlstate_on_chain(exc: BaseException) -> str | None:
    """The first SQLSTATE found on ``exc``'s chain (outermost first), if any."""
    return next((code for link in _chain(exc) if (code := sqlstate_of(link)) is not None), None)


def _decide(exc: BaseException) -> ErrorKind | None:
    """The outermost link that says something decides; the invalidated flag only if none does."""
    flagged: ErrorKind | None = None
    seen: set[int] = set()
    pending: list[tuple[BaseException, bool]] = [(exc, False)]
    while pending and len(seen) < _MAX_CHAIN:
        link, driver = pending.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        kind, says = _verdict(link, driver=driver)
        if says is _Says.DECIDES:
            return kind
        if says is _Says.FLAG and flagged is None:
            flagged = kind
        orig = getattr(link, "orig", None) if isinstance(link, DBAPIError) else None
        pending.extend((below, below is orig) for below in _below(link))
    return flagged


def classify(exc: BaseException) -> ErrorKind | None:
    """The kind of failure ``exc`` reports, or ``None`` if it is not transient (see the module's rules)."""
    kind = _decide(exc)
    if kind in RETRIED_KINDS and any(_verdict(link)[0] is ErrorKind.AMBIGUOUS for link in _chain(exc)):
        return ErrorKind.AMBIGUOUS  # a COMMIT on the chain may have been applied: never run the work again
    return kind


def is_retriable(exc: BaseException) -> bool:
    """Whether retrying the whole unit of work that raised ``exc`` can succeed and is safe."""
    return classify(exc) in RETRIED_KINDS


def leaves_connection_unusable(exc: BaseException) -> bool:
    """Whether a driver error says its connection is in a state no later transaction on it can leave.

    asyncpg's protocol state machine broke (``cannot switch to state``), or asyncpg still holds a
    transaction whose ``BEGIN`` failed: every later ``BEGIN`` on that connection becomes a ``SAVEPOINT``
    (``25P01`` outside a transaction block) or is refused as a nested transaction.
    """
    for link in _chain(exc):
        if _asyncpg_state_broke(link) or _psycopg_out_of_step(link):
            return True
        if isinstance(link, asyncpg.InterfaceError) and "nested transaction has a different" in _message(link):
            return True
        if sqlstate_of(link) == _NO_ACTIVE_TRANSACTION and "savepoint can only be used" in _message(link):
            return True
    return False


def command_not_sent(exc: BaseException) -> bool:
    """Whether the driver refused to send the command at all (asyncpg: another operation is in progress)."""
    return any(
        isinstance(link, (asyncpg.InternalClientError, asyncpg.InterfaceError))
        and not isinstance(link, asyncpg.TargetServerAttributeNotMatched)
        and any(text in _message(link) for text in _NOT_SENT_MESSAGES)
        for link in _chain(exc)
    )
